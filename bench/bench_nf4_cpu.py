"""NF4 on the CPU, side by side in one process: the C++ kernels (``cpp`` backend), the pure-torch
path (``torch`` backend) and bitsandbytes' own CPU quantize / dequantize.

    python bench/bench_nf4_cpu.py [--reps 7] [--shape 4096 4096] [--out bench/results/nf4_cpu.json]

Each implementation's result is checked against bitsandbytes once before timing (byte-exact
quantization, identical dequantization), then timed ``reps`` times in rotation; the table gives
medians and min–max, and ratios = bitsandbytes' median / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import bitsandbytes.functional as F
import torch
from bench_dropin import _cpu_model, write_results  # the same CPU line and writer as the drop-in benchmark

import corda_kernels as ck


def _time(fns: dict[str, callable], reps: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():  # rotation: each repetition times every implementation once
            t = time.perf_counter()
            fn()
            out[k].append((time.perf_counter() - t) * 1e3)
    return out


def _quantize(backend: str, W: torch.Tensor, compress: bool):  # noqa: ANN202
    ck.set_backend(backend)
    return ck.nf4_quantize(W, blocksize=64, compress_statistics=compress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    ap.add_argument("--out", default="bench/results/nf4_cpu.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        W = (torch.randn(*args.shape, generator=g) * 0.02).to(dtype)
        for compress in (False, True):
            rp, rs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=compress)
            for b in ("cpp", "torch"):
                p, _ = _quantize(b, W, compress)
                assert torch.equal(p, rp), f"{b} quantize differs from bitsandbytes"
            t = _time(
                {
                    "cpp": lambda W=W, c=compress: _quantize("cpp", W, c),
                    "torch": lambda W=W, c=compress: _quantize("torch", W, c),
                    "bitsandbytes": lambda W=W, c=compress: F.quantize_4bit(
                        W, blocksize=64, quant_type="nf4", compress_statistics=c
                    ),
                },
                args.reps,
            )
            rows.append({"op": "quantize" + (" +double-quant" if compress else ""), "dtype": name, "ms": t})
        rp, rs = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
        ref = F.dequantize_4bit(rp, rs, quant_type="nf4")
        for b in ("cpp", "torch"):
            ck.set_backend(b)
            assert torch.equal(ck.nf4_dequantize(rp, rs), ref), f"{b} dequantize differs from bitsandbytes"

        def deq(b: str, rp=rp, rs=rs):  # noqa: ANN001, ANN202
            ck.set_backend(b)
            return ck.nf4_dequantize(rp, rs)

        t = _time(
            {
                "cpp": lambda: deq("cpp"),
                "torch": lambda: deq("torch"),
                "bitsandbytes": lambda rp=rp, rs=rs: F.dequantize_4bit(rp, rs, quant_type="nf4"),
            },
            args.reps,
        )
        rows.append({"op": "dequantize", "dtype": name, "ms": t})
    ck.set_backend("auto")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "shape": args.shape,
        "blocksize": 64,
        "torch": torch.__version__,
        "command": f"python bench/bench_nf4_cpu.py --reps {args.reps} --shape {args.shape[0]} {args.shape[1]}",
    }
    print(f"{meta['date']}, {meta['cpu']}, {meta['threads']} threads, {args.shape[0]}x{args.shape[1]}, blocksize 64")
    print("| op | dtype | cpp ms | torch ms | bitsandbytes ms | cpp vs bnb | torch vs bnb |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        med = {k: statistics.median(v) for k, v in r["ms"].items()}
        rng = {k: f"{med[k]:.1f} ({min(v):.1f}–{max(v):.1f})" for k, v in r["ms"].items()}
        r["median_ms"] = med
        print(
            f"| {r['op']} | {r['dtype']} | {rng['cpp']} | {rng['torch']} | {rng['bitsandbytes']} | "
            f"{med['bitsandbytes'] / med['cpp']:.2f}x | {med['bitsandbytes'] / med['torch']:.2f}x |"
        )
    write_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
