"""Bottom-``r`` CO-SVD triplets (KPM) in float64 through a factorization of the inverse operator,
certified or handed to the exact SVD (the package docstring of :mod:`corda_kernels.ops.cosvd`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..linalg import lu_factor_ex
from .eigen import eigh_range
from .exact import select
from .iteration import (
    _BOTTOM_MAX_BLOCKS,
    _BOTTOM_MAX_COLUMNS,
    _KRYLOV_MAX_BLOCKS,
    BOTTOM_CERTIFY,
    BOTTOM_TOL,
    _bordered,
    _estimate_remaining,
    _krylov_max_basis,
    _one_thread,
    _orth,
    _orth_against,
    _own_generator,
    _ritz,
    default_oversample,
)
from .products import _gram64, _m_rows, _mm64, _mt_rows

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
    # the basis and its products grow a block per step inside buffers of the largest width (no
    # re-copy of the whole basis at every step)
    cap = max(max_basis, ell + b)
    K_buf = torch.empty(Bn, k, cap, dtype=torch.float64, device=device)
    TK_buf = torch.empty_like(K_buf)
    K_buf[..., :b] = _orth(torch.randn(Bn, k, b, generator=generator, dtype=torch.float64).to(device))
    width, H = b, None
    block = K_buf[..., :b]
    hist: list[torch.Tensor] = []
    steps = 0
    while True:
        steps += 1
        T = TK_buf[..., width - b : width]
        T.copy_(apply_inv(block))
        K, TK = K_buf[..., :width], TK_buf[..., :width]
        col = K.transpose(-1, -2) @ T  # K_iᵀ T K_j for every block i ≤ j
        H = _bordered(H, col[..., :-b, :], col[..., -b:, :])
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
        block = K_buf[..., width : width + b]
        block.copy_(_orth_against(T, K))
        width += b


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
    X: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bottom ``r`` right vectors of the tall ``A`` ``(B, R, k)`` (``apply_A(X) = A X`` in float64)
    from the bottom ``r`` eigenpairs ``(mu (B, r), X (B, k, r))`` of ``G = AᵀA``, ascending.

    Returns ``X`` ``(B, k, r)``, ``Pv = A X / S``, ``S`` ``(B, r)`` (ascending, re-measured with
    ``A`` by a Rayleigh–Ritz step on the r columns) and the eigen-residuals ``‖G x − μ x‖/μ`` ``(B, r)``.
    """
    rel = ((G @ X - X * mu.unsqueeze(-2)).norm(dim=-2) / mu.abs()).cpu()
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
    * ``"eigh"`` (``k ≤ 1024`` only): the bottom ``r`` eigenpairs of the float64 Gram matrix of
      ``M`` from one dense eigensolve (:func:`~.eigen.eigh_range`), no iterations, error
      ``≈ c·ε·κ(M)²`` with ``σ_min`` read off the eigenvalues and ``‖M‖₂² ≤ ‖MᵀM‖_F``
      (cheaper than the iterations below for small ``k``);
    * ``"gram"``: Cholesky of the float64 Gram matrix of ``M``, error ``≈ c·ε·κ(M)²`` (power estimates
      of ``‖M‖₂`` and ``σ_min``);
    * ``"qr"``: R of a float64 Householder QR of ``M``, error ``≈ c·ε·κ(M)`` with ``‖M‖₂ ≤ ‖R‖_F`` and
      ``σ_min`` the smallest value the iteration finds (a-priori only the certain lower bound
      ``κ ≥ max_j ‖R e_j‖ / min_i |R_ii|``);

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
            mu, Xr = eigh_range(G, 0, rank)  # the bottom r pairs, ascending
            # the pairs above the r-th are not computed: ‖G‖₂ ≤ ‖G‖_F (an upper bound, one pass)
            lam_max = G.norm(dim=(-2, -1)).cpu()
            norm2 = lam_max.sqrt()
            factor_err = c * eps * lam_max / mu[..., 0].cpu().clamp_min(1e-300)
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
            if norm2 is None:  # ‖A‖₂: a power estimate from AᵀA where it exists, else ‖A‖_F = ‖R‖_F ≥ ‖A‖₂
                norm2 = (
                    _power_norm(lambda X, G=G: G @ X, (Bn, k), device=W.device).sqrt() * 1.01
                    if G is not None
                    else F.norm(dim=(-2, -1)).cpu()
                )

            Ft = F.transpose(-1, -2).contiguous()

            def apply_inv(X: torch.Tensor, F=F, Ft=Ft) -> torch.Tensor:  # (FᵀF)⁻¹
                Y = torch.linalg.solve_triangular(Ft, X, upper=False)
                return torch.linalg.solve_triangular(F, Y, upper=True)

            def apply_ritz(X: torch.Tensor, Ft=Ft) -> torch.Tensor:  # F X as (Xᵀ Fᵀ)ᵀ: a row-panel product
                return (X.transpose(-1, -2) @ Ft).transpose(-1, -2)

            assert norm2 is not None
            if factor == "gram":
                smin = _power_norm(apply_inv, (Bn, k), device=W.device).rsqrt()
                factor_err = c * eps * (norm2 / smin) ** 2
            else:
                # a-priori only what is free and certain: κ(A) ≥ (largest column norm of A, which R
                # keeps) / min |R_ii| (σ_min ≤ |λ| for every eigenvalue R_ii); the factor error itself
                # is taken from the smallest value the iteration finds (below)
                diag = F.diagonal(dim1=-2, dim2=-1).abs().amin(-1).clamp_min(torch.finfo(torch.float64).tiny)
                factor_err = (c * eps * F.norm(dim=-2).amax(-1) / diag).cpu()
        else:
            raise ValueError(f"bottom_r: unknown factor {factor!r}")
        if bool((factor_err > certify).any()):
            tried.append(f"{factor}: a-priori factor error {float(factor_err.max()):.2g} > {certify:g}")
            skip_gram |= factor == "eigh"  # the same κ² criterion, from the same Gram matrix
            continue
        if factor == "eigh":
            X, Pv, S, rel = _bottom_from_eigh(apply_A, G, mu, Xr)
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
            if factor == "qr":  # σ_min: the smallest value found, measured with A (≥ σ_min, to the residual)
                factor_err = c * eps * norm2 / S[..., 0].cpu().clamp_min(torch.finfo(torch.float64).tiny)
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
