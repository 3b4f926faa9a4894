"""Plain top-r SVD and leading QR of weight matrices: the operations behind PEFT's PiSSA, LoftQ
and OLoRA initializations (:mod:`corda_kernels.peft.inits`).

``svd_top`` is the top path of the CO-SVD (:func:`corda_kernels.ops.cosvd.top_r`) with the
covariance left out (``M = W``): the top eigenvectors of the float32 Gram matrix of the short
side as the start (LAPACK's subset eigensolver where ``k`` is large), a float64 Rayleigh–Ritz
step and a posterior residual bound on every singular value; where those residuals miss the
top-r criterion, subspace iteration from the start until its stopping rule holds, then the final
step again. A matrix whose iteration does not settle within its steps is done by the
float64 SVD instead (``info["method"] = "exact-fallback"``). Weight spectra are flat at the top
(σ_1/σ_16 ≈ 1.3–2.1 on the embedded model's layers, a Gaussian's gaps ~k^(-2/3)), where a random
Krylov start needs most of ``k`` columns; the dense start costs one Gram product and one
partial eigendecomposition, about a quarter of a full float32 SVD at k = 2048.

``qr_leading`` gives the first ``r`` columns of ``Q`` and rows of ``R`` of ``W = QR`` without the
full factorization: Householder QR processes the columns in order, so ``Q[:, :r]`` and
``R[:r, :r]`` are those of the QR of ``W[:, :r]`` alone, and ``R[:r, r:] = Q[:, :r]ᵀ W[:, r:]``.
"""

from __future__ import annotations

import torch

from .cosvd.top import top_r
from .linalg import all_finite


def svd_top(
    W: torch.Tensor, rank: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """The top ``rank`` singular triplets of ``W`` ``(m, n)`` or ``(B, m, n)``, any float dtype.

    Returns float32 ``U`` ``(…, m, r)``, ``S`` ``(…, r)`` descending, ``V`` ``(…, n, r)`` with
    ``W ≈ U diag(S) Vᵀ + (the rest of the spectrum)`` and one info dict per matrix
    (``sv_rel_bound``: a posterior bound on each value's relative error; ``subspace_sin_est``:
    the residual over the gap at ``r``, Wedin's bound on the subspace angle).
    """
    if W.dim() not in (2, 3):
        raise ValueError(f"svd_top: W must be (m, n) or (B, m, n), got shape {tuple(W.shape)}")
    k = min(W.shape[-2:])
    if not 0 < rank <= k:
        raise ValueError(f"svd_top: rank {rank} must be in [1, {k}] for W of shape {tuple(W.shape)}")
    if not all_finite(W):
        raise ValueError("svd_top: W has NaN or Inf entries")
    single = W.dim() == 2
    Wb = W.unsqueeze(0) if single else W
    U, S, V, infos = top_r(Wb, None, rank, generator=generator, dense=True)
    todo = [b for b, info in enumerate(infos) if not info["converged"]]
    if todo:
        Ue, Se, Vhe = torch.linalg.svd(Wb[todo].double(), full_matrices=False)
        for j, b in enumerate(todo):
            U[b], S[b], V[b] = Ue[j, :, :rank], Se[j, :rank], Vhe[j, :rank].mT
            infos[b] = {"method": "exact-fallback", "rejected": infos[b]}
    if single:
        return U[0], S[0], V[0], infos
    return U, S, V, infos


def qr_leading(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q[:, :r], R[:r, :])`` of the reduced QR ``W = QR`` of float ``W`` ``(m, n)``, in ``W``'s dtype.

    The same factors as ``torch.linalg.qr(W)`` sliced (LAPACK's Householder signs included), from
    a QR of the first ``r`` columns and one product: ``O(m·n·r)`` instead of ``O(m·n·k)``.
    ``r > min(m, n)`` gives the ``min(m, n)`` columns the full factorization has.
    """
    if W.dim() != 2:
        raise ValueError(f"qr_leading: W must be (m, n), got shape {tuple(W.shape)}")
    if rank < 1:
        raise ValueError(f"qr_leading: rank must be ≥ 1, got {rank}")
    r = min(rank, *W.shape)
    Q, R_head = torch.linalg.qr(W[:, :r])
    return Q, torch.cat([R_head, Q.mT @ W[:, r:]], dim=1)
