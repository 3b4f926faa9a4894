"""Cheap spectra for CorDA++: values only, no singular vectors, no full SVD per candidate.

What CorDA++ needs per candidate covariance (docs/design.md §5):

* ``λ_min`` / ``λ_max`` of the damped covariance ``C_fix`` ``(n, n)``: a float64
  ``eigvalsh`` (values only). ``C_fix = C + δ·I`` so they are shared by every layer that reads
  the same input; compute them once per accumulator and candidate.
  :func:`eig_extremes_fast` estimates both by Lanczos (with ``C_fix⁻¹`` for ``λ_min``) in a
  tenth of the time at ``n = 1536``, with an a-posteriori error bound.
* ``Σ_j σ_j(W·C_fix)`` and ``σ_max(W·C_fix)`` for ``W`` ``(m, n)``, and the full descending
  spectrum for the rank allocation: the eigenvalues of the *smaller* Gram matrix of
  ``P = W·C_fix`` (``P·Pᵀ`` if ``m ≤ n`` else ``Pᵀ·P``, ``k×k`` with ``k = min(m, n)``), formed
  and decomposed in float64; ``σ_j = √max(μ_j, 0)``.

Error of the Gram path (the default, ``method="gram"``). Weyl's bound for the symmetric
eigensolver on the float64 Gram gives ``|σ_j² − σ̃_j²| ≤ c·k·ε₆₄·σ_max²`` (``ε₆₄ ≈ 1.1e-16``,
``c`` a small constant including the rounding of forming the Gram), hence an *absolute* error
``|σ_j − σ̃_j| ≤ √(c·k·ε₆₄)·σ_max ≈ 1e-7·σ_max`` at worst for ``k`` up to a few thousand, and a
relative error ``≈ c·k·ε₆₄·(σ_max/σ_j)²/2`` for the large ones. So ``σ_max`` and ``Σσ`` are
correct to ~1e-12 relative in practice (``Σσ ≥ σ_max`` bounds the summed absolute error by
``k·1e-7`` relative in the very worst case; tests check ≤ 1e-9 against float64 ``svdvals`` on
spectra spanning 8 decades), while singular values below ``~1e-7·σ_max`` are only resolved
to that absolute level. ``method="svd"`` (float64 ``svdvals`` of ``P``, absolute error
``~k·ε₆₄·σ_max``) is there when the very bottom must be exact; it costs a few times more.
Inputs of any float dtype are promoted to float64; outputs are float64 tensors on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SPECTRUM_METHODS = ("gram", "svd")


@dataclass
class CandidateSpectrum:
    """Values of one layer under one candidate covariance (all float64 Python numbers / tensors).

    ``sigma`` is the descending spectrum of ``W·C_fix`` ``(k,)`` float64 on the CPU, or ``None``
    if it was not kept.
    """

    lam_min: float
    lam_max: float
    sigma_sum: float
    sigma_max: float
    m: int
    sigma: torch.Tensor | None = None

    @property
    def compactness(self) -> float:
        """``π(C_fix) = √(m·λ_max) / λ_min``."""
        return compactness(self.lam_min, self.lam_max, self.m)

    @property
    def score(self) -> float:
        """The selection score ``log π(C_fix) · Σσ / σ_max`` (lower is better)."""
        return math.log(self.compactness) * self.sigma_sum / self.sigma_max


def compactness(lam_min: float, lam_max: float, m: int) -> float:
    """``π(C) = √(m·λ_max(C)) / λ_min(C)`` for a layer with ``m`` outputs; ``λ_min > 0`` required."""
    if not lam_min > 0:
        raise ValueError(f"compactness: λ_min must be positive (use the damped covariance), got {lam_min}")
    return math.sqrt(m * lam_max) / lam_min


def eig_extremes(C_fix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ_min, λ_max)`` of symmetric ``C_fix`` ``(n, n)`` or ``(B, n, n)``: float64 ``()`` / ``(B,)`` on the CPU."""
    if C_fix.dim() not in (2, 3) or C_fix.shape[-1] != C_fix.shape[-2]:
        raise ValueError(f"eig_extremes: C_fix must be (n, n) or (B, n, n), got {tuple(C_fix.shape)}")
    ev = torch.linalg.eigvalsh(C_fix.to(torch.float64))
    return ev[..., 0].cpu(), ev[..., -1].cpu()


