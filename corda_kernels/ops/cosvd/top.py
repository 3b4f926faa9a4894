"""Top-``r`` CO-SVD triplets (IPM): float32 block Krylov on ``M = W·C_fix``, a float64
Rayleigh–Ritz step and a posterior bound (the package docstring of :mod:`corda_kernels.ops.cosvd`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..covariance import _accumulate
from .eigen import eigh_range
from .iteration import (
    TOP_TOL,
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
from .products import _m_rows, _mt_rows

_F64_FLOOR = 3e-4  # float32 residual floor above which the top iteration continues in float64
_FINAL_EXTRA = 8  # Ritz vectors beyond r in the top's final float64 Rayleigh–Ritz step
_ROWS_MIN_N = 4096  # above this n the top's float32 products take the row-panel form (top_r)


def dense_start(M: torch.Tensor, ell: int) -> torch.Tensor:
    """Orthonormal ``(B, m, ell)``: the top ``ell`` left singular vectors of float32 ``M`` ``(B, m, n)``.

    From one ``eigh`` of the float32 Gram matrix of the short side (``MMᵀ``, or ``MᵀM`` whose
    top eigenvectors ``V`` give ``orth(M V)``). Accurate to ``~u₃₂·σ_1²/(σ_ell² − σ_{ell+1}²)``:
    a start that the subspace iteration confirms in one step where the spectrum is flat (where
    a Krylov basis from a random start has to grow to most of ``k`` columns) and refines where it
    is not. Only the upper triangle of the Gram matrix is formed: both eigensolvers read one.
    """
    m, n = M.shape[-2:]
    X = M.transpose(-1, -2) if m <= n else M  # (B, long, short): the Gram is XᵀX
    G = torch.zeros(M.shape[0], X.shape[-1], X.shape[-1], dtype=M.dtype, device=M.device)
    for b in range(M.shape[0]):
        _accumulate(G[b], X[b], upper_only=True)
    top = _top_eigenvectors(G, ell)
    return top if m <= n else _orth(M @ top)


def _top_eigenvectors(G: torch.Tensor, ell: int) -> torch.Tensor:
    """Eigenvectors ``(B, k, ell)`` of the ``ell`` largest eigenvalues of symmetric ``G`` ``(B, k, k)``,
    descending. Reads the upper triangle of ``G`` only."""
    return eigh_range(G, G.shape[-1] - ell, ell)[1].flip(-1)


def _beyond_float32(kappa: torch.Tensor) -> torch.Tensor:
    """Which matrices' float32 residual floor ``30·u₃₂·σ_1/σ_r`` exceeds ``_F64_FLOOR`` (``kappa`` ``(B,)``
    the ratios ``σ_1/σ_r``): their float32 products cannot certify the top r, float64 must."""
    return 30 * (torch.finfo(torch.float32).eps / 2) * kappa > _F64_FLOOR


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
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive subspace iteration in ``Q``'s dtype (float32 or float64), see the module doc.

    ``Q`` ``(B, m, l)`` orthonormal start. Returns the last basis, the iteration count, the
    extrapolated remaining relative change of the Ritz values ``(B, r)``, ``σ̃_1/σ̃_r`` ``(B,)``
    and which matrices met the stopping rule ``(B,)`` (the others ran out of iterations).
    """
    Bn = Q.shape[0]
    unit = torch.finfo(Q.dtype).eps / 2
    tiny = torch.finfo(Q.dtype).tiny
    hist: list[torch.Tensor] = []
    iters = 0
    est = torch.full((Bn, rank), math.inf, dtype=torch.float64)
    kappa = torch.ones(Bn, dtype=torch.float64)
    stall_prev = torch.zeros(Bn, dtype=torch.bool)
    met = torch.zeros(Bn, dtype=torch.bool)
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
        met |= stop
        if bool(met.all()):
            break
    return Q, iters, est, kappa, met


