"""CO-SVD: the context-oriented SVD ``W·C_fix = U Σ Vhᵀ``, ``V = (Vh·C_fix⁻¹)ᵀ``.

``W`` is ``(m, n)`` (out × in), ``C`` the ``(n, n)`` covariance of the layer's inputs;
``k = min(m, n)``. Then ``W = U diag(S) Vᵀ`` with ``U`` ``(m, k)``, ``S`` ``(k,)`` descending
and ``V`` ``(n, k)``. The ``exact`` method forms the product and takes a full SVD in float64
(float32 cannot resolve the bottom of CO-SVD's wide spectra); results are float32.
"""

from __future__ import annotations

from typing import Literal

import torch

from .backend import define_op, register_impl
from .damping import damp_covariance
from .linalg import solve

Which = Literal["top", "bottom", "all"]
_METHODS = ("exact", "fast")
# ``fast`` takes the float64 SVD itself below this min(m, n): there it is the cheaper of the two
# (per layer, 4-layer batches, 2 cores: k = 64 0.4 ms exact against 0.7 / 0.9 ms for the fast
# top / bottom; k = 128 1.9 against 1.4 / 2.7; k = 192 4.1 against 2.4 / 4.2; k = 256 8.4 against
# 2.9 / 5.7), and exact.
FAST_MIN_K = 160
_FAST: dict[str, object] = {}  # filled by the fast-decomposition module when present


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


def cosvd(
    W: torch.Tensor,
    C: torch.Tensor,
    *,
    rank: int | None = None,
    which: Which = "all",
    method: str = "fast",
    C_fix: torch.Tensor | None = None,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CO-SVD of ``W`` ``(m, n)`` under covariance ``C`` ``(n, n)``; batches ``(B, m, n)`` too.

    ``C`` is damped by the CorDA rule (:func:`~corda_kernels.damping.damp_covariance`) unless ``C_fix`` is given.
    Returns ``(U, S, V)``: ``U`` ``(m, r)``, ``S`` ``(r,)`` descending, ``V`` ``(n, r)`` float32,
    the ``rank`` largest (``which="top"``), smallest (``"bottom"``) or all ``k`` triplets.
    ``method="fast"`` (default) takes :mod:`corda_kernels.fast_cosvd` for ``top``/``bottom`` where
    ``min(m, n) ≥ FAST_MIN_K`` (below, the exact SVD is the cheaper; ``all`` is always exact); a
    dict passed as ``info`` receives the method used and its accuracy estimate.
    """
    if which not in ("top", "bottom", "all"):
        raise ValueError(f"cosvd: which must be 'top', 'bottom' or 'all', got {which!r}")
    if method not in _METHODS:
        raise ValueError(f"cosvd: method must be one of {_METHODS}, got {method!r}")
    if W.dim() not in (2, 3) or C.shape[-1] != W.shape[-1] or C.shape[-2] != W.shape[-1]:
        raise ValueError(f"cosvd: W {tuple(W.shape)} and C {tuple(C.shape)} do not match (W is out×in, C in×in)")
    k = min(W.shape[-2], W.shape[-1])
    if which != "all" and (rank is None or not 0 < rank <= k):
        raise ValueError(f"cosvd: rank {rank} must be in [1, {k}] for W of shape {tuple(W.shape)}")
    if C_fix is None:
        C_fix = damp_covariance(C.float())[0]
    fast = _FAST.get("cosvd")
    if method == "fast" and fast is not None and which != "all" and k >= FAST_MIN_K:
        return fast(W, C_fix, rank=rank, which=which, info=info)  # type: ignore[operator]
    if info is not None:
        info["method"] = "exact"
    U, S, V = torch.ops.corda_kernels.cosvd_full(W, C_fix)
    return select(U, S, V, rank, which)


from . import fast_cosvd as _fast_cosvd  # noqa: E402,F401  (registers _FAST["cosvd"])
