"""Compare two CorDA adapter directories (e.g. ``init`` with the fast vs the exact CO-SVD).

Run: ``PYTHONPATH=. python python/compare_adapters.py DIR_FAST DIR_EXACT [--json OUT]``.

Each directory is a PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``).
For every layer present in both, the triplets are recovered from ``lora_A`` / ``lora_B``
(:func:`corda_kernels.ops.cosvd.triplets_from_adapter`, scaling ``lora_alpha/r`` or
``lora_alpha/√r`` with rsLoRA; ``alpha_pattern`` is not applied — it cancels in every relative
number below as long as both directories used the same configuration) and compared with
:func:`corda_kernels.ops.cosvd.compare_triplets`: the largest relative singular value error,
the smallest principal cosines of the ``U`` and ``V`` subspaces and the relative difference of
``s·B·A``. The energy criterion needs ``W`` and ``C_fix``: call ``compare_triplets(..., W=,
C_fix=, which=)`` from Python for it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corda_kernels.ops.cosvd import compare_triplets, triplets_from_adapter  # noqa: E402


def load_adapter(path: Path) -> tuple[dict, dict]:
    """``({layer: (A, B)}, adapter_config)`` of a PEFT adapter directory."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    layers: dict[str, dict] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in key:
                layers.setdefault(key.split(tag)[0], {})[part] = t
    return {k: (v["lora_A"], v["lora_B"]) for k, v in layers.items() if len(v) == 2}, cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("test", type=Path)
    ap.add_argument("ref", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="write the per-layer numbers here")
    args = ap.parse_args(argv)
    test, cfg = load_adapter(args.test)
    ref, _ = load_adapter(args.ref)
    common = sorted(set(test) & set(ref))
    if not common:
        raise SystemExit("no layer in common")
    alpha = float(cfg.get("lora_alpha", 8))
    rows = {}
    for name in common:
        (At, Bt), (Ar, Br) = test[name], ref[name]
        r = At.shape[0]
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        rows[name] = compare_triplets(triplets_from_adapter(At, Bt, s), triplets_from_adapter(Ar, Br, s))
    print("| layer | sv rel err | U cos min | V cos min | s·B·A rel diff |\n|---|---|---|---|---|")
    for name, c in rows.items():
        print(
            f"| {name} | {c['sv_rel_err']:.2e} | {c['u_cos_min']:.6f} | {c['v_cos_min']:.6f} | "
            f"{c['product_rel_err']:.2e} |"
        )
    for key in ("sv_rel_err", "u_cos_min", "product_rel_err"):
        vals = [c[key] for c in rows.values()]
        worst = min(vals) if key == "u_cos_min" else max(vals)
        print(f"{key}: worst {worst:.3g}, median {statistics.median(vals):.3g} over {len(vals)} layers")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
