"""CO-SVD: the context-oriented SVD ``W·C_fix = U Σ Vhᵀ``, ``V = (Vh·C_fix⁻¹)ᵀ``, exact and fast.

``W`` is ``(m, n)`` (out × in), ``C`` the ``(n, n)`` covariance of the layer's inputs;
``k = min(m, n)``. Then ``W = U diag(S) Vᵀ`` with ``U`` ``(m, k)``, ``S`` ``(k,)`` descending
and ``V`` ``(n, k)``. Modules: :mod:`.exact` (full float64 SVD, the reference), :mod:`.top` and
:mod:`.bottom` (the fast paths below), :mod:`.iteration` and :mod:`.products` (what they share),
:mod:`.compare` (how close two sets of triplets are).

The fast paths give the top ``r`` (IPM) or bottom ``r`` (KPM) triplets of ``M = W·C_fix`` only.

Shapes: ``W`` ``(m, n)`` or a batch ``(B, m, n)`` of same-shaped layers, ``C_fix`` ``(n, n)`` /
``(B, n, n)`` (already damped, symmetric positive definite); ``k = min(m, n)``. Every entry
point returns float32 ``U`` ``(…, m, r)``, ``S`` ``(…, r)`` descending and ``V`` ``(…, n, r)``
with ``V = (Vh·C_fix⁻¹)ᵀ`` restricted to the chosen triplets (docs/design.md §3), plus a list of
per-matrix ``info`` dicts (method, iterations, accuracy estimates).

Top ``r`` (:func:`top_r`): up to ``k = DENSE_MAX_K`` the subspace iteration starts from the
top eigenvectors of the float32 Gram matrix of ``M`` (one dense ``eigh``, :func:`.top.dense_start`),
which it confirms in one step where the spectrum is flat; above, randomized block Krylov
iteration on ``M`` applied implicitly as ``W·(C·X)`` / ``C·(Wᵀ·Y)`` in float32: blocks of ``b = p`` columns, the basis
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
Where that float32 floor exceeds 3e-4 (``σ_1/σ_r ≳ 170``: the final step's values would be good
only to the floor squared, above 1e-7; one down_proj of the embedded model has 7.8e4) the
iteration continues from its basis in float64.
A final Rayleigh–Ritz step in float64 on the top ``r + 8`` Ritz vectors gives the triplets and a
posterior residual bound ``max_i ‖M v_i − σ̃_i u_i‖/σ̃_i`` (some singular value of ``M`` lies
within it of each ``σ̃_i``), measured with one float32 product (float64 after the float64
continuation). Above ``n = 4096`` the float32 products take the row-panel form ``(Xᵀ·C)·Wᵀ``,
faster with thin blocks. ``info["converged"]`` says whether the stopping rule was met; where it
was not (the iteration ran out of steps: a top spectrum as packed as a Gaussian weight's at
``k ≥ 1024``), :func:`fast_cosvd` does the matrix again from the dense start, and takes the exact
SVD (``exact-fallback``) if that does not settle either.

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
* ``qr``: the ``R`` of a float64 Householder QR of ``A``, accurate to ``ε₆₄·κ(M)``. It iterates
  rather than taking the top eigenpairs of ``T = A⁻¹A⁻ᵀ`` (``R⁻¹R⁻ᵀ`` for a non-square ``A``),
  formed explicitly, from one dense ``eigh``: that route is as accurate (~1e-10) and needs no
  random start, but on 2 cores it cost as much or more (eight 384² layers: 65 against 64 ms;
  eight 576²: 167 against 136 ms; four 768²: 176 against 114 ms), the tridiagonalization's
  level-2 BLAS outweighing the iterations.

A factor whose a-priori error (from cheap estimates or bounds of the condition numbers)
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

from typing import Literal

import torch

from ..damping import damp_covariance
from .bottom import bottom_r
from .compare import compare_triplets, principal_cosines, triplets_from_adapter
from .exact import cosvd_float64, select
from .iteration import BOTTOM_CERTIFY, BOTTOM_TOL, TOP_TOL
from .top import top_r

__all__ = [
    "BOTTOM_CERTIFY",
    "BOTTOM_TOL",
    "DENSE_MAX_K",
    "FAST_MIN_K",
    "TOP_TOL",
    "bottom_r",
    "compare_triplets",
    "cosvd",
    "cosvd_float64",
    "fast_cosvd",
    "principal_cosines",
    "select",
    "top_r",
    "triplets_from_adapter",
]

Which = Literal["top", "bottom", "all"]
_METHODS = ("exact", "fast")
# ``fast`` takes the float64 SVD itself below this min(m, n): there it is the cheaper of the two
# (per layer, 4-layer batches, 2 cores: k = 64 0.4 ms exact against 0.7 / 0.9 ms for the fast
# top / bottom; k = 128 1.9 against 1.4 / 2.7; k = 192 4.1 against 2.4 / 4.2; k = 256 8.4 against
# 2.9 / 5.7), and exact.
FAST_MIN_K = 160
# The top path starts from the dense float32 Gram ``eigh`` (top.dense_start) up to this k, from a
# random block Krylov basis above. Per layer, 2 cores, r = 16: random flat spectra (where Krylov
# needs 8–10 steps) k = 256 7 against 16 ms, 384 ×384 7.6 against 9.2, 384×1536 19 against 37,
# 512 14 against 16, 640 22 against 19; the embedded model's layers (Krylov stops in 5–8 steps)
# k = 192 5–7 against 9–15, k = 576 24 against 12–15.
DENSE_MAX_K = 384


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

    ``C`` is damped by the CorDA rule (:func:`~corda_kernels.ops.damping.damp_covariance`) unless ``C_fix`` is given.
    Returns ``(U, S, V)``: ``U`` ``(m, r)``, ``S`` ``(r,)`` descending, ``V`` ``(n, r)`` float32,
    the ``rank`` largest (``which="top"``), smallest (``"bottom"``) or all ``k`` triplets.
    ``method="fast"`` (default) takes the fast paths (:func:`fast_cosvd`) for ``top``/``bottom`` where
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
    if method == "fast" and which != "all" and k >= FAST_MIN_K:
        U, S, V, infos = fast_cosvd(W, C_fix, rank=rank, which=which)
        if info is not None:
            info.update(infos[0] if len(infos) == 1 else {"batch": infos})
        return U, S, V
    if info is not None:
        info["method"] = "exact"
    U, S, V = torch.ops.corda_kernels.cosvd_full(W, C_fix)
    return select(U, S, V, rank, which)


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
        dense = min(Wb.shape[-2], Wb.shape[-1]) <= DENSE_MAX_K
        U, S, V, infos = top_r(Wb, Cb, rank, generator=generator, dense=dense)
        U, S, V, infos = _certify_top(Wb, Cb, rank, (U, S, V), infos)
    elif which == "bottom":
        U, S, V, infos = bottom_r(Wb, Cb, rank, generator=generator)
    else:
        raise ValueError(f"fast_cosvd: which must be 'top' or 'bottom', got {which!r}")
    if single:
        return U[0], S[0], V[0], infos
    return U, S, V, infos


def _certify_top(
    W: torch.Tensor, C_fix: torch.Tensor, rank: int, got: tuple[torch.Tensor, ...], infos: list[dict]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Matrices whose top iteration ran out of steps without meeting its stopping rule (a top
    spectrum too flat for the random Krylov start to settle within the bound) are done again from
    the dense start, and where that does not settle either, by the exact float64 SVD
    (``info["method"] = "exact-fallback"``): a top result is returned only converged."""
    U, S, V = got
    todo = [b for b, info in enumerate(infos) if not info["converged"]]
    if todo and infos[todo[0]]["start"] == "random":
        U2, S2, V2, infos2 = top_r(W[todo], C_fix[todo], rank, dense=True)
        for j, b in enumerate(todo):
            U[b], S[b], V[b] = U2[j], S2[j], V2[j]
            infos[b] = {**infos2[j], "retried_from": {k: infos[b][k] for k in ("iterations", "sv_rel_bound")}}
        todo = [b for b in todo if not infos[b]["converged"]]
    if todo:
        Ue, Se, Ve = select(*torch.ops.corda_kernels.cosvd_full(W[todo], C_fix[todo]), rank, "top")
        for j, b in enumerate(todo):
            U[b], S[b], V[b] = Ue[j], Se[j], Ve[j]
            infos[b] = {"method": "exact-fallback", "rejected": infos[b]}
    return U, S, V, infos