# Ritz vectors refined in float64: two at the top (a gap estimate for the bound); more at the
# bottom, where the inverse's error mixes the eigenvectors of a dense cluster and Rayleigh–Ritz
# on a few of them undoes it for the same cost (the float64 products are memory bound)
_RITZ_HI, _RITZ_LO = 2, 8
_FIRST_CHECK = 8  # no early stop before: a start vector poor in the top eigenvector needs a few steps to show it
_STOP_TOL = 1e-10  # estimated relative error at which a Krylov side stops before ``steps``


def eig_extremes_fast(
    C_fix: torch.Tensor,
    C_inv: torch.Tensor | None = None,
    *,
    block: int = 1,
    steps: int = 128,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(λ_min, λ_max, rel_bound)`` of symmetric positive definite ``C_fix`` by (block) Lanczos,
    without a full eigendecomposition.

    Shapes and dtypes: ``C_fix`` float32 or float64 ``(n, n)`` or ``(B, n, n)``, any strides;
    ``C_inv`` ``None`` or an approximate inverse of ``C_fix`` of the same shape, float32 or
    float64 (the one ``torch.linalg.inv`` gives in float32 is enough; only ``Q·C_inv`` is used, so
    a slightly unsymmetric one is fine). Returns float64 tensors on the CPU: ``λ_min`` and
    ``λ_max`` ``()`` / ``(B,)``, and ``rel_bound`` ``(2,)`` / ``(B, 2)`` with the columns
    ``(λ_min, λ_max)``.

    Method. ``λ_max``: Lanczos with ``block`` random start vectors and full reorthogonalization
    on ``C_fix``, in ``C_fix``'s dtype; then Rayleigh–Ritz with ``C_fix`` in float64 on its top
    two Ritz vectors. ``λ_min``: the same Lanczos on ``C_inv`` (or, when ``C_inv`` is ``None``,
    on solves with a float32 Cholesky factor of ``C_fix``: cheaper than forming an inverse). Its
    top eight Ritz vectors ``Y`` get one step of inverse iteration ``Z = Y·C_fix⁻¹`` applied with
    one step of iterative refinement (``Z = Y·C_inv``, then ``Z += (Y − Z·C_fix)·C_inv`` with the
    ``C_fix`` product in float64): Ritz vectors of an inverse with relative error ``e`` (1e-4 to
    1e-3 for float32 LU) carry components along the large eigenvectors that ruin a Rayleigh
    quotient of ``C_fix``; the refined step leaves ``e²``. ``λ_min`` is then the smallest Ritz
    value of ``C_fix`` in float64 on ``span(Z)``. Both values are Rayleigh–Ritz values of the
    exact ``C_fix``, so ``λ_min`` is never below and ``λ_max`` never above the true value (up to
    float64 rounding).

    Each side runs at most ``steps`` block steps (Krylov dimension ``≤ min(n, block·steps)``) and,
    from step 8 on, stops once its top Ritz value has an estimated relative error below ``1e-10``.
    On real covariances the λ_max side stops after 8–10 steps (the top eigenvalues are well
    separated), the λ_min side after 15–128 (median 23 at ``n = 576``, 38 at ``n = 1536``: the
    bottom is the edge of a dense bulk). ``block = 1`` converges in the fewest products and is the
    fastest on the CPU (``block = 4`` took ~1.7× the time for a tenth of the accuracy); larger
    blocks help only against exactly repeated extreme eigenvalues, whose value ``block = 1``
    still finds. Deterministic for a given ``generator``; ``None`` uses a fixed seed.

    ``rel_bound`` per value ``θ`` with Ritz vector ``y`` and residual norm ``ρ = ‖C_fix·y − θ·y‖``
    (float64): ``(min(ρ, ρ²/δ) + n·ε₆₄·λ_max) / θ``, ``δ`` an estimate of the distance to the next
    eigenvalue (the next Ritz value moved towards ``θ`` by its own residual; ``ρ`` alone if that
    leaves no gap), the last term the worst-case float64 rounding. ``ρ`` bounds the distance to
    the *nearest* eigenvalue rigorously, ``ρ²/δ`` (Kato–Temple) holds when ``δ`` does not
    overestimate that gap. Neither can see an eigenvalue the Krylov space has missed entirely:
    a start vector nearly orthogonal to the extreme eigenvector (rare; the first 8 steps guard
    against it), or the bottom of a dense cluster (a covariance with hundreds of eigenvalues
    within 10 % of its damping floor) when ``steps`` is too small to resolve it. On the test
    covariances the bound was above the error for every matrix: 1.4–45× for ``λ_max``, 5× and
    more for ``λ_min`` (the rounding term dominates when the error is ~1e-11).
    """
    name = "eig_extremes_fast"
    if C_fix.dim() not in (2, 3) or C_fix.shape[-1] != C_fix.shape[-2]:
        raise ValueError(f"{name}: C_fix must be (n, n) or (B, n, n), got {tuple(C_fix.shape)}")
    if C_inv is not None and C_inv.shape != C_fix.shape:
        raise ValueError(f"{name}: C_inv must have C_fix's shape {tuple(C_fix.shape)}, got {tuple(C_inv.shape)}")
    for arg, T in (("C_fix", C_fix), ("C_inv", C_inv)):
        if T is not None and T.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: {arg} must be float32 or float64, got {T.dtype}")
    if block < 1 or steps < 1:
        raise ValueError(f"{name}: block and steps must be >= 1, got block={block}, steps={steps}")
    single = C_fix.dim() == 2
    A = _gemm_operand(C_fix.unsqueeze(0) if single else C_fix)
    B, n = A.shape[0], A.shape[-1]
    b = min(block, n)
    dim = min(n, b * steps)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    X = torch.randn(2, B, b, n, generator=gen, dtype=torch.float64).to(A.device)

    V, H = _block_krylov(_left_product(A, A.dtype), X[0].to(A.dtype), dim, _STOP_TOL)
    if C_inv is None:
        inv, inv_dtype = _cholesky_solver(A)
    else:
        Ci = _gemm_operand(C_inv.unsqueeze(0) if single else C_inv)
        inv, inv_dtype = _left_product(Ci, Ci.dtype), Ci.dtype
    Vi, Hi = _block_krylov(inv, X[1].to(inv_dtype), dim, _STOP_TOL)

    def inv64(Y: torch.Tensor) -> torch.Tensor:
        return inv(Y.to(inv_dtype)).to(torch.float64)

    Y_hi, Y_lo = _top_ritz_rows(V, H, _RITZ_HI), _top_ritz_rows(Vi, Hi, _RITZ_LO)
    Z = inv64(Y_lo)
    p = Z.shape[1]
    P = _left_product64(torch.cat([Z, Y_hi], dim=1), A)
    Z = Z + inv64(Y_lo - P[:, :p])
    theta_hi, rho_hi = _ritz64(Y_hi, P[:, p:])
    Q = _rows_qr(Z)
    theta_lo, rho_lo = _ritz64(Q, _left_product64(Q, A))

    lam_min, lam_max = theta_lo[:, 0], theta_hi[:, -1]
    floor = n * torch.finfo(torch.float64).eps * lam_max.abs()
    err_lo = _kato_temple(rho_lo[:, 0], theta_lo[:, 1] - rho_lo[:, 1] - lam_min if p > 1 else None)
    err_hi = _kato_temple(rho_hi[:, -1], lam_max - theta_hi[:, -2] - rho_hi[:, -2] if theta_hi.shape[1] > 1 else None)
    rel = torch.stack([(err_lo + floor) / lam_min.abs(), (err_hi + floor) / lam_max.abs()], dim=-1)
    out = (lam_min.cpu(), lam_max.cpu(), rel.cpu())
    return (out[0][0], out[1][0], out[2][0]) if single else out


def singular_values(W: torch.Tensor, C_fix: torch.Tensor, *, method: str = "gram") -> torch.Tensor:
    """Descending singular values of ``W·C_fix`` (``W`` ``(m, n)`` or ``(B, m, n)``; ``C_fix``
    ``(n, n)`` or ``(B, n, n)``): float64 ``(k,)`` / ``(B, k)`` on the CPU, ``k = min(m, n)``.

    ``method="gram"``: float64 eigenvalues of the smaller Gram (see the module docstring for
    its error); ``"svd"``: float64 ``svdvals``.
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"singular_values: method must be one of {SPECTRUM_METHODS}, got {method!r}")
    if W.shape[-1] != C_fix.shape[-1] or C_fix.shape[-1] != C_fix.shape[-2]:
        raise ValueError(f"singular_values: W {tuple(W.shape)} and C_fix {tuple(C_fix.shape)} do not match")
    P = W.to(torch.float64) @ C_fix.to(torch.float64)
    if method == "svd":
        return torch.linalg.svdvals(P).cpu()
    m, n = P.shape[-2:]
    G = P @ P.transpose(-1, -2) if m <= n else P.transpose(-1, -2) @ P
    mu = torch.linalg.eigvalsh(G)  # ascending
    return mu.clamp_min(0).sqrt().flip(-1).cpu()


