"""How closely the damping screen's probe estimate tracks the check it stands in for.

The check of CorDA's damping rule is ``r = ‖C_fix·X − I‖_F`` for the float32 inverse ``X``; the
oracle (:func:`~corda_kernels.ops.damping.check_residual`) evaluates it in float64 with ``rho``,
how far a float32 evaluation in another summation order may land; a decision must match the
oracle where ``|r − threshold| > rho``. The screen estimates ``r`` from ``SCREEN_PROBES`` Gaussian
probes through the LU solve, product in float32 (:func:`~corda_kernels.ops.damping.probe_residual`),
and decides alone only when the estimate is ``SCREEN_MARGIN`` away from the threshold. Measured:
the ratio estimate / ``r`` where ``r`` lies in 1e-3 … 1 (where decisions are taken), for the
screen's estimate and, for comparison, the same probes (32 and 128) with the product in float64, over

* real covariances: the embedded SmolLM2-135M (every distinct input of its 30 layers, 16 × 256
  Lee tokens, PEFT's normalization) and the tiny LLaMA / GPT-2 models of ``bench_dropin``;
* synthetic ones (``tests/test_damping_screen.covariance``: outlier channels, fewer tokens than
  features, badly scaled channels, power-law spectra) at n = 64 … 1024, several seeds;

each at the damps ``0.01·2^j`` (j = 0 … 7) and below (1e-6 … 1e-3). Ranges are given over every
case and over the cases where rounding does not dominate the check (``rho < r/2``). Writes
``bench/results/damping_screen_study.json``.

    PYTHONPATH=. python bench/damping_screen_study.py [--no-smollm2]
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from corda_kernels.ops.damping import SCREEN_MARGIN, SCREEN_PROBES, check_residual, fix_covariance, probe_residual
from corda_kernels.ops.linalg import inv_ex, lu_factor_ex

PROBES_FLOAT64 = (32, 128)  # probe counts of the float64-product variant
DAMPS = [1e-6, 1e-5, 1e-4, 1e-3] + [0.01 * 2**j for j in range(8)]


def probe_residual_float64(fixed: torch.Tensor, LU: torch.Tensor, pivots: torch.Tensor, probes: int) -> torch.Tensor:
    """The screen's estimate with its product and difference in float64 (the solve stays float32)."""
    B, n = fixed.shape[0], fixed.shape[-1]
    G = torch.randn(n, probes, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    Y = torch.linalg.lu_solve(LU, pivots, G.expand(B, n, probes))
    R = fixed.double() @ Y.double() - G.double()
    return (R.square().sum(dim=(-2, -1)) / probes).sqrt()


def collect(model, targets: list[str], ids: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    """The distinct input covariances of ``model``'s target layers, one sequence per forward."""
    from corda_kernels.engine.calibration import CovarianceCollector

    layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
    collector = CovarianceCollector(layers)
    with collector.attached(), torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    seen: dict[int, torch.Tensor] = {}
    for C in collector.covariances().values():
        seen.setdefault(id(C), C)
    return list(seen.values())


def real_covariances(smollm2: bool) -> list[tuple[str, torch.Tensor]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_dropin import tiny_models

    out = []
    for name, model, targets, ids in tiny_models(96, 12):
        out += [(f"{name}-{i}", C) for i, C in enumerate(collect(model, targets, ids))]
    if smollm2:
        from corda_kernels.engine import data

        model, tok = data.load_model()
        ids = data.token_blocks(tok, data.load_text("lee"), 16, 256)
        targets = ["q_proj", "o_proj", "gate_proj", "down_proj"]  # one layer per distinct input
        out += [(f"smollm2-{i}", C) for i, C in enumerate(collect(model, targets, ids))]
    return out


def synthetic_covariances(seeds: int) -> list[tuple[str, torch.Tensor]]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_damping_screen import KINDS, covariance

    out = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        for kind in KINDS:
            for n in (64, 200, 512, 1024):
                out.append((f"{kind}-{n}-s{seed}", covariance(kind, n, gen)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default="bench/results/damping_screen_study.json")
    args = ap.parse_args()
    sets = {"real": real_covariances(not args.no_smollm2), "synthetic": synthetic_covariances(args.seeds)}
    rows = []
    for group, mats in sets.items():
        for name, C in tqdm(mats, desc=group):
            C = C.float().unsqueeze(0)
            for damp in DAMPS:
                fixed = fix_covariance(C, torch.tensor([damp], dtype=torch.float64))
                LU, piv, info = lu_factor_ex(fixed)
                X, info_inv = inv_ex(fixed)
                if int(info[0]) != 0 or int(info_inv[0]) != 0:
                    continue
                r, rho = (float(v[0]) for v in check_residual(fixed, X))
                if not 1e-3 <= r <= 1.0:
                    continue
                row = {"group": group, "name": name, "n": C.shape[-1], "damp": damp, "r": r, "rho": rho}
                row["screen"] = float(probe_residual(fixed, LU, piv, SCREEN_PROBES)[0]) / r
                for s in PROBES_FLOAT64:
                    row[f"float64_s{s}"] = float(probe_residual_float64(fixed, LU, piv, s)[0]) / r
                rows.append(row)
    keys = ["screen"] + [f"float64_s{s}" for s in PROBES_FLOAT64]
    summary = {}
    for group in list(sets) + ["all"]:
        for subset, keep in (("every case", lambda row: True), ("rho < r/2", lambda row: row["rho"] < row["r"] / 2)):
            sel = [row for row in rows if group in ("all", row["group"]) and keep(row)]
            item = {"cases": len(sel), "matrices": len({row["name"] for row in sel})}
            summary[f"{group}, {subset}"] = item
            if not sel:
                continue
            item.update({key: [min(r[key] for r in sel), max(r[key] for r in sel)] for key in keys})
            ranges = ", ".join(f"{key} {item[key][0]:.2f}–{item[key][1]:.2f}" for key in keys)
            print(f"{group:9s} {subset:10s} {len(sel):4d} cases, {item['matrices']:3d} matrices: estimate/r {ranges}")
    lo, hi = summary["all, every case"]["screen"]
    spare = f"{SCREEN_MARGIN * lo:.2f}× (accept side), {SCREEN_MARGIN / hi:.2f}× (reject side)"
    print(f"screen margin {SCREEN_MARGIN:g}: to spare {spare}")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_dropin import _cpu_model, write_results

    out = {
        "date": date.today().isoformat(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "command": "python bench/damping_screen_study.py " + " ".join(sys.argv[1:]),
        "screen_probes": SCREEN_PROBES,
        "screen_margin": SCREEN_MARGIN,
        "summary": summary,
        "rows": rows,
    }
    write_results(args.json, out)


if __name__ == "__main__":
    main()
