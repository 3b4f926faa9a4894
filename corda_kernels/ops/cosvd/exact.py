"""The exact CO-SVD: ``W·C_fix`` formed and fully decomposed in float64 (float32 cannot resolve
the bottom of CO-SVD's wide spectra), the ``cosvd_full`` op, and the crop of triplets."""

from __future__ import annotations

from typing import Literal

import torch

from ...backend import define_op, register_impl
from ..linalg import solve

Which = Literal["top", "bottom", "all"]


def _fake(W, C_fix):  # noqa: ANN001, ANN202
    k = min(W.shape[-2], W.shape[-1])
    lead = W.shape[:-2]
    return (
        W.new_empty(*lead, W.shape[-2], k),
        W.new_empty(*lead, k),
        W.new_empty(*lead, W.shape[-1], k),
    )


define_op("cosvd_full", "(Tensor W, Tensor C_fix) -> (Tensor, Tensor, Tensor)", _fake)


def cosvd_float64(W: torch.Tensor, C_fix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full CO-SVD in float64: ``U`` ``(…, m, k)``, ``S`` ``(…, k)``, ``V`` ``(…, n, k)``, all float64."""
    W64 = W.to(torch.float64)
    C64 = C_fix.to(torch.float64)
    U, S, Vh = torch.linalg.svd(W64 @ C64, full_matrices=False)
    # Vh·C⁻¹ = (C⁻¹·Vhᵀ)ᵀ for a symmetric C: a solve, no explicit inverse.
    V = solve(C64, Vh.transpose(-1, -2))
    return U, S, V


@register_impl("cosvd_full", "torch")
def _cosvd_full_torch(W: torch.Tensor, C_fix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, V = cosvd_float64(W, C_fix)
    return U.float(), S.float(), V.float()


def select(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, rank: int | None, which: Which
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop triplets: ``top`` keeps the first ``rank``, ``bottom`` the last, ``all`` every one."""
    k = S.shape[-1]
    if which == "all":
        return U, S, V
    if rank is None:
        raise ValueError(f"cosvd: which={which!r} needs a rank")
    if not 0 < rank <= k:
        raise ValueError(f"cosvd: rank {rank} must be in [1, {k}] for a layer with min(m, n) = {k}")
    sl = slice(0, rank) if which == "top" else slice(k - rank, k)
    return U[..., :, sl].contiguous(), S[..., sl].contiguous(), V[..., :, sl].contiguous()
