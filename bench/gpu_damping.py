"""GPU suite module: the damped-inverse search, triton backend (fused shift + fused residual
check) against the torch backend (same rule, docs/design.md §2).

``run(device)`` returns rows ``{kernel, shape, ours_ms, ref_ms, ratio, max_err, note}``.
Per step and matrix the rule costs one LU inverse (~2n³ flops, cuSOLVER, the same call on both
backends) plus the check: torch forms ``C_fix·C_inv`` (2n³ flops fp32, TF32 off) and two more
n² passes (``− I``, the norm); ours forms the product tile by tile in registers and writes one
float per tile.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_util import SMALL, guarded, rel_err, row, timeit  # noqa: E402

import corda_kernels as ck  # noqa: E402
import corda_kernels.kernels.damping_triton as dt  # noqa: E402
from corda_kernels.kernels.damping_triton import residual_norm, shifted_copy  # noqa: E402
from corda_kernels.ops.damping import check_residual, damp_covariance, diag_means, fix_covariance, rule_allows  # noqa: E402


def ill_conditioned(B: int, n: int, rank: int, device: str, g: torch.Generator) -> torch.Tensor:
    """``(B, n, n)`` fp32 covariances of low-rank activations with a few large outlier channels."""
    out = []
    for b in range(B):
        X = torch.randn(2 * n, rank, device=device, generator=g) @ torch.randn(rank, n, device=device, generator=g)
        X += 1e-2 * torch.randn(2 * n, n, device=device, generator=g)
        X[:, torch.randperm(n, device=device, generator=g)[:3]] *= 10.0 * (b + 1)
        X = X.double()
        out.append((X.T @ X).float())
    return torch.stack(out)


def _r(t: torch.Tensor) -> list[float]:
    return [round(v, 5) for v in t.tolist()]


SIZES = [(4, 512, 32, 1e-6), (3, 1031, 64, 0.01), (2, 4096, 256, 0.01)]  # (B, n, rank, first damp)


def _search(device: str, size: tuple[int, int, int, float], seed: int) -> list[dict[str, Any]]:
    """The whole search on one ill-conditioned batch: torch backend vs triton backend (vs tf32x3 option)."""
    B, n, rank, damp0 = (4, 64, 8, 1e-6) if SMALL else size
    g = torch.Generator(device=device).manual_seed(seed)
    C = ill_conditioned(B, n, rank, device, g)
    ck.set_backend("torch")
    # the literal rule on both backends: the fused check is what is compared
    f0, i0, d0 = ck.damped_inverse(C, damp=damp0, screen=False)
    t_ms = timeit(lambda: ck.damped_inverse(C, damp=damp0, screen=False), device, rep_ms=300)
    ck.set_backend("triton")
    f1, i1, d1 = ck.damped_inverse(C, damp=damp0, screen=False)
    o_ms = timeit(lambda: ck.damped_inverse(C, damp=damp0, screen=False), device, rep_ms=300)
    ck.set_backend("auto")
    # each backend's damps must be ones the rule allows (float64 replay; a residual within rounding
    # of the threshold may go either way); equal damps must give bit-identical C_fix
    problems = rule_allows(C, d0, damp=damp0) + rule_allows(C, d1, damp=damp0)
    same_fix = all(torch.equal(f0[b], f1[b]) for b in range(B) if d0[b] == d1[b])
    steps = [round(float(torch.log2(d / damp0))) for d in d0]
    steps1 = [round(float(torch.log2(d / damp0))) for d in d1]
    ok = not problems and same_fix
    note = (
        f"{'pass' if ok else 'FAIL'}: doublings torch {steps} triton {steps1}, C_fix equal where damps equal={same_fix}"
    )
    note += f"; {problems[0]}" if problems else ""
    rows = [row("damped_inverse search", f"B={B} n={n}", o_ms, t_ms, rel_err(i1, i0), note)]
    f3, d3, _ = damp_covariance(C, damp=damp0)  # the screen (LU + probes), no inverse handed back
    s_ms = timeit(lambda: damp_covariance(C, damp=damp0), device, rep_ms=300)
    problems = rule_allows(C, d3, damp=damp0)
    same_fix = all(torch.equal(f3[b], f0[b]) for b in range(B) if d3[b] == d0[b])
    ok = not problems and same_fix
    note = f"{'pass' if ok else 'FAIL'}: damps the rule allows, C_fix equal where damps equal={same_fix}"
    note += f"; {problems[0]}" if problems else ""
    rows.append(row("damp_covariance (screen)", f"B={B} n={n}", s_ms, t_ms, 0.0, note))
    if torch.device(device).type == "cuda":
        dt.CHECK_INPUT_PRECISION = "tf32x3"
        try:
            ck.set_backend("triton")
            f2, i2, d2 = ck.damped_inverse(C, damp=damp0, screen=False)
            x_ms = timeit(lambda: ck.damped_inverse(C, damp=damp0, screen=False), device, rep_ms=300)
        finally:
            dt.CHECK_INPUT_PRECISION = "ieee"
            ck.set_backend("auto")
        agree = "same" if torch.equal(d0, d2) else "DIFFER"
        rows.append(row("damped_inverse search, tf32x3 check (option)", f"B={B} n={n}", x_ms, t_ms,
                        rel_err(i2, i0), f"experiment: damps {agree} as the torch rule"))  # fmt: skip
    return rows


def _kernels(device: str) -> list[dict[str, Any]]:
    """The check and the shift alone, on near-identity residuals (the regime the rule decides in)."""
    rows = []
    g = torch.Generator(device=device).manual_seed(11)
    B, n = (2, 64) if SMALL else (4, 4096)
    A = fix_covariance(ill_conditioned(B, n, n // 16, device, g), torch.full((B,), 0.05, dtype=torch.float64))
    inv = torch.linalg.inv(A)
    eye = torch.eye(n, device=device)
    ref = torch.linalg.matrix_norm(A @ inv - eye)
    ours = residual_norm(A, inv)
    r_ms = timeit(lambda: torch.linalg.matrix_norm(A @ inv - eye), device)
    o_ms = timeit(lambda: residual_norm(A, inv), device)
    # both fp32 values lie within the derived band of the float64 value (any summation order)
    r64, rho = check_residual(A, inv)
    within = bool(((ours.double().cpu() - r64).abs() <= rho).all() and ((ref.double().cpu() - r64).abs() <= rho).all())
    ok = "pass" if within else "FAIL"
    rows.append(row("‖C_fix·C_inv − I‖_F", f"B={B} n={n}", o_ms, r_ms, rel_err(ours, ref),
                    f"{ok}: values {_r(ours)} vs torch {_r(ref)}"))  # fmt: skip
    for cfg in ({"block": 128, "block_k": 32, "num_warps": 8}, {"block": 128, "block_k": 16, "num_warps": 8},
                {"block": 64, "block_k": 16, "num_warps": 4, "num_stages": 4}):  # fmt: skip
        try:
            c_ms = timeit(lambda cfg=cfg: residual_norm(A, inv, config=cfg), device)
            rows.append(row("‖C_fix·C_inv − I‖_F config", f"B={B} n={n}", c_ms, r_ms, note=str(cfg)))
        except Exception as e:  # a config that does not fit must not end the section
            rows.append(row("‖C_fix·C_inv − I‖_F config", f"B={B} n={n}", note=f"{cfg} failed: {e}"[:200]))
    if torch.device(device).type == "cuda":
        fast = residual_norm(A, inv, input_precision="tf32x3")
        f_ms = timeit(lambda: residual_norm(A, inv, input_precision="tf32x3"), device)
        rows.append(row("‖C_fix·C_inv − I‖_F tf32x3 (option)", f"B={B} n={n}", f_ms, r_ms, rel_err(fast, ref),
                        f"not used by the search; values {_r(fast)}"))  # fmt: skip
    idx = torch.arange(B, device=device)
    damps = torch.full((B,), 0.01, dtype=torch.float64)
    shift = diag_means(A) * damps.to(device=device, dtype=torch.float32)  # rounded as the rule rounds it
    exact = torch.equal(shifted_copy(A, idx, shift), fix_covariance(A, damps))
    r_ms = timeit(lambda: fix_covariance(A, damps), device)
    o_ms = timeit(lambda: shifted_copy(A, idx, shift), device)
    rows.append(row("C + damp·mean(diag)·I", f"B={B} n={n}", o_ms, r_ms, 0.0 if exact else None,
                    f"{'pass' if exact else 'FAIL'}: bit-identical={exact}"))  # fmt: skip
    return rows


def run(device: str) -> list[dict[str, Any]]:
    """Same-damp checks with the whole search timed, then the two kernels alone (each section guarded)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    for i, size in enumerate(SIZES[:1] if SMALL else SIZES):
        guarded(rows, f"damped_inverse search {i}", lambda size=size, i=i: _search(device, size, 7 + i))
    guarded(rows, "damping kernels", lambda: _kernels(device))
    return rows


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    for r in run(dev):
        print(r)
