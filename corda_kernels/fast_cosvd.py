"""Fast CO-SVD: the top ``r`` (IPM) or bottom ``r`` (KPM) triplets of ``M = W·C_fix`` only.

Shapes: ``W`` ``(m, n)`` or a batch ``(B, m, n)`` of same-shaped layers, ``C_fix`` ``(n, n)`` /
``(B, n, n)`` (already damped, symmetric positive definite); ``k = min(m, n)``. Every entry
point returns float32 ``U`` ``(…, m, r)``, ``S`` ``(…, r)`` descending and ``V`` ``(…, n, r)``
with ``V = (Vh·C_fix⁻¹)ᵀ`` restricted to the chosen triplets (DESIGN §3.3), plus a list of
per-matrix ``info`` dicts (method, iterations, accuracy estimates).

Top ``r`` (:func:`top_r`): randomized block Krylov iteration on ``M`` applied implicitly as
``W·(C·X)`` / ``C·(Wᵀ·Y)`` in float32: blocks of ``b = p`` columns, the basis
``[K, MMᵀK, (MMᵀ)²K, …]`` kept whole and orthonormal (:func:`_orth_against`), so every product
with ``M`` counts — about half the products of subspace iteration on ``l = r + p`` columns for
the same residuals on the embedded model's layers. Where the basis
has no room (``min(m, n) < 4·l``) or reaches 12 blocks, plain subspace iteration on ``l``
columns takes over. Each step is also a Rayleigh–Ritz step, so it yields the Ritz values
``σ̃_1..σ̃_l`` (lower bounds of ``σ_i`` that increase monotonically) and the Ritz residuals
``‖M v_i − σ̃_i u_i‖`` for free. Stopping is adaptive, on either of two criteria for every ``i ≤ r``: the relative
residual below ``tol`` (vectors converged; reached whenever ``σ_r/σ_{r+p+1}`` is not ~1,
whatever the gap at ``r``, thanks to the oversampling), or the estimated remaining relative
change of the Ritz value (last change times ``ρ/(1−ρ)``, ``ρ`` the observed contraction)
below ``tol/100`` — the values, and with them the captured energy
``Σ_{i≤r} σ̃_i² = ‖P_r M‖_F²``, converge with or without any gap, so this criterion stops flat
spectra (it must hold on two consecutive steps). The tolerances are raised to float32's
resolution (``30·u₃₂·σ̃_1/σ̃_i`` for residuals, ``u₃₂·σ̃_1/σ̃_i`` for values); capped iterations.
Where that float32 floor exceeds 1e-2 (heavy-head layers, ``σ_1/σ_r ≳ 5e3``; one down_proj of
the embedded model has 7.8e4) the iteration continues from its basis in float64.
A final Rayleigh–Ritz step in float64 on the top ``r + 8`` Ritz vectors gives the triplets and a
posterior residual bound ``max_i ‖M v_i − σ̃_i u_i‖/σ̃_i`` (some singular value of ``M`` lies
within it of each ``σ̃_i``), measured with one float32 product (float64 after the float64
continuation). Above ``n = 4096`` the float32 products take the row-panel form ``(Xᵀ·C)·Wᵀ``,
faster with thin blocks.

Bottom ``r`` (:func:`bottom_r`): everything in float64 (PEFT's fp32 product + fp32 SVD cannot
resolve the bottom of a spectrum spanning 6–8 decades). ``A`` is the tall orientation of
``M`` (``Mᵀ`` for ``m ≤ n``: the wanted vectors are ``U``; ``M`` for ``m > n``: ``V``). Block
Krylov on the inverse operator ``T = (AᵀA)⁻¹`` (blocks of ``p`` columns, where the basis has
room), then block inverse subspace iteration ``X ← orth(T X)`` with ``l = r + p`` columns from
``T`` applied to the Krylov Ritz vectors: those vectors combine every block, including the
first ones' components along the top of ``A``, which one more application of ``T`` damps by
``(σ_i/σ_top)²`` before the values are measured with ``A``. The inverse is applied through a
factorization, tried in this order where it applies (square ``W``: ``lu``, ``qr``, ``eigh``,
``gram``; otherwise ``eigh``, ``gram``, ``qr``):

* ``lu`` (square ``W``, thin blocks): ``(MMᵀ)⁻¹ = W⁻ᵀC⁻²W⁻¹`` from an LU of ``W`` and a Cholesky
  of ``C`` — ``M`` is never formed;
* ``eigh`` (``k ≤ 1024``): no iteration at all — the bottom eigenvectors of the float64 Gram
  matrix ``AᵀA`` from one dense ``eigh``, the values re-measured with ``A``; accurate to
  ``ε₆₄·κ(M)²``, which its own eigenvalues give exactly (the non-square layers of the embedded
  model: ``κ² ≈ 1e6``);
* ``gram``: the Cholesky factor ``F`` of the float64 Gram matrix ``AᵀA`` (formed by row panels
  of ``A``, upper blocks only: :func:`_gram64`), accurate
  only to ``ε₆₄·κ(M)²`` (fails for real q_proj layers, ``κ ≈ 1e8``);
* ``qr``: the ``R`` of a float64 Householder QR of ``A``, accurate to ``ε₆₄·κ(M)``.

A factor whose a-priori error (from cheap power-iteration estimates of the condition numbers)
exceeds the certification level is skipped. The iteration stops when the eigen-residuals of
the Ritz vectors for the inverse operator are below ``tol`` (these are measurable to
``ε·κ``; a residual with ``AᵀA`` itself is not measurable below ``ε·κ²``) or the Ritz values
stall. The estimate ``factor error + residual/2`` bounds the relative error of the bottom
singular values; if it exceeds ``certify`` for every factor, the exact full SVD is taken and
``info["method"] = "exact-fallback"`` records it. The values are finally measured with the
exact float64 ``M``.

In both paths ``V = Wᵀ·U·diag(S)⁻¹``: for a Ritz pair with ``Mᵀu = σ̃ v`` exactly (how they
are built) this *is* ``C_fix⁻¹v``, and ``U diag(S) Vᵀ = U Uᵀ W``, the projection of ``W``.
For ``m > n`` (bottom) ``V = C_fix⁻¹ v`` is a Cholesky solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .decomposition import _FAST, select
from .linalg import lu_factor_ex

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


# ---------------------------------------------------------------------------------------------
# top r (IPM)
# ---------------------------------------------------------------------------------------------
_F64_FLOOR = 1e-2  # float32 residual floor above which the top iteration continues in float64
_FINAL_EXTRA = 8  # Ritz vectors beyond r in the top's final float64 Rayleigh–Ritz step
_ROWS_MIN_N = 4096  # above this n the top's float32 products take the row-panel form (top_r)


# The float64 products of M = W·C with a thin block are taken on row panels: (Xᵀ·W)·C rather
# than C·(Wᵀ·X). MKL's float64 GEMM with a thin right operand runs at 7–12 GFLOP/s on one
# core, with a thin left operand at 18–26 (measured at n = 4096, l = 16–32; float32 cares only
# for large n, where top_r uses the same helpers). C_fix is symmetric, so both forms are the
# same product.
_MM64_ROWS = 512  # rows of a float32 operand converted to float64 at a time by _mm64


def _mm64(Xt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``Xt @ A`` in ``Xt``'s dtype for ``Xt`` ``(B, l, p)`` and ``A`` ``(B, p, q)`` of any float dtype.

    A float32 ``A`` is converted ``_MM64_ROWS`` rows at a time into one reused buffer: a whole
    float64 copy of an 11008² covariance is 970 MB of fresh pages, whose first touch cost
    0.5–2.8 s on this machine, more than the product itself.
    """
    if A.dtype == Xt.dtype:
        return Xt @ A
    p = A.shape[-2]
    buf = torch.empty(*A.shape[:-2], min(p, _MM64_ROWS), A.shape[-1], dtype=Xt.dtype, device=A.device)
    out = None
    for i in range(0, p, _MM64_ROWS):
        h = min(_MM64_ROWS, p - i)
        blk = buf[..., :h, :]
        blk.copy_(A[..., i : i + h, :])
        if out is None:
            out = Xt[..., i : i + h] @ blk
        else:  # in place: a wide output (M itself) would otherwise cost a temporary per block
            out.baddbmm_(Xt[..., i : i + h], blk) if out.dim() == 3 else out.addmm_(Xt[..., i : i + h], blk)
    assert out is not None
    return out


