"""Shared pieces of the fast CO-SVD iterations: tolerances, orthogonalization, Ritz values,
convergence estimates (used by :mod:`.top` and :mod:`.bottom`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

TOP_TOL = 1e-4  # target relative accuracy of the top-r singular values (the tests ask 1e-3)
BOTTOM_TOL = 1e-4  # target eigen-residual of the bottom-r Ritz vectors (the tests ask 5e-3 on values)
BOTTOM_CERTIFY = 2e-3  # a bottom result whose estimated relative σ error exceeds this is not accepted


def default_oversample(rank: int, k: int) -> int:
    """Oversampling ``p`` for the subspace iterations: ``r/2 + 8``, capped so that ``r + p ≤ k``."""
    return max(0, min(rank // 2 + 8, k - rank))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small LAPACK calls (``l×l`` eigh / Cholesky) on one thread.

    MKL's multi-threaded ``syevd`` / ``potrf`` on a 200×200 matrix can take seconds on a busy
    machine (measured 4.5 s against 12 ms single-threaded on 2 shared cores).
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _own_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a fresh one seeded 0: the random starts never draw from (and so never
    shift) the caller's global RNG stream, and the same inputs give the same triplets."""
    return torch.Generator().manual_seed(0) if generator is None else generator


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``Y`` ``(B, d, l)`` in ``Y``'s dtype.

    Columns are normalized first (the iterations scale them by very different factors), then
    CholeskyQR2 with the Gram matrices in float64 (BLAS-3, much faster on CPU than LAPACK's
    tall-skinny QR); Householder QR where the Cholesky fails (a nearly dependent block).
    """
    Yn = Y / Y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
    Q = Yn.double()
    for _ in range(2):
        G = Q.transpose(-1, -2) @ Q
        with _one_thread():
            L, info = torch.linalg.cholesky_ex(G)
        if bool((info != 0).any()):
            return torch.linalg.qr(Yn).Q
        Q = torch.linalg.solve_triangular(L.transpose(-1, -2), Q, upper=True, left=False)
    return Q.to(Y.dtype)


def _orth_against(Y: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Orthonormal block ``(B, d, b)`` orthogonal to the orthonormal ``K`` ``(B, d, w)``, from ``Y``.

    A Krylov block near convergence lies almost inside ``span(K)``: what is left after the
    projection can be nearly rank deficient, and orthonormalizing it (CholeskyQR) would amplify
    its leftover components along ``K`` by the block's condition number. So: project twice,
    take the eigendecomposition of the float64 Gram matrix of the column-normalized remainder,
    whiten the directions with eigenvalue above ``ε`` of ``Y``'s dtype (their leftover along
    ``K`` grows at most to ``√ε``) and put fixed random directions in place of the others, then
    project and orthonormalize once more, on a block that is now well conditioned.
    """
    dt = Y.dtype
    for _ in range(2):
        Y = Y - K @ (K.transpose(-1, -2) @ Y)
    Y64 = (Y / Y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(dt).tiny)).double()
    with _one_thread():
        lam, Vg = torch.linalg.eigh(Y64.transpose(-1, -2) @ Y64)
    keep = lam > torch.finfo(dt).eps
    P = (Y64 @ Vg) / lam.clamp_min(torch.finfo(torch.float64).tiny).sqrt().unsqueeze(-2)
    if not bool(keep.all()):
        gen = torch.Generator().manual_seed(len(lam.flatten()))
        R = torch.randn(P.shape, generator=gen, dtype=torch.float64).to(P.device)
        P = torch.where(keep.unsqueeze(-2), P, R)
    P = P.to(dt)
    for _ in range(2):
        P = P - K @ (K.transpose(-1, -2) @ P)
    return _orth(P)


def _bordered(G: torch.Tensor | None, cross: torch.Tensor, corner: torch.Tensor) -> torch.Tensor:
    """The symmetric ``[[G, cross], [crossᵀ, corner]]`` (``corner`` alone when ``G`` is ``None``):
    a Krylov basis's projected matrix grown by one block."""
    if G is None:
        return corner
    return torch.cat([torch.cat([G, cross], -1), torch.cat([cross.transpose(-1, -2), corner], -1)], -2)


_KRYLOV_MAX_BLOCKS = 12  # a Krylov basis of more blocks hands over to subspace iteration
# The bottom's basis may grow to 24 blocks of up to 1024 columns in all: its steps are triangular
# solves, and on the clustered bottom of a wide layer (gaps σ_{k−r}/σ_{k−r+1} ≈ 1.0004) subspace
# iteration after 12 blocks needed 36 more iterations where Krylov needed 6 more steps
# (4096×11008, r = 16: 4.1 s → 1.5 s; r = 64: 5.6 s → 3.7 s).
_BOTTOM_MAX_BLOCKS = 24
_BOTTOM_MAX_COLUMNS = 1024


def _krylov_max_basis(k: int, ell: int, b: int, max_blocks: int | None = None) -> int:
    """Columns a Krylov basis of blocks of ``b`` may reach in dimension ``k`` (0: no room, ``k < 4·l``).

    At least ``ell + b``, so that it always reaches the ``ell`` Ritz pairs the stopping rule
    and the hand-over need; at most ``max_blocks`` blocks (default ``_KRYLOV_MAX_BLOCKS``).
    """
    blocks = _KRYLOV_MAX_BLOCKS if max_blocks is None else max_blocks
    return min(k, max(blocks * b, ell + b)) if k >= 4 * ell and b > 0 else 0


def _ritz(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular structure of a tall ``Z`` ``(B, d, l)`` from its float64 Gram matrix.

    Returns ``(S, Yt)``: ``S`` ``(B, l)`` descending with ``S_i = ‖Z ỹ_i‖`` (computed from the
    product, not from the squared eigenvalue) and ``Yt`` ``(B, l, l)`` orthogonal (columns ỹ_i),
    so ``Z Yt`` has orthogonal columns of norms ``S``. Used for Rayleigh–Ritz; the squaring only
    affects vectors inside the block, whose values are re-measured.
    """
    Z64 = Z.double()
    G = Z64.transpose(-1, -2) @ Z64
    with _one_thread():
        _, Yt = torch.linalg.eigh(G)
    Yt = Yt.flip(-1)
    S = (Z64 @ Yt).norm(dim=-2)
    return S, Yt


def _estimate_remaining(hist: list[torch.Tensor]) -> torch.Tensor:
    """Extrapolated remaining relative change of each Ritz value, ``(B, r)``.

    ``hist`` holds the Ritz values ``(B, r)`` of successive iterations. With the last two
    relative changes ``d_j``, ``d_{j-1}`` and ``ρ = d_j/d_{j-1}`` (clipped to 0.9) the remaining
    change of a geometric sequence is ``d_j·ρ/(1−ρ)``; the estimate is ``max(that, d_j)``.
    """
    if len(hist) < 3:
        return torch.full(hist[-1].shape, math.inf, dtype=torch.float64)
    a, b, c = (h.double() for h in hist[-3:])
    d1 = (b - a).abs() / c.abs().clamp_min(1e-300)
    d2 = (c - b).abs() / c.abs().clamp_min(1e-300)
    rho = (d2 / d1.clamp_min(1e-300)).clamp(0.0, 0.9)
    return torch.maximum(d2 * rho / (1 - rho), d2)
