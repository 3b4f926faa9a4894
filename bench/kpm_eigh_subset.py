"""KPM's eigh factor with LAPACK's subset solver against torch's full ``eigh``, side by side.

``bottom_r``'s ``eigh`` factor needs the bottom ``r`` eigenpairs of the float64 Gram matrix of
``M = W·C_fix``. It takes them from :func:`corda_kernels.ops.cosvd.eigen.eigh_range` (``syevr``
for the range where that pays); the baseline is the same path with torch's full ``eigh`` in its
place, in the same process, interleaved. Inputs: Gaussian weights of the tiny benchmark models'
and SmolLM2's projection shapes, covariances of 4n Gaussian tokens with uneven channel scales.

    PYTHONPATH=. python bench/kpm_eigh_subset.py    # → bench/results/kpm_eigh_subset.json
    PYTHONPATH=. python bench/kpm_eigh_subset.py --batch 4 --shapes 1024x384,384x1024,1536x384,384x1536 \
        --json bench/results/kpm_eigh_subset_batch4.json   # batches: the subset's matrices on threads

Reported per shape: medians of 7 of the whole ``bottom_r`` call (r = 16), and the largest
relative difference of the bottom singular values between the two (both certified).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from unittest import mock

import torch

from bench.bench_dropin import _cpu_model, write_results
from corda_kernels.ops.cosvd import bottom as bottom_module
from corda_kernels.ops.cosvd.bottom import bottom_r
from corda_kernels.ops.damping import damp_covariance

SHAPES = [(1024, 384), (384, 1024), (1536, 384), (384, 1536), (1536, 576), (576, 1536), (2816, 1024)]


def full_eigh_range(G: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: every eigenpair from torch's ``eigh``, sliced."""
    values, vectors = torch.linalg.eigh(G, UPLO="U")
    return values[..., first : first + count], vectors[..., first : first + count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="layers of one shape per bottom_r call")
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES), help="m x n, comma-separated")
    ap.add_argument("--json", default="bench/results/kpm_eigh_subset.json")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for m, n in shapes:
        W = torch.randn(args.batch, m, n, generator=g) * 0.02
        X = torch.randn(args.batch, 4 * n, n, generator=g) * (torch.rand(n, generator=g) + 0.1)
        C_fix = damp_covariance(X.mT @ X / X.shape[1])[0]
        times: dict[str, list[float]] = {"subset": [], "full": []}
        out = {}
        for rep in range(args.reps + 1):  # the first round warms up
            for label in ("full", "subset"):
                patch = (
                    mock.patch.object(bottom_module, "eigh_range", full_eigh_range)
                    if label == "full"
                    else mock.patch.object(bottom_module, "eigh_range", bottom_module.eigh_range)
                )
                with patch:
                    t0 = time.perf_counter()
                    U, S, V, info = bottom_r(W, C_fix, args.rank, factors=("eigh",))
                    if rep:
                        times[label].append(time.perf_counter() - t0)
                out[label] = (S, info[0]["method"])
        S_full, S_sub = out["full"][0].double(), out["subset"][0].double()
        row = {
            "shape": [m, n],
            "batch": args.batch,
            "full_ms": 1e3 * statistics.median(times["full"]),
            "subset_ms": 1e3 * statistics.median(times["subset"]),
            "methods": [out["full"][1], out["subset"][1]],
            "sv_rel_diff": float(((S_sub - S_full).abs() / S_full).max()),
        }
        row["speedup"] = row["full_ms"] / row["subset_ms"]
        rows.append(row)
        print(
            f"{m}×{n}: full eigh {row['full_ms']:.1f} ms, subset {row['subset_ms']:.1f} ms, "
            f"{row['speedup']:.2f}×, σ differ by {row['sv_rel_diff']:.1e} ({row['methods'][1]})",
            flush=True,
        )
    result = {
        "date": date.today().isoformat(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "command": "PYTHONPATH=. python bench/kpm_eigh_subset.py " + " ".join(sys.argv[1:]),
        "rank": args.rank,
        "rows": rows,
    }
    write_results(args.json, result)


if __name__ == "__main__":
    main()