_GRAM_PANEL = 512  # rows of the tall A formed at a time, and the block width of AᵀA, in _gram64


def _gram64(W64: torch.Tensor, C: torch.Tensor, wide: bool) -> torch.Tensor:
    """``AᵀA`` ``(B, k, k)`` in float64 for the tall ``A``: ``Mᵀ = C·Wᵀ`` if ``wide``, else ``M = W·C``.

    ``W64`` ``(B, m, n)`` float64, ``C`` ``(B, n, n)`` symmetric, any float dtype. ``A`` is formed
    ``_GRAM_PANEL`` rows at a time, never whole (a wide layer's ``C`` is converted to float64 a
    panel at a time too: its whole float64 copy at n = 11008 is 970 MB of fresh pages), and only
    the blocks on and above the diagonal of ``AᵀA`` are accumulated (0.56 of the Gram's flops
    at k = 4096), then mirrored.
    """
    Bn, m, n = W64.shape
    k, rows = (m, n) if wide else (n, m)
    G = torch.zeros(Bn, k, k, dtype=torch.float64, device=W64.device)
    C64 = None if wide else C.to(torch.float64)
    for i in range(0, rows, _GRAM_PANEL):
        h = min(_GRAM_PANEL, rows - i)
        if wide:  # rows of C·Wᵀ
            P = C[..., i : i + h, :].to(torch.float64) @ W64.transpose(-1, -2)
        else:  # rows of W·C
            assert C64 is not None
            P = W64[..., i : i + h, :] @ C64
        for j in range(0, k, _GRAM_PANEL):
            e = min(k, j + _GRAM_PANEL)
            G[..., :e, j:e].baddbmm_(P[..., :e].transpose(-1, -2), P[..., j:e])
    return G.triu() + G.triu(1).transpose(-1, -2)


def _mt_rows(W: torch.Tensor, C: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Mᵀ Q, Qᵀ W)`` in ``Q``'s dtype for ``Q`` ``(B, m, l)``: ``(B, n, l)`` (a transposed view), ``(B, l, n)``."""
    QtW = _mm64(Q.transpose(-1, -2), W)
    return _mm64(QtW, C).transpose(-1, -2), QtW


