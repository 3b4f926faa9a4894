"""``corda-kernels init`` with the fast CO-SVD against the exact one, from the same covariances.

For each mode, ``init --method fast`` calibrates the embedded SmolLM2 (64 × 256 Lee tokens by
default, r = 16, every projection); ``init --method exact`` then starts from the same
``covariance.pt`` (copied beside it, so its content key matches and nothing is recalibrated). The
two adapter directories are compared layer by layer (``python/compare_adapters.py``'s numbers:
singular values, subspace cosines, the product ``s·B·A``) and the decompose stages timed.

    python bench/init_fast_vs_exact.py [--samples 64 --seq-len 256 --modes ipm,kpm]

Writes ``bench/results/init_fast_vs_exact.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_dropin import write_results  # noqa: E402
from corda_kernels.cli.init import InitOptions, run_init  # noqa: E402
from corda_kernels.ops.cosvd import compare_triplets, triplets_from_adapter  # noqa: E402


def compare(test: Path, ref: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    a, b = load_file(test / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    config = json.loads((ref / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    rows = []
    for key in sorted(k for k in a if k.endswith("lora_A.weight")):
        kb = key.replace("lora_A", "lora_B")
        rows.append(compare_triplets(triplets_from_adapter(a[key], a[kb], s), triplets_from_adapter(b[key], b[kb], s)))
    out: dict[str, float] = {"layers": len(rows)}
    for name, worst in (("sv_rel_err", max), ("product_rel_err", max), ("u_cos_min", min), ("v_cos_min", min)):
        vals = [r[name] for r in rows]
        out[f"{name}_worst"], out[f"{name}_median"] = worst(vals), statistics.median(vals)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modes", default="ipm,kpm")
    ap.add_argument("--json", default="bench/results/init_fast_vs_exact.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fast-vs-exact-") as tmp:
        for mode in args.modes.split(","):
            outs = {m: Path(tmp) / f"{mode}-{m}" for m in ("fast", "exact")}
            reports = {}
            for method in ("fast", "exact"):
                if method == "exact":  # the very covariances the fast run used
                    outs["exact"].mkdir()
                    shutil.copy2(outs["fast"] / "covariance.pt", outs["exact"] / "covariance.pt")
                opts = InitOptions(mode=mode, method=method, rank=args.rank, samples=args.samples,
                                   seq_len=args.seq_len, out=str(outs[method]), progress=False)  # fmt: skip
                reports[method] = run_init(opts)
            row = {
                "mode": mode,
                "decompose_s": {m: reports[m].stages["decompose"] for m in reports},
                "calibrate_s": {m: reports[m].stages["calibrate"] for m in reports},
                **compare(outs["fast"] / "adapter", outs["exact"] / "adapter"),
            }
            rows.append(row)
            print(
                f"{mode}: decompose fast {row['decompose_s']['fast']:.1f} s"
                f" / exact {row['decompose_s']['exact']:.1f} s; "
                f"σ rel err worst {row['sv_rel_err_worst']:.1e} median {row['sv_rel_err_median']:.1e}; "
                f"U, V cos min {min(row['u_cos_min_worst'], row['v_cos_min_worst']):.7f}; "
                f"s·B·A rel diff worst {row['product_rel_err_worst']:.1e} median {row['product_rel_err_median']:.1e}",
                flush=True,
            )
    command = "python bench/init_fast_vs_exact.py " + " ".join(sys.argv[1:])
    write_results(args.json, {"date": date.today().isoformat(), "command": command, "rows": rows})


if __name__ == "__main__":
    main()