def candidate_spectrum(
    W: torch.Tensor,
    C_fix: torch.Tensor,
    *,
    extremes: tuple[float, float] | None = None,
    keep_sigma: bool = True,
    method: str = "gram",
) -> CandidateSpectrum:
    """Everything CorDA++ needs about layer ``W`` ``(m, n)`` under one damped covariance ``C_fix`` ``(n, n)``.

    ``extremes`` = precomputed ``(λ_min, λ_max)`` of ``C_fix`` (shared by the layers of one input).
    """
    if extremes is None:
        lo, hi = eig_extremes(C_fix)
        extremes = (float(lo), float(hi))
    sigma = singular_values(W, C_fix, method=method)
    return CandidateSpectrum(
        lam_min=float(extremes[0]),
        lam_max=float(extremes[1]),
        sigma_sum=float(sigma.sum()),
        sigma_max=float(sigma[0]),
        m=int(W.shape[0]),
        sigma=sigma if keep_sigma else None,
    )


def _rows_qr(W: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``W`` ``(B, k, n)`` (``k ≤ n``), ``(B, k, n)`` in ``W``'s dtype."""
    return torch.linalg.qr(W.mT)[0].mT


def _block_krylov(
    apply: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, dim: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block Lanczos with full reorthogonalization from the start block ``X`` ``(B, b, n)``.

    ``apply(Q)`` returns ``Q·A`` ``(B, k, n)`` for rows ``Q`` ``(B, k, n)``, both in ``X``'s dtype.
    Returns the orthonormal basis ``V`` ``(B, k, n)`` (rows, ``X``'s dtype) of the block Krylov
    space and ``H = V·A·Vᵀ`` ``(B, k, k)`` float64 (symmetric), ``k ≤ dim ≤ n`` (the last block
    is truncated to fit). From step ``_FIRST_CHECK`` on, stops before ``dim`` once the largest Ritz
    value of every matrix has an estimated relative error ``min(ρ, ρ²/gap)/θ ≤ tol`` (``ρ`` its
    residual norm, ``gap`` the distance to the next Ritz value); ``tol = 0`` never stops early.
    """
    B, b, n = X.shape
    V = X.new_empty(B, dim, n)
    H = torch.zeros(B, dim, dim, dtype=torch.float64, device=X.device)
    Q = _rows_qr(X)
    k, step, next_check = 0, 0, _FIRST_CHECK
    while True:
        step += 1
        k0, k = k, k + Q.shape[-2]
        V[:, k0:k] = Q
        W = apply(Q)
        Vk = V[:, :k]
        coef = W @ Vk.mT  # rows k0:k of V·A·Vᵀ, for free from the first Gram–Schmidt pass
        H[:, k0:k, :k] = coef
        if k >= dim:
            break
        W = W - coef @ Vk
        if tol > 0 and step == next_check:  # a check costs a k×k eigh: at steps 8, 10, 13, 17, 22, 29, …
            if _top_ritz_converged(H[:, :k, :k], W, k0, tol):
                break
            next_check = max(step + 1, (4 * step) // 3)
        # Gram–Schmidt twice, normalizing in between: the second pass also cleans the directions
        # QR invents for a rank-deficient W (an invariant subspace was found)
        W = _rows_qr(W[:, : min(b, dim - k)])
        Q = _rows_qr(W - (W @ Vk.mT) @ Vk)
    return V[:, :k], _sym_lower(H[:, :k, :k])


def _sym_lower(H: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix with ``H``'s lower triangle (diagonal included)."""
    return H.tril() + H.tril(-1).mT


def _top_ritz_converged(H: torch.Tensor, W_perp: torch.Tensor, k0: int, tol: float) -> bool:
    """Whether the largest Ritz value of ``H`` ``(B, k, k)`` has ``min(ρ, ρ²/gap)/θ ≤ tol`` for all
    matrices; ``W_perp`` ``(B, k − k0, n)`` is the last block's image with the basis projected out,
    so ``ρ = ‖s_lastᵀ·W_perp‖`` for the Ritz vector's coefficients ``s`` (the Lanczos residual)."""
    theta, S = torch.linalg.eigh(_sym_lower(H))
    s_last = S[:, k0:, -1:].mT.to(W_perp.dtype)
    rho = torch.linalg.vector_norm(s_last @ W_perp, dim=(-2, -1)).to(torch.float64)
    gap = (theta[:, -1] - theta[:, -2]).clamp_min(torch.finfo(torch.float64).tiny)
    est = torch.minimum(rho, rho * rho / gap) / theta[:, -1].abs()
    return bool((est <= tol).all())


def _left_product(A: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``Q ↦ Q·A`` computed in ``A``'s dtype, returned in ``dtype`` (``Q·A = (A·Qᵀ)ᵀ`` for symmetric ``A``).

    Rows on the left: torch's CPU GEMM is up to ~5× faster for ``(b, n)·(n, n)`` than for
    ``(n, n)·(n, b)`` with a few rows (``b = 4``, ``n = 1536``: 0.5 ms against 2.8 ms).
    """
    return lambda Q: torch.matmul(Q.to(A.dtype), A).to(dtype)


def _left_product64(Y: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``Y·A`` ``(B, p, n)`` in float64 for float64 ``Y`` ``(B, p, n)`` and ``A`` ``(B, n, n)`` of any float dtype.

    A float32 ``A`` is converted in row chunks of ~1 MiB through one reused buffer that stays in
    cache: less than half the time of converting the whole matrix (a fresh buffer per chunk
    costs page faults that made it slower still).
    """
    if A.dtype == torch.float64:
        return Y @ A
    B, n = A.shape[0], A.shape[-1]
    rows = min(n, max(32, (1 << 20) // (8 * n)))
    buf = torch.empty(B, rows, n, dtype=torch.float64, device=A.device)
    out = Y.new_zeros(Y.shape)
    for i in range(0, n, rows):
        r = min(rows, n - i)
        chunk = buf[:, :r]
        chunk.copy_(A[:, i : i + r])
        out.baddbmm_(Y[..., i : i + r], chunk)
    return out


def _ritz64(Y: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh–Ritz on orthonormal rows ``Y`` ``(B, p, n)`` with ``Z = Y·A`` (float64): ascending
    Ritz values ``(B, p)`` and the residual norms ``‖A·y − θ·y‖`` of their Ritz vectors ``(B, p)``."""
    G = Y @ Z.mT
    theta, U = torch.linalg.eigh((G + G.mT) / 2)
    R = U.mT @ Z - theta.unsqueeze(-1) * (U.mT @ Y)
    return theta, torch.linalg.vector_norm(R, dim=-1)


def _cholesky_solver(A: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype]:
    """``Q ↦ Q·A⁻¹`` for SPD ``A`` ``(B, n, n)`` through a float32 Cholesky factor (float64 if
    float32 fails for any matrix), and the factor's dtype.

    Two triangular solves: ~3× faster than ``torch.cholesky_solve`` for a single row.
    """
    L, info = torch.linalg.cholesky_ex(A.to(torch.float32))
    if bool((info != 0).any()):
        L, info = torch.linalg.cholesky_ex(A.to(torch.float64))
        if bool((info != 0).any()):
            bad = int((info != 0).nonzero()[0])
            raise ValueError(f"eig_extremes_fast: C_fix {bad} of the batch is not positive definite")
    U = L.mT

    def solve(Q: torch.Tensor) -> torch.Tensor:
        Y = torch.linalg.solve_triangular(L, Q.mT.to(L.dtype), upper=False)
        return torch.linalg.solve_triangular(U, Y, upper=True).mT

    return solve, L.dtype


def _gemm_operand(A: torch.Tensor) -> torch.Tensor:
    """``A`` ``(B, n, n)`` itself when GEMM can read it as is (row- or column-major matrices), else a copy."""
    row_major = A.stride(-1) == 1 and A.stride(-2) >= A.shape[-1]
    col_major = A.stride(-2) == 1 and A.stride(-1) >= A.shape[-2]
    return A if row_major or col_major else A.contiguous()


def _top_ritz_rows(V: torch.Tensor, H: torch.Tensor, p: int) -> torch.Tensor:
    """The ``p`` Ritz vectors of the largest Ritz values of ``H`` on the basis ``V`` ``(B, k, n)``:
    orthonormal float64 rows ``(B, p, n)``."""
    S = torch.linalg.eigh(H)[1][..., -min(p, H.shape[-1]) :]
    return _rows_qr((S.mT.to(V.dtype) @ V).to(torch.float64))


def _kato_temple(rho: torch.Tensor, gap: torch.Tensor | None) -> torch.Tensor:
    """``min(ρ, ρ²/gap)``, or ``ρ`` where ``gap ≤ 0`` or is unknown (``None``)."""
    if gap is None:
        return rho
    quad = torch.where(gap > 0, rho * rho / gap.clamp_min(torch.finfo(gap.dtype).tiny), rho)
    return torch.minimum(rho, quad)