def _m_rows(W: torch.Tensor, C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M X = W·C·X`` in ``X``'s dtype for ``X`` ``(B, n, l)`` as ``((Xᵀ C) Wᵀ)ᵀ`` (a transposed view)."""
    return _mm64(_mm64(X.transpose(-1, -2), C), W.transpose(-1, -2)).transpose(-1, -2)


def _top_stop(
    rel_res: torch.Tensor, hist: list[torch.Tensor], unit: float, tol: float, stall_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-r stopping rule (module doc) after one step, for both iterations.

    ``rel_res`` ``(B, r)`` relative Ritz residuals, ``hist`` the Ritz values ``(B, r)`` so far,
    ``unit`` the working precision's unit roundoff, ``stall_prev`` ``(B,)`` the value criterion of
    the step before. Returns the extrapolated remaining change ``(B, r)``, ``σ̃_1/σ̃_r`` ``(B,)``,
    whether to stop ``(B,)`` and this step's value criterion ``(B,)``.
    """
    est = _estimate_remaining(hist)
    Sc = hist[-1]
    # the working precision cannot resolve σ_i better than ~unit·σ_1: no criterion below that floor
    ratio = Sc[..., :1] / Sc.clamp_min(1e-300)
    res_ok = (rel_res <= torch.clamp(30 * unit * ratio, min=tol)).all(-1)
    val_ok = (est <= torch.clamp(unit * ratio, min=tol * 1e-2)).all(-1)
    # the value criterion must hold on two consecutive steps: one noisy ρ must not stop it
    return est, ratio[..., -1], res_ok | (val_ok & stall_prev), val_ok


def _top_iterate(
    mv: Callable[[torch.Tensor], torch.Tensor],
    mtv: Callable[[torch.Tensor], torch.Tensor],
    Q: torch.Tensor,
    rank: int,
    tol: float,
    max_iters: int,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Adaptive subspace iteration in ``Q``'s dtype (float32 or float64), see the module doc.

    ``Q`` ``(B, m, l)`` orthonormal start. Returns the last basis, the iteration count, the
    extrapolated remaining relative change of the Ritz values ``(B, r)`` and ``σ̃_1/σ̃_r`` ``(B,)``.
    """
    Bn = Q.shape[0]
    unit = torch.finfo(Q.dtype).eps / 2
    tiny = torch.finfo(Q.dtype).tiny
    hist: list[torch.Tensor] = []
    iters = 0
    est = torch.full((Bn, rank), math.inf, dtype=torch.float64)
    kappa = torch.ones(Bn, dtype=torch.float64)
    stall_prev = torch.zeros(Bn, dtype=torch.bool)
    while iters < max_iters:
        iters += 1
        Z = mtv(Q)  # (B, n, l) = Mᵀ Q
        S, Yt = _ritz(Z)  # Ritz values S; u_i = Q ỹ_i, v_i = Z ỹ_i / σ_i
        Yt = Yt.to(Q.dtype)
        Y = mv(Z) @ Yt  # M Mᵀ Q, rotated to the Ritz basis: column i ≈ σ_i² u_i
        Sr = S[..., :rank].to(Q.dtype).clamp_min(tiny)
        # Ritz pair i: M v − σ u = Y_i/σ − σ Q ỹ_i
        res = Y[..., :rank] / Sr.unsqueeze(-2) - (Q @ Yt[..., :rank]) * Sr.unsqueeze(-2)
        rel_res = (res.norm(dim=-2) / Sr).double().cpu()
        hist.append(S[..., :rank].cpu())
        Q = _orth(Y)
        est, kappa, stop, stall_prev = _top_stop(rel_res, hist, unit, tol, stall_prev)
        if bool(stop.all()):
            break
    return Q, iters, est, kappa


def _top_krylov(
    mv: Callable[[torch.Tensor], torch.Tensor],
    mtv: Callable[[torch.Tensor], torch.Tensor],
    K0: torch.Tensor,
    rank: int,
    ell: int,
    tol: float,
    max_steps: int,
    max_basis: int,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, bool]:
    """Block Krylov iteration in ``K0``'s dtype for the top of ``M``, the same stopping rule as ``_top_iterate``.

    ``K0`` ``(B, m, b)`` orthonormal first block. Step ``j`` forms ``Z_j = Mᵀ K_j`` and ``Y_j = M Z_j``
    (the same four products as a subspace-iteration step with ``b`` columns), does Rayleigh–Ritz
    on the whole basis ``K = [K_0 … K_j]`` from the Gram matrix of ``[Z_0 … Z_j] = Mᵀ K`` (kept up
    to date block by block, float64) and orthogonalizes ``Y_j`` against ``K`` (:func:`_orth_against`)
    for the next block. The Ritz residuals ``M v_i − σ̃_i u_i`` come from the stored ``[Y_0 … Y_j] = M Mᵀ K``.
    Keeping every block makes each product count: on the embedded model's layers this reaches
    the tolerance with about half the products of subspace iteration at ``l = r + p``.

    Returns the top ``ell`` Ritz vectors ``(B, m, ell)`` (orthonormal), the step count, the
    extrapolated remaining relative change of the Ritz values ``(B, r)``, ``σ̃_1/σ̃_r`` ``(B,)`` and
    whether the stopping rule was met (else the basis reached ``max_basis`` columns or
    ``max_steps`` steps were taken).
    """
    Bn = K0.shape[0]
    unit = torch.finfo(K0.dtype).eps / 2
    tiny = torch.finfo(K0.dtype).tiny
    K, Zc64, Yc = K0, None, None  # basis, [Z_0 … Z_j] in float64, [Y_0 … Y_j]
    G = None  # Zc64ᵀ Zc64
    hist: list[torch.Tensor] = []
    stall_prev = torch.zeros(Bn, dtype=torch.bool)
    block = K0
    steps = 0
    while True:
        steps += 1
        Z = mtv(block)
        Y = mv(Z)
        Z64 = Z.double()
        if Zc64 is None or Yc is None:
            G, Zc64, Yc = _bordered(None, Z64, Z64.transpose(-1, -2) @ Z64), Z64, Y
        else:
            G = _bordered(G, Zc64.transpose(-1, -2) @ Z64, Z64.transpose(-1, -2) @ Z64)
            Zc64, Yc = torch.cat([Zc64, Z64], -1), torch.cat([Yc, Y], -1)
        width = K.shape[-1]
        # always grow to ell columns (max_basis ≥ ell + b, _krylov_max_basis), then within the limits
        grows = width + block.shape[-1] <= max_basis and (steps < max_steps or width < ell)
        if width >= ell:  # enough Ritz pairs to judge (and to hand over)
            with _one_thread():
                theta, Yt = torch.linalg.eigh((G + G.transpose(-1, -2)) / 2)
            Yt = Yt.flip(-1)[..., :ell]
            # ‖Mᵀ u_i‖ = √θ_i: float64 θ is good to ε₆₄·(σ_1/σ_i)², far below float32 Z's own
            # error; measuring ‖Zc Yt‖ instead cost a float64 (n × basis × l) product a step
            S = theta.flip(-1)[..., :ell].clamp_min(0).sqrt()
            Ytr = Yt[..., :rank].to(K.dtype)
            Sr = S[..., :rank].to(K.dtype).clamp_min(tiny)
            res = (Yc @ Ytr) / Sr.unsqueeze(-2) - (K @ Ytr) * Sr.unsqueeze(-2)  # M v_i − σ̃_i u_i
            rel_res = (res.norm(dim=-2) / Sr).double().cpu()
            hist.append(S[..., :rank].cpu())
            est, kappa, stop, stall_prev = _top_stop(rel_res, hist, unit, tol, stall_prev)
            done = bool(stop.all())
            if done or not grows:
                return _orth(K @ Yt.to(K.dtype)), steps, est, kappa, done
        block = _orth_against(Y, K)
        K = torch.cat([K, block], -1)


def top_r(
    W: torch.Tensor,
    C_fix: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    tol: float = TOP_TOL,
    max_iters: int = 40,
    generator: torch.Generator | None = None,
    krylov: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Top-``rank`` CO-SVD triplets by adaptive randomized block Krylov / subspace iteration (module doc).

    ``W`` ``(B, m, n)``, ``C_fix`` ``(B, n, n)`` (any float dtype; iterations in float32, the
    final Rayleigh–Ritz step and ``V`` in float64). ``krylov``: ``None`` picks block Krylov where
    the basis has room (``min(m, n) ≥ 4·l``) and ``l ≤ 4·p``; ``False`` forces subspace iteration,
    ``True`` Krylov wherever the basis has room.
    ``max_iters`` bounds the Krylov steps plus iterations. Returns float32 ``U`` ``(B, m, r)``,
    ``S`` ``(B, r)`` descending, ``V`` ``(B, n, r)`` and one info dict per matrix.
    """
    Bn, m, n = W.shape
    generator = _own_generator(generator)
    k = min(m, n)
    p = default_oversample(rank, k) if oversample is None else max(0, min(oversample, k - rank))
    ell = rank + p
    # block Krylov with blocks of b = p columns where the basis has room to grow (k ≥ 4·l) and
    # l ≤ 4·b; subspace iteration on l columns otherwise (small matrices: cheap either way)
    max_basis = _krylov_max_basis(k, ell, p) if (4 * p >= ell if krylov is None else krylov) else 0
    b = p if max_basis else ell
    W32 = W.float()
    C32 = C_fix.float()
    dev = W.device

    # M applied implicitly costs 2·b·(n² + m·n) per step, explicitly 2·b·m·n after m·n² once:
    # form it when m < 12·b (about six steps amortize it).
    M32 = W32 @ C32 if m < 12 * b else None

    matvecs = [0]  # columns multiplied by M or Mᵀ, all precisions

    # float32 products with a thin block: on a wide layer's 11008² C the row-panel form
    # (Xᵀ·C)·Wᵀ runs at 57–62 GFLOP/s against 45–48 for C·X with a thin right operand (1 thread,
    # b = 40); at n ≤ 4096 the two are even (measured in situ), so the plain form is kept there
    rows = M32 is None and n > _ROWS_MIN_N

    def mv(X: torch.Tensor) -> torch.Tensor:  # M X = W (C X)
        matvecs[0] += X.shape[-1]
        if M32 is not None:
            return M32 @ X
        if rows:
            return _m_rows(W32, C32, X)
        return W32 @ (C32 @ X)

    def mtv(Y: torch.Tensor) -> torch.Tensor:  # Mᵀ Y = C (Wᵀ Y)
        matvecs[0] += Y.shape[-1]
        if M32 is not None:
            return M32.mT @ Y
        if rows:
            return _mt_rows(W32, C32, Y)[0]
        return C32 @ (W32.mT @ Y)

    omega = torch.randn(Bn, n, b, generator=generator, dtype=torch.float32, device="cpu").to(dev)
    Q = _orth(mv(omega))
    u32 = torch.finfo(torch.float32).eps / 2
    iters, done = 0, False
    if max_basis:
        Q, iters, est, kappa, done = _top_krylov(mv, mtv, Q, rank, ell, tol, max_iters, max_basis)
    krylov_steps = iters
    if not done and iters < max_iters:  # no Krylov basis, or it reached its size limit: subspace iteration
        Q, more, est, kappa = _top_iterate(mv, mtv, Q, rank, tol, max_iters - iters)
        iters += more
    # float32 cannot resolve the Ritz residuals below ~30·u₃₂·σ_1/σ_i; the final float64
    # Rayleigh–Ritz step makes the values accurate to about that floor squared. On heavy-head
    # layers (σ_1/σ_r ≳ 5e3: floor > 1e-2) that is not enough: continue in float64 from the basis.
    need = (30 * u32 * kappa > _F64_FLOOR).nonzero().flatten().tolist()
    if need and iters < max_iters:  # only those matrices of the batch
        W64_, C64_ = W[need].double(), C_fix[need].double()

        def mv64(X: torch.Tensor) -> torch.Tensor:
            matvecs[0] += X.shape[-1]
            return _m_rows(W64_, C64_, X)

        def mtv64(Y: torch.Tensor) -> torch.Tensor:
            matvecs[0] += Y.shape[-1]
            return _mt_rows(W64_, C64_, Y)[0]

        Q64_, more, est_need, _ = _top_iterate(
            mv64,
            mtv64,
            _orth(Q[need].double()),
            rank,
            tol,
            max_iters - iters,
        )
        Q = Q.double()
        Q[need] = Q64_
        est[need] = est_need
        iters += more
        del W64_, C64_, Q64_
    # final Rayleigh–Ritz in float64 on the converged basis's leading r + 8 columns (its columns
    # are Ritz vectors, descending: the rest changes the top r only at the order of the squared
    # residual, while the float64 products cost in proportion to the columns); W and C_fix enter
    # in their own dtype, _mm64 converts them block by block
    Q64 = _orth(Q[..., : rank + min(p, _FINAL_EXTRA)].double())
    Z, QtW = _mt_rows(W, C_fix, Q64)  # Mᵀ Q
    matvecs[0] += Q64.shape[-1]
    S, Yt = _ritz(Z)
    Yt = Yt[..., :rank]
    U = Q64 @ Yt
    Sr = S[..., :rank]
    Pr = (Z @ Yt) / Sr.unsqueeze(-2)  # v_i: Mᵀ u_i = σ_i v_i
    V = (Yt.transpose(-1, -2) @ QtW).transpose(-1, -2) / Sr.unsqueeze(-2)  # Wᵀ U = C⁻¹ v for these pairs
    # the posterior residual M v_i − σ_i u_i: in float32 (one product of r columns) where the
    # iteration ran in float32 — it resolves residuals down to ~u₃₂·σ_1/σ_i, below the tolerance
    # there; in float64 where a matrix needed the float64 continuation (heavy head)
    if need:
        matvecs[0] += Pr.shape[-1]
        MPr = _m_rows(W, C_fix, Pr)
    else:
        MPr = mv(Pr.float()).double()  # mv counts its columns
    res = MPr - U * Sr.unsqueeze(-2)
    rel_res = (res.norm(dim=-2) / Sr).cpu()
    infos = []
    for b in range(Bn):
        s_next = float(S[b, rank]) if S.shape[-1] > rank else 0.0
        gap = float(Sr[b, -1]) - s_next
        res_f = float(res[b].norm())
        infos.append(
            {
                "method": "fast-ipm",
                "iterations": iters,
                "krylov_steps": krylov_steps,
                "matvecs": matvecs[0],
                "oversample": p,
                "sv_rel_bound": float(rel_res[b].max()),
                "sv_change_est": float(est[b].max()),
                "subspace_sin_est": res_f / gap if gap > 0 else math.inf,
            }
        )
    return U.float(), Sr.float(), V.float(), infos


# ---------------------------------------------------------------------------------------------
# bottom r (KPM)
# ---------------------------------------------------------------------------------------------
_tri = torch.linalg.solve_triangular


def _power_norm(
    apply: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    iters: int = 8,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``‖op‖₂`` estimate ``(B,)`` (on the CPU) of a symmetric positive operator ``apply`` on ``(B, d, 1)``."""
    x = torch.ones(*shape, 1, dtype=torch.float64, device=device)
    lam = torch.zeros(shape[0], dtype=torch.float64, device=device)
    for _ in range(iters):
        y = apply(x)
        lam = y.norm(dim=(-2, -1))
        x = y / lam.view(-1, 1, 1).clamp_min(1e-300)
    return lam.cpu()


def _bottom_stop(rel: torch.Tensor, est: torch.Tensor, tol: float) -> bool:
    """The bottom-r stopping rule for the whole batch: every eigen-residual ``rel`` ``(B, r)`` of the
    inverse operator below ``tol``, or every value's extrapolated remaining change ``est`` below
    ``1e-2·tol²`` (the values have stalled)."""
    return bool(((rel.amax(-1) <= tol) | (est.amax(-1) <= 1e-2 * tol * tol)).all())


def _bottom_iterate(
    apply_inv: Callable[[torch.Tensor], torch.Tensor],
    apply_ritz: Callable[[torch.Tensor], torch.Tensor] | None,
    apply_A: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    rank: int,
    ell: int,
    *,
    tol: float,
    max_iters: int,
    generator: torch.Generator | None,
    device: torch.device,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Block inverse subspace iteration for the bottom right singular vectors of a tall ``A``.

    ``shape = (B, k)``; ``apply_inv(X)`` ≈ ``(AᵀA)⁻¹X`` (triangular / LU solves),
    ``apply_ritz(X)`` a matrix ``G X`` with ``GᵀG ≈ AᵀA`` for the Rayleigh–Ritz steps, or
    ``None``: Rayleigh–Ritz with the inverse operator itself on the products the iteration
    forms anyway (``XᵀT``, ``T = apply_inv(X)``), for paths where ``G`` would cost as much as a
    step; ``apply_A(X)`` the exact float64 ``A X`` for the final values. Returns ``X``
    ``(B, k, r)`` (ascending σ), ``P = A X / σ``, ``S`` ``(B, r)`` ascending, the relative
    eigen-residuals of the Ritz vectors for the inverse operator ``(B, r)`` (``‖T x − μ x‖/μ``,
    ``μ = xᵀ T x``; measurable to ``ε·κ``, unlike a residual with ``AᵀA`` itself, ``ε·κ²``), the
    iteration count and the extrapolated remaining change of the Ritz values ``(B, r)``.
    """
    Bn, k = shape
    # a start from the Krylov phase (T·Ritz vectors) is judged after its first Rayleigh–Ritz step
    warm = start is not None and apply_ritz is None
    if start is None:
        start = torch.randn(Bn, k, ell, generator=generator, dtype=torch.float64).to(device)
    X = _orth(start)  # (B, k, l)
    hist: list[torch.Tensor] = []
    est = torch.full((Bn, rank), math.inf, dtype=torch.float64)
    rel = torch.full((Bn, rank), math.inf, dtype=torch.float64)
    it = 0
    for it in range(max_iters + 1):
        T = apply_inv(X)
        if apply_ritz is None:  # Ritz pairs of (AᵀA)⁻¹ on span(X): the largest θ = 1/σ² first
            H = X.transpose(-1, -2) @ T
            with _one_thread():
                theta, Yt = torch.linalg.eigh((H + H.transpose(-1, -2)) / 2)
            Yt, theta = Yt.flip(-1), theta.flip(-1)
            X, T = X @ Yt, T @ Yt
            hist.append(theta[..., :rank].clamp_min(1e-300).rsqrt().cpu())
        if it > 0 or warm:  # X holds Ritz vectors, ascending σ
            Xr, Tr = X[..., :rank], T[..., :rank]
            mu = (Xr * Tr).sum(-2, keepdim=True)
            rel = ((Tr - Xr * mu).norm(dim=-2) / mu.squeeze(-2).abs()).cpu()
            est = _estimate_remaining(hist)
            if _bottom_stop(rel, est, tol) or it == max_iters:
                break
        X = _orth(T)
        if apply_ritz is not None:
            S, Yt = _ritz(apply_ritz(X))
            Yt, S = Yt.flip(-1), S.flip(-1)  # ascending σ̃
            X = X @ Yt  # Ritz vectors
            hist.append(S[..., :rank].cpu())
    # final values and left vectors from the exact A: A x_i = σ_i p_i
    Z = apply_A(X[..., :rank])
    S = Z.norm(dim=-2)
    return X[..., :rank], Z / S.unsqueeze(-2), S, rel, it, est


def _bottom_krylov(
    apply_inv: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    rank: int,
    ell: int,
    b: int,
    *,
    tol: float,
    max_steps: int,
    max_basis: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Block Krylov on the inverse operator ``T = (AᵀA)⁻¹`` (float64), the stopping rule of ``_bottom_iterate``.

    Blocks of ``b`` columns: ``T K_j`` is orthogonalized against the whole basis ``K``
    (:func:`_orth_against`) for the next block; Rayleigh–Ritz uses ``H = Kᵀ T K``, assembled from the stored ``T K_j``
    (``T`` is symmetric, so each step adds one block column). Stops on the rule or at
    ``max_basis`` columns / ``max_steps`` steps. Returns ``T`` applied to the top ``ell`` Ritz
    vectors of ``T`` ``(B, k, ell)`` (from the stored products, not normalized), the step count
    and the extrapolated remaining change of the values ``(B, r)``.

    The Ritz vectors themselves are not the result: they combine every block, including the
    first ones' components along the top of ``A`` (σ up to 1e5 times the bottom's), and a
    residual of 1e-5 there still inflates ``‖A x‖`` by O(1). One more application of ``T``
    damps those components by ``(σ_i/σ_y)²``; the caller does one Rayleigh–Ritz step on it.
    """
    Bn, k = shape
    K = _orth(torch.randn(Bn, k, b, generator=generator, dtype=torch.float64).to(device))
    block, TK, H = K, None, None
    hist: list[torch.Tensor] = []
    steps = 0
    while True:
        steps += 1
        T = apply_inv(block)
        col = K.transpose(-1, -2) @ T  # K_iᵀ T K_j for every block i ≤ j
        H = _bordered(H, col[..., :-b, :], col[..., -b:, :])
        TK = T if TK is None else torch.cat([TK, T], -1)
        width = K.shape[-1]
        grows = width + b <= max_basis and (steps < max_steps or width < ell)
        if width >= ell:
            with _one_thread():
                theta, Yt = torch.linalg.eigh((H + H.transpose(-1, -2)) / 2)
            theta, Yt = theta.flip(-1)[..., :ell], Yt.flip(-1)[..., :ell]  # largest θ = 1/σ² first
            hist.append(theta[..., :rank].clamp_min(1e-300).rsqrt().cpu())
            X = K @ Yt
            mu = theta[..., :rank].unsqueeze(-2)
            rel = ((TK @ Yt[..., :rank] - X[..., :rank] * mu).norm(dim=-2) / mu.squeeze(-2).abs()).cpu()
            est = _estimate_remaining(hist)
            if _bottom_stop(rel, est, tol) or not grows:
                return TK @ Yt, steps, est
        block = _orth_against(T, K)
        K = torch.cat([K, block], -1)


def _max_abs(A: torch.Tensor) -> torch.Tensor:
    """``max |A_ij|`` per matrix of ``A`` ``(B, p, q)``, without an ``|A|`` temporary."""
    return torch.maximum(A.amax((-2, -1)), -A.amin((-2, -1)))


def _lu_row_order(pivots: torch.Tensor) -> torch.Tensor:
    """Row order ``perm`` ``(B, n)`` of LAPACK's 1-based row swaps ``pivots`` ``(B, n)``: ``(Pᵀ X)_i = X_perm[i]``."""
    rows = []
    for swaps in pivots.cpu().tolist():
        order = list(range(len(swaps)))
        for i, j in enumerate(swaps):
            order[i], order[j - 1] = order[j - 1], order[i]
        rows.append(order)
    return torch.tensor(rows, dtype=torch.int64, device=pivots.device)


_LU_MAX_BLOCK = 10  # the LU path needs l ≤ n/_LU_MAX_BLOCK to beat forming M and a QR of it
_LU_SMALL_N = 1024  # below, its fixed costs (norm estimates, per-matrix solves) need l ≤ n/30
_EIGH_MAX_K = 1024  # a dense float64 eigh of the k×k Gram beats the iterations up to about here


def _bottom_from_eigh(
    apply_A: Callable[[torch.Tensor], torch.Tensor],
    G: torch.Tensor,
    mu: torch.Tensor,
    vecs: torch.Tensor,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bottom ``rank`` right vectors of the tall ``A`` ``(B, R, k)`` (``apply_A(X) = A X`` in float64)
    from ``eigh(G = AᵀA) = (mu, vecs)``.

    Returns ``X`` ``(B, k, r)``, ``Pv = A X / S``, ``S`` ``(B, r)`` (ascending, re-measured with
    ``A`` by a Rayleigh–Ritz step on the r columns) and the eigen-residuals ``‖G x − μ x‖/μ`` ``(B, r)``.
    """
    X = vecs[..., :rank]
    rel = ((G @ X - X * mu[..., :rank].unsqueeze(-2)).norm(dim=-2) / mu[..., :rank].abs()).cpu()
    Z = apply_A(X)
    S, Yt = _ritz(Z)  # descending
    return (X @ Yt).flip(-1), (Z @ Yt / S.unsqueeze(-2)).flip(-1), S.flip(-1), rel


def _bottom_result(
    W64: torch.Tensor,
    C64: torch.Tensor,
    Lc: torch.Tensor | None,
    X: torch.Tensor,
    Pv: torch.Tensor,
    S: torch.Tensor,
    wide: bool,
    factor: str,
    counts: dict[str, int],
    bound: torch.Tensor,
    factor_err: torch.Tensor,
    rel: torch.Tensor,
    est: torch.Tensor,
    tried: list[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Certified bottom triplets → float32 ``U``, ``S`` (descending), ``V`` and the info dicts.

    ``X`` ``(B, k, r)`` are the right vectors of the tall ``A``, ``Pv = A X / S``, ``S`` ascending;
    ``Lc`` the lower Cholesky factor of ``C64`` where the path has it (else it is computed).
    """
    X, Pv, S = X.flip(-1), Pv.flip(-1), S.flip(-1)  # descending
    if wide:
        U = X
        V = (U.transpose(-1, -2) @ W64).transpose(-1, -2) / S.unsqueeze(-2)  # = C⁻¹ v (Mᵀu = σ v exactly)
    else:
        U = Pv
        V = torch.cholesky_solve(X, torch.linalg.cholesky(C64) if Lc is None else Lc)
    infos = [
        {
            "method": f"fast-kpm-{factor}",
            **counts,
            "sv_rel_bound": float(bound[b]),
            "factor_err": float(factor_err[b]),
            "iter_residual": float(rel[b].max()),
            "sv_change_est": float(est[b].max()),
            "rejected": list(tried),
        }
        for b in range(W64.shape[0])
    ]
    return U.float(), S.float(), V.float(), infos


def bottom_r(
    W: torch.Tensor,
    C_fix: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    tol: float = BOTTOM_TOL,
    certify: float = BOTTOM_CERTIFY,
    max_iters: int = 60,
    generator: torch.Generator | None = None,
    factors: tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Bottom-``rank`` CO-SVD triplets in float64 with an accuracy estimate (see module doc).

    ``W`` ``(B, m, n)``, ``C_fix`` ``(B, n, n)``. Tries the factorizations in ``factors`` order
    (default: ``lu, qr, eigh, gram`` for square ``W``, else ``eigh, gram, qr``)
    and accepts the first whose estimated bound ``factor error + iteration residual / 2`` on
    the relative error of every bottom singular value is ``≤ certify`` for every matrix of the
    batch; a factor whose a-priori error already exceeds ``certify`` is skipped unused:

    * ``"lu"`` (square ``W`` and ``r + p ≤ n/10`` only, ``n/30`` below ``n = 1024``): ``M⁻¹ = C⁻¹W⁻¹``
      from an LU of ``W`` and a Cholesky of ``C`` (``n³`` flops, ``M`` never formed), error
      ``≈ c·ε·(g·κ(W)·κ(C) + κ(C))``;
    * ``"eigh"`` (``k ≤ 1024`` only): the bottom eigenvectors of the float64 Gram matrix of
      ``M`` from one dense ``eigh``, no iterations, error ``≈ c·ε·κ(M)²`` with ``κ`` read off its
      eigenvalues (cheaper than the iterations below for small ``k``);
    * ``"gram"``: Cholesky of the float64 Gram matrix of ``M``, error ``≈ c·ε·κ(M)²``;
    * ``"qr"``: R of a float64 Householder QR of ``M``, error ``≈ c·ε·κ(M)``;

    (``κ(M) = ‖M‖₂/σ_min``, ``c = √R + √k``, ``g`` the LU growth). Otherwise the exact full SVD
    is taken (``info["method"] = "exact-fallback"``). Returns float32 ``U`` ``(B, m, r)``,
    ``S`` ``(B, r)`` descending, ``V`` ``(B, n, r)`` and info dicts.
    """
    Bn, m, n = W.shape
    generator = _own_generator(generator)
    k = min(m, n)
    if factors is None:
        # square layers (q_proj, o_proj) have κ(M) ~ 1e8 in practice: κ² rules out the Gram paths
        factors = ("lu", "qr", "eigh", "gram") if m == n else ("eigh", "gram", "qr")
    p = default_oversample(rank, k) if oversample is None else max(0, min(oversample, k - rank))
    ell = rank + p
    W64 = W.double()
    wide = m <= n
    # a wide layer's C (up to 11008²) stays in its dtype, every product converts it by blocks
    # (_mm64, _gram64); square layers need it in float64 (the lu factor's Cholesky)
    C64 = C_fix if m < n else C_fix.double()
    Wt64 = W64.transpose(-1, -2)
    R = max(m, n)
    eps = torch.finfo(torch.float64).eps
    c = math.sqrt(R) + math.sqrt(k)
    if wide:  # A = Mᵀ = C Wᵀ (n×m), AᵀA = M Mᵀ

        def apply_A(X: torch.Tensor) -> torch.Tensor:
            return _mt_rows(W64, C64, X)[0]
    else:  # A = M = W C (m×n)

        def apply_A(X: torch.Tensor) -> torch.Tensor:
            return _m_rows(W64, C64, X)

    A_full: torch.Tensor | None = None  # the tall A itself, only for the qr factor

    def tall_A() -> torch.Tensor:
        return _mm64(W64, C64).transpose(-1, -2) if wide else W64 @ C64

    Lc: torch.Tensor | None = None  # Cholesky factor of C_fix (the lu path's, reused for V)
    G: torch.Tensor | None = None  # AᵀA, shared by the eigh and gram factors
    norm2: torch.Tensor | None = None
    tried: list[str] = []
    skip_gram = False
    for factor in factors:
        if factor == "lu":
            # ~10 steps of 8 triangular solves on l columns cost ~80·n²·l flops, forming M and a QR
            # of it ~3.3·n³ at a better BLAS rate: measured break-even near l = n/10 (1 thread, 2048²
            # and 4096²: r = 64 at 2048² 1.7 s against 2.7 s for QR, r = 128 even)
            if m != n or _LU_MAX_BLOCK * ell > n or (n < _LU_SMALL_N and 30 * ell > n):
                continue
            LU, piv, info = lu_factor_ex(W64)
            L_C, info_c = torch.linalg.cholesky_ex(C64)
            if bool((info != 0).any() | (info_c != 0).any()):
                tried.append("lu: W singular or C not positive definite in float64")
                continue
            Lc = L_C

            # triangular solves on the packed factor (lu_solve / cholesky_solve copy their factor on
            # every call; a triangular solve reads only its triangle, so W = P·Lw·Uw needs no unpacking)
            perm = _lu_row_order(piv)  # Pᵀ X = X[perm]
            iperm = torch.argsort(perm, dim=-1)

            def rows(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return torch.gather(X, -2, idx.unsqueeze(-1).expand(-1, -1, X.shape[-1]))

            def w_inv(X: torch.Tensor, LU=LU, perm=perm) -> torch.Tensor:  # W⁻¹ = Uw⁻¹ Lw⁻¹ Pᵀ
                return _tri(LU, _tri(LU, rows(X, perm), upper=False, unitriangular=True), upper=True)

            def w_inv_t(X: torch.Tensor, LUt=LU.mT, iperm=iperm) -> torch.Tensor:  # W⁻ᵀ = P Lw⁻ᵀ Uw⁻ᵀ
                return rows(_tri(LUt, _tri(LUt, X, upper=False), upper=True, unitriangular=True), iperm)

            def c_inv(X: torch.Tensor, L_C=L_C) -> torch.Tensor:  # C⁻¹ = L_C⁻ᵀ L_C⁻¹
                return _tri(L_C.mT, _tri(L_C, X, upper=False), upper=True)

            def apply_inv(X: torch.Tensor, w_inv=w_inv, w_inv_t=w_inv_t, c_inv=c_inv) -> torch.Tensor:
                return w_inv_t(c_inv(c_inv(w_inv(X))))  # (M Mᵀ)⁻¹ = W⁻ᵀ C⁻² W⁻¹

            def inv_W(X: torch.Tensor, w_inv=w_inv, w_inv_t=w_inv_t) -> torch.Tensor:  # (W Wᵀ)⁻¹
                return w_inv_t(w_inv(X))

            dev = W.device
            kW = (
                _power_norm(lambda X: W64 @ (Wt64 @ X), (Bn, n), device=dev) * _power_norm(inv_W, (Bn, n), device=dev)
            ).sqrt()
            kC = _power_norm(lambda X: C64 @ X, (Bn, n), device=dev) * _power_norm(c_inv, (Bn, n), device=dev)
            growth = (_max_abs(LU) / _max_abs(W64)).cpu()
            factor_err = c * eps * (growth * kW * kC + kC)
            apply_ritz = None  # Ritz steps with the LU operator: a product with A costs a step
        elif factor == "eigh":
            if k > _EIGH_MAX_K:
                continue
            if G is None:
                G = _gram64(W64, C64, wide)
            mu, Xall = torch.linalg.eigh(G)  # ascending
            norm2 = mu[..., -1].clamp_min(0).sqrt().cpu() * 1.01
            factor_err = (c * eps * mu[..., -1] / mu[..., 0].clamp_min(1e-300)).cpu()
            factor_err = torch.where(mu[..., 0].cpu() > 0, factor_err, torch.full_like(factor_err, math.inf))
        elif factor in ("gram", "qr"):
            if factor == "gram":
                if skip_gram:
                    tried.append("gram: skipped, κ(M)² too large (see eigh)")
                    continue
                if G is None:
                    G = _gram64(W64, C64, wide)
                F, info = torch.linalg.cholesky_ex(G, upper=True)
                if bool((info != 0).any()):
                    tried.append("gram: not positive definite in float64")
                    continue
            else:
                if A_full is None:
                    A_full = tall_A()
                F = torch.linalg.qr(A_full, mode="r").R
            if norm2 is None:  # ‖A‖₂ from AᵀA where it exists
                AtA = (lambda X, G=G: G @ X) if G is not None else (lambda X, A=A_full: A.mT @ (A @ X))
                norm2 = _power_norm(AtA, (Bn, k), device=W.device).sqrt() * 1.01

            Ft = F.transpose(-1, -2).contiguous()

            def apply_inv(X: torch.Tensor, F=F, Ft=Ft) -> torch.Tensor:  # (FᵀF)⁻¹
                Y = torch.linalg.solve_triangular(Ft, X, upper=False)
                return torch.linalg.solve_triangular(F, Y, upper=True)

            def apply_ritz(X: torch.Tensor, Ft=Ft) -> torch.Tensor:  # F X as (Xᵀ Fᵀ)ᵀ: a row-panel product
                return (X.transpose(-1, -2) @ Ft).transpose(-1, -2)

            smin = _power_norm(apply_inv, (Bn, k), device=W.device).rsqrt()
            assert norm2 is not None
            factor_err = c * eps * (norm2 / smin) ** (2 if factor == "gram" else 1)
        else:
            raise ValueError(f"bottom_r: unknown factor {factor!r}")
        if bool((factor_err > certify).any()):
            tried.append(f"{factor}: a-priori factor error {float(factor_err.max()):.2g} > {certify:g}")
            skip_gram |= factor == "eigh"  # the same κ² criterion, here from the exact eigenvalues
            continue
        if factor == "eigh":
            X, Pv, S, rel = _bottom_from_eigh(apply_A, G, mu, Xall, rank)
            it, est, krylov_steps = 0, torch.zeros_like(rel), 0
        else:
            start, it, krylov_steps, k_est = None, 0, 0, None
            blocks = max(_KRYLOV_MAX_BLOCKS, min(_BOTTOM_MAX_BLOCKS, _BOTTOM_MAX_COLUMNS // max(p, 1)))
            max_basis = _krylov_max_basis(k, ell, p, blocks) if 4 * p >= ell else 0
            if max_basis:
                start, it, k_est = _bottom_krylov(
                    apply_inv,
                    (Bn, k),
                    rank,
                    ell,
                    p,
                    tol=tol,
                    max_steps=max_iters,
                    max_basis=max_basis,
                    generator=generator,
                    device=W.device,
                )
                krylov_steps = it
            # from the Krylov phase's T·(Ritz vectors), one Rayleigh–Ritz step and the check suffice
            X, Pv, S, rel, more, est = _bottom_iterate(
                apply_inv,
                apply_ritz,
                apply_A,
                (Bn, k),
                rank,
                ell,
                tol=tol,
                max_iters=max(1, max_iters - it),
                generator=generator,
                device=W.device,
                start=start,
            )
            if k_est is not None:  # too short a history after the handover: the values' history is Krylov's
                est = torch.where(torch.isfinite(est), est, k_est)
            it += more + 1 if k_est is not None else more  # the warm start's first pass is an iteration too
        bound = factor_err + rel.amax(-1) / 2
        if bool((bound <= certify).all()):
            info = {"iterations": it, "krylov_steps": krylov_steps, "oversample": p}
            return _bottom_result(W64, C64, Lc, X, Pv, S, wide, factor, info, bound, factor_err, rel, est, tried)
        tried.append(
            f"{factor}: bound {float(bound.max()):.2g} (factor {float(factor_err.max()):.2g}, "
            f"residual {float(rel.max()):.2g}) > {certify:g} after {it} iterations"
        )
    U, S, V = torch.ops.corda_kernels.cosvd_full(W, C_fix)
    U, S, V = select(U, S, V, rank, "bottom")
    infos = [{"method": "exact-fallback", "rejected": list(tried)} for _ in range(Bn)]
    return U, S, V, infos


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def fast_cosvd(
    W: torch.Tensor,
    C_fix: torch.Tensor,
    *,
    rank: int,
    which: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Fast top/bottom-``rank`` CO-SVD of ``W`` ``(m, n)`` / ``(B, m, n)`` with damped ``C_fix``.

    Returns ``(U, S, V, infos)`` float32 with the input's batch layout; ``infos`` is a list
    (one dict per matrix: ``method``, ``iterations``, ``sv_rel_bound`` …). The random starts come
    from ``generator``, by default from one seeded 0 (deterministic; the global RNG is not used).
    """
    single = W.dim() == 2
    Wb = W.unsqueeze(0) if single else W
    Cb = C_fix.unsqueeze(0) if C_fix.dim() == 2 else C_fix
    if Cb.shape[0] != Wb.shape[0]:
        Cb = Cb.expand(Wb.shape[0], -1, -1)
    if which == "top":
        U, S, V, infos = top_r(Wb, Cb, rank, generator=generator)
    elif which == "bottom":
        U, S, V, infos = bottom_r(Wb, Cb, rank, generator=generator)
    else:
        raise ValueError(f"fast_cosvd: which must be 'top' or 'bottom', got {which!r}")
    if single:
        return U[0], S[0], V[0], infos
    return U, S, V, infos


def _registered(
    W: torch.Tensor, C_fix: torch.Tensor, *, rank: int, which: str, info: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, V, infos = fast_cosvd(W, C_fix, rank=rank, which=which)
    if info is not None:
        info.update(infos[0] if len(infos) == 1 else {"batch": infos})
    return U, S, V


_FAST["cosvd"] = _registered


# ---------------------------------------------------------------------------------------------
# comparing two sets of triplets (fast vs exact adapters)
# ---------------------------------------------------------------------------------------------
def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of ``A`` and ``B`` ``(d, r)``, ascending."""
    Qa = torch.linalg.qr(A.double()).Q
    Qb = torch.linalg.qr(B.double()).Q
    return torch.linalg.svdvals(Qa.transpose(-1, -2) @ Qb).clamp(max=1.0).flip(-1)


def compare_triplets(
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    W: torch.Tensor | None = None,
    C_fix: torch.Tensor | None = None,
    which: str = "top",
) -> dict[str, float]:
    """How close the triplets ``test = (U, S, V)`` are to ``ref`` (same rank, one layer).

    ``U`` ``(m, r)``, ``S`` ``(r,)``, ``V`` ``(n, r)``. Reports the largest relative singular
    value error, the smallest principal cosine of the ``U`` and ``V`` subspaces, and the
    relative difference of the products ``U diag(S) Vᵀ`` (the adapters' ``s·B·A``). With ``W``
    ``(m, n)`` and ``C_fix`` ``(n, n)`` it also gives the energy criterion: for ``top``
    ``‖M − P_U M‖_F / ‖M − P_ref M‖_F − 1`` (``M = W·C_fix``), for ``bottom``
    ``‖U_testᵀ M‖_F / ‖U_refᵀ M‖_F − 1`` (≥ 0 up to rounding when ``ref`` is exact).
    """
    Ut, St, Vt = (x.double() for x in test)
    Ur, Sr, Vr = (x.double() for x in ref)
    if St.shape != Sr.shape:
        raise ValueError(f"compare_triplets: ranks differ ({tuple(St.shape)} vs {tuple(Sr.shape)})")
    out = {
        "sv_rel_err": float(((St - Sr).abs() / Sr.abs()).max()),
        "u_cos_min": float(principal_cosines(Ut, Ur)[0]),
        "v_cos_min": float(principal_cosines(Vt, Vr)[0]),
    }
    prod_t = (Ut * St) @ Vt.T
    prod_r = (Ur * Sr) @ Vr.T
    out["product_rel_err"] = float((prod_t - prod_r).norm() / prod_r.norm())
    if W is not None and C_fix is not None:
        M = W.double() @ C_fix.double()
        Qt = torch.linalg.qr(Ut).Q
        Qr = torch.linalg.qr(Ur).Q
        cap_t = (Qt.T @ M).norm() ** 2
        cap_r = (Qr.T @ M).norm() ** 2
        if which == "top":
            total = M.norm() ** 2
            out["energy_rel_excess"] = float(((total - cap_t).clamp_min(0) / (total - cap_r)).sqrt() - 1)
        else:
            out["energy_rel_excess"] = float((cap_t / cap_r).sqrt() - 1)
    return out


def triplets_from_adapter(
    A: torch.Tensor, B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover ``(U, S, V)`` from CorDA adapters ``A`` ``(r, n)``, ``B`` ``(m, r)`` (DESIGN §3.4).

    ``B = U diag(√(S/s))`` with unit columns ``U``, so ``S_i = s·‖B_i‖²``, ``U_i = B_i/‖B_i‖`` and
    ``V_i = A_iᵀ/‖B_i‖``. Returns float64 ``U`` ``(m, r)``, ``S`` ``(r,)``, ``V`` ``(n, r)``.
    """
    B64 = B.double()
    norms = B64.norm(dim=0)
    return B64 / norms, scaling * norms**2, A.double().T / norms