def _top_krylov(
    mv: Callable[[torch.Tensor], torch.Tensor],
    mtv: Callable[[torch.Tensor], torch.Tensor],
    K0: torch.Tensor,
    rank: int,
    ell: int,
    tol: float,
    max_steps: int,
    max_basis: int,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    which matrices met the stopping rule ``(B,)`` (for the others the basis reached ``max_basis``
    columns or ``max_steps`` steps were taken).
    """
    Bn = K0.shape[0]
    unit = torch.finfo(K0.dtype).eps / 2
    tiny = torch.finfo(K0.dtype).tiny
    K, Zc64, Yc = K0, None, None  # basis, [Z_0 … Z_j] in float64, [Y_0 … Y_j]
    G = None  # Zc64ᵀ Zc64
    hist: list[torch.Tensor] = []
    stall_prev = torch.zeros(Bn, dtype=torch.bool)
    met = torch.zeros(Bn, dtype=torch.bool)
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
            met |= stop
            if bool(met.all()) or not grows:
                return _orth(K @ Yt.to(K.dtype)), steps, est, kappa, met
        block = _orth_against(Y, K)
        K = torch.cat([K, block], -1)


def top_r(
    W: torch.Tensor,
    C_fix: torch.Tensor | None,
    rank: int,
    *,
    oversample: int | None = None,
    tol: float = TOP_TOL,
    max_iters: int = 40,
    generator: torch.Generator | None = None,
    krylov: bool | None = None,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Top-``rank`` CO-SVD triplets by adaptive randomized block Krylov / subspace iteration (module doc).

    ``W`` ``(B, m, n)``, ``C_fix`` ``(B, n, n)`` (any float dtype; iterations in float32, the
    final Rayleigh–Ritz step and ``V`` in float64), or ``None`` for the identity: the plain top-r
    SVD of ``W`` (:func:`corda_kernels.ops.svd.svd_top`). ``krylov``: ``None`` picks block Krylov where
    the basis has room (``min(m, n) ≥ 4·l``) and ``l ≤ 4·p``; ``False`` forces subspace iteration,
    ``True`` Krylov wherever the basis has room. ``dense`` starts from :func:`dense_start`
    instead (no Krylov basis, no random start): the final step on it is taken first and kept where
    its residuals meet the iteration's residual criterion, otherwise the subspace iteration follows
    from it (the same stopping rule and final step); the cheaper start for small ``k``
    (:func:`~corda_kernels.ops.cosvd.fast_cosvd`) and for :func:`~corda_kernels.ops.svd.svd_top`.
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
    use_krylov = 4 * p >= ell if krylov is None else krylov
    max_basis = _krylov_max_basis(k, ell, p) if use_krylov and not dense else 0
    b = p if max_basis else ell
    W32 = W.float()
    C32 = None if C_fix is None else C_fix.float()
    dev = W.device

    # M applied implicitly costs 2·b·(n² + m·n) per step, explicitly 2·b·m·n after m·n² once:
    # form it when m < 12·b (about six steps amortize it).
    if C32 is None:
        M32 = W32
    else:
        M32 = W32 @ C32 if m < 12 * b or dense else None

    matvecs = [0]  # columns multiplied by M or Mᵀ, all precisions

    # float32 products with a thin block: on a wide layer's 11008² C the row-panel form
    # (Xᵀ·C)·Wᵀ runs at 57–62 GFLOP/s against 45–48 for C·X with a thin right operand (1 thread,
    # b = 40); at n ≤ 4096 the two are even (measured in situ), so the plain form is kept there
    rows = M32 is None and n > _ROWS_MIN_N

    def mv(X: torch.Tensor) -> torch.Tensor:  # M X = W (C X)
        matvecs[0] += X.shape[-1]
        if M32 is not None:
            return M32 @ X
        assert C32 is not None
        if rows:
            return _m_rows(W32, C32, X)
        return W32 @ (C32 @ X)

    def mtv(Y: torch.Tensor) -> torch.Tensor:  # Mᵀ Y = C (Wᵀ Y)
        matvecs[0] += Y.shape[-1]
        if M32 is not None:
            return M32.mT @ Y
        assert C32 is not None
        if rows:
            return _mt_rows(W32, C32, Y)[0]
        return C32 @ (W32.mT @ Y)

    u32 = torch.finfo(torch.float32).eps / 2

    def finish(Q: torch.Tensor, f64: bool) -> tuple[torch.Tensor, ...]:
        """The final float64 Rayleigh–Ritz step on ``Q``'s leading ``r + 8`` columns and its
        posterior residuals: ``U``, ``S`` (all Ritz values), ``V``, the residual ``(B, m, r)`` and
        its relative column norms ``(B, r)``."""
        # its columns are Ritz vectors, descending: the rest changes the top r only at the order
        # of the squared residual, while the float64 products cost in proportion to the columns;
        # W and C_fix enter in their own dtype, _mm64 converts them block by block
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
        if f64:
            matvecs[0] += Pr.shape[-1]
            MPr = _m_rows(W, C_fix, Pr)
        else:
            MPr = mv(Pr.float()).double()  # mv counts its columns
        res = MPr - U * Sr.unsqueeze(-2)
        return U, S, V, res, (res.norm(dim=-2) / Sr).cpu()

    iters = 0
    done = None
    if dense:
        assert M32 is not None
        Q = dense_start(M32, ell)
        # The float32 Gram's eigenvectors are often the top subspace to float32 accuracy already
        # (flat spectra: weights, PiSSA): the final step on them, accepted where its posterior
        # residuals meet the iteration's own residual criterion (and float32 resolves them, as
        # below), makes the confirming float32 step unnecessary. Elsewhere the iteration follows.
        done = finish(Q, False)
        rel = done[4]
        # one set of Ritz values: _top_stop's value criterion cannot hold, its residual one decides
        _, kappa, res_ok, _ = _top_stop(rel, [done[1][..., :rank].cpu()], u32, tol, torch.zeros(Bn, dtype=torch.bool))
        met = res_ok & ~_beyond_float32(kappa)
        est = rel.double()  # a Ritz value moves at most by its residual
        if not bool(met.all()):
            done = None
    else:
        omega = torch.randn(Bn, n, b, generator=generator, dtype=torch.float32, device="cpu").to(dev)
        Q = _orth(mv(omega))
    if done is None:
        met = torch.zeros(Bn, dtype=torch.bool)
        if max_basis:
            Q, iters, est, kappa, met = _top_krylov(mv, mtv, Q, rank, ell, tol, max_iters, max_basis)
    krylov_steps = iters
    if done is None and not bool(met.all()) and iters < max_iters:
        # no Krylov basis, or it reached its size limit: subspace iteration
        Q, more, est, kappa, met_more = _top_iterate(mv, mtv, Q, rank, tol, max_iters - iters)
        met |= met_more
        iters += more
    # float32 cannot resolve the Ritz residuals below ~30·u₃₂·σ_1/σ_i; the final float64
    # Rayleigh–Ritz step makes the values accurate to about that floor squared. Where that could
    # exceed ~1e-7 (σ_1/σ_r ≳ 170: floor > 3e-4; a real q_proj at r = 24 left 2e-6 with a floor of
    # 2e-3) continue in float64 from the basis.
    need = [] if done is not None else _beyond_float32(kappa).nonzero().flatten().tolist()
    if need and iters < max_iters:  # only those matrices of the batch
        W64_ = W[need].double()
        C64_ = None if C_fix is None else C_fix[need].double()

        def mv64(X: torch.Tensor) -> torch.Tensor:
            matvecs[0] += X.shape[-1]
            return _m_rows(W64_, C64_, X)

        def mtv64(Y: torch.Tensor) -> torch.Tensor:
            matvecs[0] += Y.shape[-1]
            return _mt_rows(W64_, C64_, Y)[0]

        Q64_, more, est_need, _, met_need = _top_iterate(
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
        met[need] = met_need
        iters += more
        del W64_, C64_, Q64_
    U, S, V, res, rel_res = done if done is not None else finish(Q, bool(need))
    Sr = S[..., :rank]
    infos = []
    for b in range(Bn):
        s_next = float(S[b, rank]) if S.shape[-1] > rank else 0.0
        gap = float(Sr[b, -1]) - s_next
        res_f = float(res[b].norm())
        infos.append(
            {
                "method": "fast-ipm",
                "start": "dense" if dense else "random",
                "iterations": iters,
                "krylov_steps": krylov_steps,
                "matvecs": matvecs[0],
                "oversample": p,
                "sv_rel_bound": float(rel_res[b].max()),
                "sv_change_est": float(est[b].max()),
                "subspace_sin_est": res_f / gap if gap > 0 else math.inf,
                "converged": bool(met[b]),
            }
        )
    return U.float(), Sr.float(), V.float(), infos
