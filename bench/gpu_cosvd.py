"""GPU suite module: the fast CO-SVD against PEFT's full-SVD path, batched layers.

``run(device)`` returns rows ``{kernel, shape, ours_ms, ref_ms, ratio, max_err, note}``.
Inputs: ``B`` same-shaped layers (``W`` Gaussian, ``C`` from activations with four outlier
channels, damped by :func:`~corda_kernels.ops.damping.damp_covariance`), the heavy-head spectra
CO-SVD has. Per shape and ``r``:

* ref: PEFT's decomposition, layer by layer: fp32 ``W @ C_fix``, full fp32 ``torch.linalg.svd``,
  ``Vh @ C_inv`` (the inverse is the damping's, precomputed, not timed);
* ours: :func:`~corda_kernels.ops.cosvd.fast_cosvd` on the whole batch — top: float32 block
  Krylov with a float64 Rayleigh–Ritz; bottom: float64 (square layers: the LU path; others: the
  Gram ``eigh`` / Cholesky paths).

Damping is excluded on both sides (``gpu_damping`` times it). ``max_err`` is the largest
relative error of ours' ``r`` singular values against a float64 reference of the first layer
(square: ``svdvals`` of the float64 product; non-square: the top from ``eigvalsh`` of the float64
Gram matrix, no bottom reference). Single timed runs after a warm-up: a full 4096² SVD is
seconds, too long for repeated timing inside the suite's budget.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_util import SMALL, guarded, row, sync  # noqa: E402

from corda_kernels.ops.cosvd import fast_cosvd  # noqa: E402
from corda_kernels.ops.damping import damp_covariance  # noqa: E402
from corda_kernels.ops.linalg import inv_ex  # noqa: E402

SHAPES = [(2, 128, 128), (2, 96, 256)] if SMALL else [(4, 4096, 4096), (2, 4096, 11008)]  # (B, m, n)
RANKS = (8,) if SMALL else (16, 64, 128)


def outlier_layers(B: int, m: int, n: int, device: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` ``(B, m, n)`` and ``C`` ``(B, n, n)`` float32: activations with a decaying scale and 4 outliers."""
    Ws, Cs = [], []
    for _ in range(B):
        scales = torch.logspace(0, -2, n, device=device)[torch.randperm(n, device=device, generator=g)]
        scales[torch.randperm(n, device=device, generator=g)[:4]] = 300.0
        X = torch.randn(2 * n, n, device=device, generator=g) * scales
        C = (X.T @ X) / (2 * n)
        Cs.append((C + C.T) / 2)
        Ws.append(torch.randn(m, n, device=device, generator=g) / n**0.5)
    return torch.stack(Ws), torch.stack(Cs)


def _once_ms(fn: Any, device: str) -> tuple[Any, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t) * 1000


def _peft(W: torch.Tensor, C_fix: torch.Tensor, C_inv: torch.Tensor) -> list[tuple]:
    out = []
    for b in range(W.shape[0]):
        U, S, Vh = torch.linalg.svd(W[b] @ C_fix[b], full_matrices=False)
        out.append((U, S, (Vh @ C_inv[b]).T))
    return out


def _shape(device: str, B: int, m: int, n: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(seed)
    W, C = outlier_layers(B, m, n, device, g)
    C_fix, damps, _ = damp_covariance(C)
    C_inv = inv_ex(C_fix)[0]  # batched torch.linalg.inv breaks on the CPU dry run (corda_kernels.ops.linalg)
    _peft(W[:1, :64, :64], C_fix[:1, :64, :64], C_inv[:1, :64, :64])  # warm-up (cuSOLVER handles)
    fast_cosvd(W[:1, :64, :64], C_fix[:1, :64, :64], rank=4, which="top")
    peft, p_ms = _once_ms(lambda: _peft(W, C_fix, C_inv), device)
    M64 = W[0].double() @ C_fix[0].double()
    if m == n:
        ref = torch.linalg.svdvals(M64)
        ref_note = "vs float64 svdvals"
    else:
        ref = torch.linalg.eigvalsh(M64 @ M64.T).flip(0).clamp_min(0).sqrt()  # top only
        ref_note = "top vs float64 Gram eigvalsh"
    rows = []
    shape = f"B={B} {m}x{n}"
    for which in ("top", "bottom"):
        for r in RANKS:
            (U, S, V, infos), o_ms = _once_ms(lambda r=r, w=which: fast_cosvd(W, C_fix, rank=r, which=w), device)
            k = ref.numel()
            want = ref[:r] if which == "top" else ref[k - r :]
            err = None
            if m == n or which == "top":
                err = float(((S[0].double() - want).abs() / want).max())
            peft_S = peft[0][1][:r] if which == "top" else peft[0][1][k - r :]
            peft_err = float(((peft_S.double() - want).abs() / want).max()) if err is not None else None
            meth = sorted({i["method"] for i in infos})
            steps = max(i.get("iterations", 0) for i in infos)
            ok = err is None or err <= (1e-3 if which == "top" else 5e-3)
            how = f"{','.join(meth)} ({steps} it)"
            if peft_err is None:
                note = f"{how}; no bottom ref"
            else:
                note = f"{'pass' if ok else 'FAIL'}: {ref_note}; {how}; PEFT σ err {peft_err:.1e}"
            rows.append(row(f"cosvd {which} r={r}", shape, o_ms, p_ms, err, note))
    return rows


def run(device: str) -> list[dict[str, Any]]:
    """One section per shape (each guarded); TF32 off on both sides."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    for i, (B, m, n) in enumerate(SHAPES):
        guarded(rows, f"cosvd {m}x{n}", lambda B=B, m=m, n=n, i=i: _shape(device, B, m, n, 21 + i))
    return rows


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    for r in run(dev):
        print(r)
