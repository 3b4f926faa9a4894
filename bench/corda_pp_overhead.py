"""What CorDA++ adds over CorDA in ``init``, side by side in one process on the embedded model.

Stages timed (seconds, CPU):
  calibration with rounds=1 vs rounds=K (the same sequences, one pass each);
  CorDA: damping + CO-SVD of every target layer at uniform rank r (``decompose_layers``);
  CorDA++: ``plan_dynamic`` (K candidate dampings, values-only spectra, selection, allocation)
  + CO-SVD at the allocated ranks (``decompose_plan``).

Run: ``python bench/corda_pp_overhead.py --samples 16 --seq-len 256 --rank 16 --rounds 5 --threads 1``
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from corda_kernels.cli.study import target_modules
from corda_kernels.engine.calibration import CovarianceCollector
from corda_kernels.engine.data import load_model, load_text
from corda_kernels.engine.dynamic import decompose_plan, plan_dynamic
from corda_kernels.engine.pipeline import decompose_layers


def calibrate(model, mods, ids: torch.Tensor, rounds: int, batch: int = 4) -> tuple[CovarianceCollector, float]:  # noqa: ANN001
    col = CovarianceCollector(mods, rounds=rounds)
    t0 = time.perf_counter()
    with col.attached(), torch.no_grad():
        for b in range(0, ids.shape[0], batch):
            x = ids[b : b + batch]
            col.set_batch(torch.ones_like(x, dtype=torch.bool))
            model.get_decoder()(x)
    col.finalize()
    return col, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", default="kpm", choices=["ipm", "kpm"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model()
    ids = torch.tensor(tok(load_text("lee"), add_special_tokens=False).input_ids[: args.samples * args.seq_len])
    ids = ids.view(args.samples, args.seq_len)
    mods = target_modules(model)
    _, t_cal1 = calibrate(model, mods, ids, 1)
    col, t_calk = calibrate(model, mods, ids, args.rounds)

    t0 = time.perf_counter()
    for _ in decompose_layers(mods, col.covariances(), {n: args.rank for n in mods}, args.mode, progress=False):
        pass
    t_corda = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = plan_dynamic(mods, col, args.rank, 2.0 * args.rank, args.mode, progress=False)
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in decompose_plan(mods, plan, progress=False):
        pass
    t_dec = time.perf_counter() - t0
    out = {
        "layers": len(mods),
        "rounds": args.rounds,
        "rank": args.rank,
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        "calibration_rounds1_s": t_cal1,
        f"calibration_rounds{args.rounds}_s": t_calk,
        "corda_damping_plus_cosvd_s": t_corda,
        "corda++_plan_s": t_plan,
        "corda++_plan_stages_s": plan.timings,
        "corda++_cosvd_s": t_dec,
        "corda++_total_over_corda": (t_plan + t_dec) / t_corda,
        "layers_rank0": sum(1 for r in plan.ranks.values() if r == 0),
        "rank_range": [min(plan.ranks.values()), max(plan.ranks.values())],
        "chosen_rounds": {i: sum(1 for c in plan.choice.values() if c == i) for i in range(args.rounds)},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
