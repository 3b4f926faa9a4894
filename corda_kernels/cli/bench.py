"""End-to-end benchmark: PEFT's ``preprocess_corda`` (batch 1) against ours (batched).

Each variant runs in its own subprocess so that its peak memory (max RSS) is its own; all
variants use the same model, tokens, rank and targets. Rows: the bare forward passes (no
hooks: the floors), PEFT, ours through the PEFT drop-in with the same whole-model forward, and
ours on the backbone alone (what ``corda-kernels init`` runs: the LM head is no target), for
ipm and kpm, with the time per stage (calibration forward, decomposition, adapter init), the
speed-up and CorDA's cost beyond the bare batch-1 forward and beyond each variant's own bare
forward. Run as
``corda-kernels bench init [--samples 64 --seq-len 256 --rank 16 --modes ipm,kpm]`` or
``python bench/bench_init.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# floors: the bare forward passes (no hooks) of the whole model at batch 1 and batched, and of
# the backbone alone, batched. Variants: PEFT (batch 1, the whole model as its docs run it), ours
# through the PEFT drop-in with the same whole-model forward, and ours on the backbone alone.
FLOORS = ("bare-b1", "bare-batched", "bare-backbone")
VARIANTS = ("peft", "ours", "ours-backbone")
OWN_FLOOR = {"peft": "bare-b1", "ours": "bare-batched", "ours-backbone": "bare-backbone"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _worker(
    variant: str, mode: str, samples: int, seq_len: int, rank: int, batch: int, method: str, adapters: str | None
) -> dict:
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    from corda_kernels.engine import data

    model, tok = data.load_model()
    ids = data.token_blocks(tok, data.load_text("lee"), samples, seq_len)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )
    stages: dict[str, float] = {}

    from corda_kernels.engine.layers import target_modules
    from corda_kernels.engine.stages import calibration_runner

    # the backbone alone reaches every target (the LM head is not one): what `corda-kernels init` runs
    runner = calibration_runner(model, target_modules(model, cfg)) if variant.endswith("backbone") else model

    def forward(bs: int) -> None:
        with torch.no_grad():
            for chunk in torch.split(ids, bs):
                runner(input_ids=chunk, use_cache=False)

    timed = {"run_model": 0.0}

    def run_model_with(bs: int):  # noqa: ANN202
        def run() -> None:
            t0 = time.perf_counter()
            forward(bs)
            timed["run_model"] += time.perf_counter() - t0

        return run

    with torch.no_grad():  # warm-up: first-call allocations and thread start-up are not CorDA's cost
        model(ids[:1, :16])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if variant.startswith("bare"):
        forward(1 if variant == "bare-b1" else batch)
        stages["forward"] = time.perf_counter() - t0
    else:
        if variant == "peft":
            from peft.tuners.lora.corda import preprocess_corda

            preprocess_corda(model, cfg, run_model=run_model_with(1))
        else:
            from corda_kernels.peft import preprocess_corda

            preprocess_corda(model, cfg, run_model=run_model_with(batch), method=method)
        total = time.perf_counter() - t0
        stages["calibrate"] = timed["run_model"]
        stages["decompose"] = total - timed["run_model"]
        t1 = time.perf_counter()
        peft_model = get_peft_model(model, cfg)
        stages["init"] = time.perf_counter() - t1
        if adapters:
            _save_adapters(peft_model, adapters)
    stages["total"] = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "mode": mode, "stages": stages, "peak_rss_mib": peak, "rss_after_load_mib": rss0}


def _save_adapters(peft_model, path: str) -> None:  # noqa: ANN001
    """``{layer: (A, B)}`` of every LoRA layer, float32 on the CPU, to ``path``."""
    import torch

    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A = module.lora_A["default"].weight.detach().float().cpu()
            B = module.lora_B["default"].weight.detach().float().cpu()
            out[name.removeprefix("base_model.model.")] = (A, B)
    torch.save(out, path)


def adapter_agreement(test_path: str, ref_path: str, scaling: float = 1.0) -> dict[str, float]:
    """Worst and median over layers of :func:`compare_triplets` between two saved adapter sets."""
    import statistics

    import torch

    from corda_kernels.ops.cosvd import compare_triplets, triplets_from_adapter

    test, ref = torch.load(test_path), torch.load(ref_path)
    rows = [
        compare_triplets(triplets_from_adapter(*test[n], scaling), triplets_from_adapter(*ref[n], scaling))
        for n in sorted(set(test) & set(ref))
    ]
    if not rows:
        raise ValueError(f"no layer in common between {test_path} and {ref_path}")
    out: dict[str, float] = {"layers": len(rows)}
    for key, worst in (("sv_rel_err", max), ("product_rel_err", max), ("u_cos_min", min), ("v_cos_min", min)):
        vals = [r[key] for r in rows]
        out[f"{key}_worst"] = worst(vals)
        out[f"{key}_median"] = statistics.median(vals)
    return out


# (test, reference) pairs compared after the runs: the drop-in (exact CO-SVD) against PEFT, and
# the fast CO-SVD (backbone row) against the drop-in's exact one
COMPARISONS = (("ours", "peft"), ("ours-backbone", "ours"))


def agreement_table(agreements: dict[str, dict]) -> str:
    lines = [
        "| mode | adapters | against | σ rel err worst / median | s·B·A rel diff worst / median | U cos min |",
        "|---|---|---|---|---|---|",
    ]
    for key, a in agreements.items():
        mode, test, ref = key.split(":")
        lines.append(
            f"| {mode} | {test} | {ref} | {a['sv_rel_err_worst']:.1e} / {a['sv_rel_err_median']:.1e} | "
            f"{a['product_rel_err_worst']:.1e} / {a['product_rel_err_median']:.1e} | {a['u_cos_min_worst']:.6f} |"
        )
    return "\n".join(lines)


def _run(variant: str, mode: str, args: argparse.Namespace, adapters: str | None = None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        __spec__.name,  # this module, however it was started (it moves with the package's layout)
        "--worker",
        variant,
        "--mode",
        mode,
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--rank",
        str(args.rank),
        "--batch",
        str(args.batch),
        "--method",
        args.dropin_method if variant == "ours" else args.method,
    ]
    if adapters:
        cmd += ["--adapters", adapters]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    by = {(r["variant"], r["mode"]): r for r in rows}
    lines = [
        "| mode | variant | calibrate s | decompose s | init s | total s | peak RSS MiB "
        "| speed-up vs PEFT | beyond bare b1 forward | beyond its own bare forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in FLOORS:
        r = by.get((key, "-"))
        if r:
            lines.append(
                f"| - | {key} | {r['stages']['forward']:.1f} | - | - | {r['stages']['total']:.1f} | "
                f"{r['peak_rss_mib']:.0f} | - | - | - |"
            )
    b1 = by[("bare-b1", "-")]["stages"]["forward"]
    for mode in ("ipm", "kpm"):
        peft = by.get(("peft", mode))
        for variant in VARIANTS:
            r = by.get((variant, mode))
            if not r:
                continue
            s = r["stages"]
            own = by[(OWN_FLOOR[variant], "-")]["stages"]["forward"]
            ratio = peft["stages"]["total"] / s["total"] if peft else float("nan")
            lines.append(
                f"| {mode} | {variant} | {s['calibrate']:.1f} | {s['decompose']:.1f} | {s['init']:.1f} | "
                f"{s['total']:.1f} | {r['peak_rss_mib']:.0f} | {ratio:.2f}× | {(s['total'] - b1) / b1:.0%} | "
                f"{(s['total'] - own) / own:.0%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="corda-kernels bench init", description=__doc__)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--method", default="fast", choices=["exact", "fast"], help="CO-SVD of the backbone row")
    p.add_argument(
        "--dropin-method",
        default="exact",
        choices=["exact", "fast"],
        help="CO-SVD of the drop-in row (exact: the reference the backbone row's adapters are compared with)",
    )
    p.add_argument("--modes", default="ipm,kpm")
    p.add_argument(
        "--json", default="bench/results/bench_init.json", help="where the rows are written (the table is printed)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ipm", help=argparse.SUPPRESS)
    p.add_argument("--adapters", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        row = _worker(
            args.worker, args.mode, args.samples, args.seq_len, args.rank, args.batch, args.method, args.adapters
        )
        print(json.dumps(row))
        return 0
    rows = [_run(v, "-", args) for v in FLOORS]
    agreements: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for variant in VARIANTS:
                rows.append(_run(variant, mode, args, adapters=f"{tmp}/{variant}-{mode}.pt"))
                print(f"done {variant} {mode}: {rows[-1]['stages']}", file=sys.stderr, flush=True)
            for test, ref in COMPARISONS:
                pair = (f"{tmp}/{test}-{mode}.pt", f"{tmp}/{ref}-{mode}.pt")
                agreements[f"{mode}:{test}:{ref}"] = adapter_agreement(*pair)
    print(table(rows))
    print()
    print(agreement_table(agreements))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": date.today().isoformat(), "command": "corda-kernels bench init " + " ".join(argv or [])}
        path.write_text(json.dumps({**meta, "rows": rows, "adapter_agreement": agreements}, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
