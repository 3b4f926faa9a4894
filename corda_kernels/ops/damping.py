"""CorDA's damped (regularized) inverse, batched over a leading dimension.

The rule (CorDA / PEFT, exactly): ``damp = 0.01``; loop ``C_fix = C + damp·mean(diag C)·I``,
``C_inv = C_fix⁻¹``; stop when ``‖C_fix·C_inv − I‖_F < threshold`` (0.05), else ``damp *= 2``.
The check is evaluated in the covariance's own precision (float32), as PEFT does: it is
what makes the rule pick a damp large enough for float32 inverses, and what keeps the
chosen damp (and so the adapters) equal to PEFT's. Unlike upstream the loop is bounded.

The screen (default). The literal rule pays an explicit inverse and an ``n³`` product per step,
4n³ flops, to learn one bit: is the residual below the threshold? On real covariances it is
50–500× below at the first damp. The screen factors ``C_fix = P·L·U`` once (⅔n³, the factor
``torch.linalg.inv`` itself starts from) and estimates the same residual from ``SCREEN_PROBES``
Gaussian probes: ``‖C_fix·(LU)⁻¹G − G‖_F / √s``, whose square is an unbiased estimate of
``‖C_fix·X − I‖_F²`` for the solve ``X = (LU)⁻¹``. A step is decided by the screen only when the
estimate is at least ``SCREEN_MARGIN`` (8×) away from the threshold on either side; otherwise,
or when it is not finite, that matrix gets the literal check. Against the oracle's float64 value
of the check (:func:`check_residual`), over 463 steps with residuals 1e-3–1 (the 120 distinct input
covariances of the embedded model and 16 of the benchmark's tiny models, 121 synthetic ones:
outlier channels, low-rank, badly scaled, power-law; n = 64–1536; ``bench/damping_screen_study.py``),
the estimate lies within a factor 0.22–3.8 of it, and within 0.49–1.26 where the check is not
dominated by its own float32 rounding (band ``rho < r/2``; elsewhere the oracle accepts either
decision near the threshold): an 8× margin leaves 1.7× to spare, 4× where it counts. Neither more
probes nor a float64 product narrows it (128 probes: 0.38–2.8): the solve's residual and the
explicit inverse's differ by their own rounding, so the margin stays 8×.

Near the threshold the inverse is taken (the literal check needs it); before its ``n³`` product,
``INVERSE_PROBES`` (64) probes through that very inverse, in float64, estimate the check's float64
value with no error but their own spread (:func:`inverse_residual`); a step more than
``INVERSE_MARGIN`` (2×) from the threshold is decided there. The spread is widest for a rank-one
residual, ``√(χ²₆₄/64)``: off by 2× is a ~1e-10 event. Only the rest get the float32 product.
``screen=False`` runs the literal rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..backend import define_op, register_impl, resolve
from .linalg import inv_ex, lu_factor_ex, lu_solve

DEFAULT_DAMP = 0.01
DEFAULT_THRESHOLD = 0.05
DEFAULT_MAX_STEPS = 40
SCREEN_PROBES = 32
SCREEN_MARGIN = 8.0
INVERSE_PROBES = 64
INVERSE_MARGIN = 2.0


class DampingError(RuntimeError):
    """The damping search failed for one matrix of the batch (``index``)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _fake(C, damp, threshold, max_steps, probes, inverse):  # noqa: ANN001, ANN202
    B = C.shape[0]
    C_inv = torch.empty_like(C) if inverse else C.new_empty(0)
    return torch.empty_like(C), C_inv, C.new_empty(B, dtype=torch.float64), C.new_empty(B, dtype=torch.bool)


define_op(
    "damped_inverse",
    "(Tensor C, float damp, float threshold, int max_steps, int probes, bool inverse)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _fake,
)


def diag_means(C: torch.Tensor) -> torch.Tensor:
    """``mean(diag C_b)`` for each matrix of ``C`` ``(B, n, n)``, rounded exactly as PEFT rounds it.

    One matrix at a time, on a contiguous diagonal: a batched strided mean rounds differently.
    """
    return torch.stack([torch.mean(torch.diag(c)) for c in C])


def fix_covariance(C: torch.Tensor, damp: torch.Tensor) -> torch.Tensor:
    """``C + damp·mean(diag C)·I`` for ``C`` ``(B, n, n)`` and ``damp`` ``(B,)`` (PEFT's arithmetic)."""
    shift = diag_means(C) * damp.to(device=C.device, dtype=C.dtype)
    out = C.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(shift.view(-1, 1))  # off the diagonal PEFT adds exact zeros
    return out


def exactly_symmetric(C: torch.Tensor, panel: int = 128) -> bool:
    """Whether every matrix of ``C`` ``(..., n, n)`` equals its transpose bit for bit.

    By panels of ``panel`` columns (a whole transposed read is cache-hostile: n = 1536 6.1 ms, by
    panels 2.2 ms). A covariance accumulated here is symmetric by construction (one triangle,
    mirrored), and a diagonal shift keeps it so.
    """
    n = C.shape[-1]
    for i in range(0, n, panel):
        e = min(n, i + panel)
        if not torch.equal(C[..., i:e, i:], C[..., i:, i:e].mT):
            return False
    return True


def _lapack_layout(A: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """``A`` ``(..., n, n)`` as LAPACK reads it (column-major) without a transposed copy where it is
    exactly symmetric: its transpose view is then the same matrix, column-major contiguous.

    torch's LU copies a row-major input into column-major order first; that transposed copy of
    fresh pages cost as much as half the factorization (n = 1536: LU 17.9 → 10.9 ms, the solve
    with the identity 32.5 → 25.4 ms with its column-major identity). The factors, and the
    inverse solved from them, are bit for bit those of ``A`` itself (the same matrix).
    """
    return A.mT if symmetric else A


def probe_residual(fixed: torch.Tensor, LU: torch.Tensor, pivots: torch.Tensor, probes: int) -> torch.Tensor:
    """Estimate of ``‖fixed·X − I‖_F`` for the LU solve ``X``, from ``probes`` Gaussian probes.

    ``fixed`` ``(B, n, n)``, ``(LU, pivots)`` its factors; the probes are fixed (seed 0), the
    product is taken in ``fixed``'s dtype like the rule's check. Returns float64 ``(B,)`` on the CPU.
    """
    B, n = fixed.shape[0], fixed.shape[-1]
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(n, probes, generator=gen, dtype=torch.float64).to(device=fixed.device, dtype=fixed.dtype)
    G = G.expand(B, n, probes)
    R = fixed @ lu_solve(LU, pivots, G) - G
    return (R.double().square().sum(dim=(-2, -1)) / probes).sqrt().cpu()


def inverse_residual(fixed: torch.Tensor, inv: torch.Tensor, probes: int, symmetric: bool = False) -> torch.Tensor:
    """Estimate of ``‖fixed·inv − I‖_F`` taken exactly, from ``probes`` Gaussian probes in float64.

    ``fixed``, ``inv`` ``(B, n, n)`` float32 (``inv`` the explicit inverse the check multiplies
    by); ``symmetric``: ``fixed`` is exactly symmetric. ``‖(fixed·inv − I)G‖_F² / s`` is an
    unbiased estimate of the check's float64 value squared, with no other error: ``inv`` is the
    check's own operand and the products are float64 (a float32 ``n³`` product is the cost this
    replaces). Returns float64 ``(B,)`` on the CPU.
    """
    from .cosvd.products import _mm64

    n = fixed.shape[-1]
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(n, probes, generator=gen, dtype=torch.float64).to(fixed.device)
    Gt = G.T.expand(fixed.shape[0], probes, n)
    Yt = _mm64(Gt, inv.mT)  # (inv·G)ᵀ = Gᵀ·invᵀ, by row panels of invᵀ (contiguous for a solve's column-major inv)
    Rt = _mm64(Yt, fixed) if symmetric else Yt @ fixed.mT.double()  # (fixed·inv·G)ᵀ
    return ((Rt - Gt).square().sum(dim=(-2, -1)) / probes).sqrt().cpu()


def _by_margin(est: torch.Tensor, threshold: float, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(accepted, near)`` for estimates ``est`` of the check: accepted at least ``margin`` below the
    threshold, rejected at least ``margin`` above it, near (a closer look decides) in between or NaN."""
    accepted = est <= threshold / margin
    return accepted, ~accepted & ~(est >= threshold * margin)


def search_damp(
    C: torch.Tensor,
    damp: float,
    threshold: float,
    max_steps: int,
    shifted: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probes: int = SCREEN_PROBES,
    inverse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The damping loop shared by every backend, on ``C`` ``(B, n, n)``.

    ``shifted(idx, damps)`` gives ``C_fix`` of the matrices ``idx`` (on ``C``'s device) for their
    float64 ``damps``; ``residual(C_fix, C_inv)`` gives ``‖C_fix·C_inv − I‖_F`` per matrix.
    ``probes > 0`` screens each step first (module docstring); ``probes = 0`` is the literal rule.
    Returns ``(C_fix, C_inv, damps, checked)``: ``C``'s dtype ``(B, n, n)``, the same for ``C_inv``
    (``inverse``) or an empty tensor, float64 ``(B,)`` on the CPU, and bool ``(B,)`` on the CPU,
    true where the accepting step ran the literal check.
    """
    B = C.shape[0]
    damps = torch.full((B,), damp, dtype=torch.float64)
    checked = torch.zeros(B, dtype=torch.bool)
    C_fix = torch.empty_like(C)
    C_inv = torch.empty_like(C) if inverse else C.new_empty(0)
    todo = torch.arange(B)
    symmetric = probes > 0 and exactly_symmetric(C)  # for the screen's LU; a diagonal shift keeps it
    for step in range(max_steps):
        fixed = shifted(todo.to(C.device), damps[todo])
        ok, inv, exact = _decide(fixed, threshold, residual, probes, inverse, symmetric)
        checked[todo] = exact
        if step == 0 and bool(ok.all()):  # the common case: the first damp suffices for all, no copies
            return fixed, inv, damps, checked
        done, ok_dev = todo[ok].to(C.device), ok.to(C.device)
        C_fix[done] = fixed[ok_dev]
        if inverse:
            C_inv[done] = inv[ok_dev]
        todo = todo[~ok]
        if todo.numel() == 0:
            return C_fix, C_inv, damps, checked
        damps[todo] *= 2
    raise DampingError(
        int(todo[0]),
        f"damped_inverse: no damp up to {damps[todo[0]].item() / 2:g} made ‖C_fix·C_inv − I‖_F < {threshold} "
        f"within {max_steps} doublings (matrix {int(todo[0])} of the batch)",
    )


def _decide(
    fixed: torch.Tensor,
    threshold: float,
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probes: int,
    inverse: bool,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the search for ``fixed`` ``(b, n, n)``: ``(accepted, C_inv, checked)``.

    ``accepted`` and ``checked`` are bool ``(b,)`` on the CPU; ``C_inv`` is ``(b, n, n)`` (rows of
    rejected matrices are garbage) when ``inverse``, else empty. ``symmetric``: every matrix of
    ``fixed`` is exactly symmetric (:func:`exactly_symmetric`), so LAPACK reads it without a copy.
    """
    b = fixed.shape[0]
    if probes <= 0:
        inv, info = inv_ex(fixed)
        err = residual(fixed, inv).cpu()
        return (info.cpu() == 0) & (err < threshold), inv, torch.ones(b, dtype=torch.bool)
    if fixed.device.type == "cpu" and b > 1:
        return _decide_each(fixed, threshold, residual, probes, inverse, symmetric)
    LU, pivots, info = lu_factor_ex(_lapack_layout(fixed, symmetric))
    factored = info.cpu() == 0
    accepted, near = _by_margin(probe_residual(fixed, LU, pivots, probes), threshold, SCREEN_MARGIN)
    ok, unsure = factored & accepted, factored & near
    need = unsure | ok if inverse else unsure
    inv = torch.empty_like(fixed) if inverse else fixed.new_empty(0)
    if bool(need.any()):
        idx = need.nonzero().flatten()
        whole = bool(need.all())
        sub = fixed if whole else fixed[idx.to(fixed.device)]
        # the very inverse the literal rule takes: torch's inv is a solve with the identity on
        # the same LU (bit-identical), so the screen's factors are reused instead of refactored
        eye = torch.eye(sub.shape[-1], dtype=sub.dtype, device=sub.device).mT.expand_as(sub)  # column-major
        if whole:
            sub_LU, sub_piv = LU, pivots
        else:
            sub_LU, sub_piv = LU[idx.to(LU.device)], pivots[idx.to(pivots.device)]
        sub_inv = lu_solve(sub_LU, sub_piv, eye)
        if inverse:
            inv = sub_inv if whole else inv.index_copy_(0, idx.to(fixed.device), sub_inv)
        sel = unsure[idx]  # factored (an unfactored matrix is rejected, not unsure)
        if bool(sel.any()):
            s_dev = sel.to(fixed.device)
            est = inverse_residual(sub[s_dev], sub_inv[s_dev], INVERSE_PROBES, symmetric)
            accepted, near = _by_margin(est, threshold, INVERSE_MARGIN)
            ok[idx[sel]] = accepted
            unsure[idx[sel]] = near
            lit = sel.clone()
            lit[sel] = near
            if bool(lit.any()):
                l_dev = lit.to(fixed.device)
                err = residual(sub[l_dev], sub_inv[l_dev]).cpu()
                ok[idx[lit]] = err < threshold
    return ok, inv, unsure


def _decide_each(
    fixed: torch.Tensor,
    threshold: float,
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probes: int,
    inverse: bool,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_decide` one matrix at a time, the CPU's way (its LU helpers loop anyway).

    One set of factors and one inverse, reused from matrix to matrix: no stacked batch of LU
    factors, pivots and solves (at n = 1536 those copies cost as much as a factorization), and no
    fresh pages per matrix. Same screen, same literal check, same decisions as the batched form.
    """
    b, n = fixed.shape[0], fixed.shape[-1]
    ok = torch.zeros(b, dtype=torch.bool)
    unsure = torch.zeros(b, dtype=torch.bool)
    inv = torch.empty_like(fixed) if inverse else fixed.new_empty(0)
    # one set of factors (column-major, as LAPACK writes them) and one inverse for the whole batch
    factors = (fixed.new_empty(n, n).mT, torch.empty(n, dtype=torch.int32), torch.empty((), dtype=torch.int32))
    inv_buf: torch.Tensor | None = None
    for i in range(b):
        one = fixed[i : i + 1]
        LU, pivots, info = torch.linalg.lu_factor_ex(_lapack_layout(one[0], symmetric), out=factors)
        if int(info) != 0:
            continue  # not factored: rejected, as in the batched form
        est = probe_residual(one, LU.unsqueeze(0), pivots.unsqueeze(0), probes)
        accepted, near = _by_margin(est, threshold, SCREEN_MARGIN)
        sure = bool(accepted[0])
        if not (sure or bool(near[0])):
            continue  # rejected by the screen
        if sure and not inverse:
            ok[i] = True
            continue
        eye = torch.eye(n, dtype=one.dtype, device=one.device).mT  # column-major, no copy
        if inv_buf is None:
            inv_buf = fixed.new_empty(n, n).mT
        one_inv = torch.linalg.lu_solve(LU, pivots, eye, out=inv_buf).unsqueeze(0)
        if inverse:
            inv[i] = one_inv[0]
        if sure:
            ok[i] = True
            continue
        est = inverse_residual(one, one_inv, INVERSE_PROBES, symmetric)
        accepted, near = _by_margin(est, threshold, INVERSE_MARGIN)
        ok[i] = bool(accepted[0])
        if bool(near[0]):  # near the threshold, or NaN: the check itself
            unsure[i] = True
            ok[i] = bool(residual(one, one_inv).cpu()[0] < threshold)
    return ok, inv, unsure


def search_with_residual(
    C: torch.Tensor,
    damp: float,
    threshold: float,
    max_steps: int,
    probes: int,
    inverse: bool,
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`search_damp` with the torch shift (``fix_covariance``) and the given check ``residual``."""
    return search_damp(
        C,
        damp,
        threshold,
        max_steps,
        # all of C at the first step: C[idx] would be a copy (fresh pages, ~0.2 s per GB)
        shifted=lambda idx, damps: fix_covariance(C if idx.numel() == C.shape[0] else C[idx], damps),
        residual=residual,
        probes=probes,
        inverse=inverse,
    )


@register_impl("damped_inverse", "torch")
def _damped_inverse_torch(
    C: torch.Tensor, damp: float, threshold: float, max_steps: int, probes: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return search_with_residual(C, damp, threshold, max_steps, probes, inverse, _identity_residual)


def _identity_residual(fixed: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``‖fixed·inv − I‖_F`` per matrix, the identity subtracted in place (same values as ``P − I``)."""
    prod = fixed @ inv
    prod.diagonal(dim1=-2, dim2=-1).sub_(1)
    return torch.linalg.matrix_norm(prod)


ORDER_SIGMAS = 6.0  # standard deviations of the rounding model covered by check_residual's band


def check_residual(fixed: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The check's value in float64 and how far a float32 evaluation of it may fall from it.

    For ``fixed``, ``inv`` ``(B, n, n)`` float32 returns float64 ``(r, rho)`` ``(B,)``: ``r`` =
    ``‖fixed·inv − I‖_F`` computed in float64 from the float32 operands, and ``rho`` the band in
    which a float32 evaluation in any summation order (another CPU's BLAS kernel, a Triton tile
    order) lands. Worst-case analysis (``γ_n·‖|fixed|·|inv|‖_F``) is rigorous but 10²–10³× wider
    than any order gives on the cancelling products of a near-singular ``fixed`` and its
    inverse. The band uses the rounding error ``E = fl₃₂(fixed·inv) − fixed·inv`` of the product
    as formed here instead: another order gives ``E'`` with entries of the same magnitudes,
    and ``‖P + E'‖ − ‖P‖ ≈ ⟨P̂, E'⟩ + ‖E'‖²/(2‖P‖)`` (``P`` the exact residual matrix,
    ``P̂ = P/‖P‖``), whose first term has standard deviation ``≈ ‖P̂∘E‖_F``; so
    ``rho = min(worst case, ORDER_SIGMAS·√2·‖P̂∘E‖_F + 2‖E‖²/‖P‖)`` (the last term allows
    ``‖E'‖ ≤ 2‖E‖``), plus the ``− I`` and the norm's pairwise reduction. Two machines or
    backends may take opposite decisions at a threshold ``t`` only when ``|r − t| ≤ rho``.
    """
    n = fixed.shape[-1]
    u = torch.finfo(torch.float32).eps / 2
    A, X = fixed.double(), inv.double()
    P = A @ X  # the exact product; the identity is subtracted after E is taken
    E = (fixed.float() @ inv.float()).double() - P
    P.diagonal(dim1=-2, dim2=-1).sub_(1)
    r = torch.linalg.matrix_norm(P)
    gamma = n * u / (1 - n * u)
    worst = gamma * torch.linalg.matrix_norm(A.abs() @ X.abs())
    r_safe = r.clamp_min(torch.finfo(torch.float64).tiny).view(-1, 1, 1)
    spread = ORDER_SIGMAS * 2**0.5 * torch.linalg.matrix_norm(P / r_safe * E)
    model = spread + 2 * E.square().sum((-2, -1)) / r_safe.view(-1)
    prod = torch.minimum(worst, model) + u * (r + n**0.5)
    levels = math.ceil(math.log2(max(n * n, 2))) + 1
    rho = prod + levels * u / (1 - levels * u) * (r + prod)
    return r.cpu(), rho.cpu()


def rule_allows(
    C: torch.Tensor,
    damps: torch.Tensor,
    *,
    damp: float = DEFAULT_DAMP,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[str]:
    """Whether the damps a backend chose for ``C`` ``(B, n, n)`` are ones the rule can choose.

    The rule is replayed in float64 (:func:`check_residual`) on the very ``C_fix`` and inverse
    of each step: a step whose residual lies within rounding of ``threshold`` may be accepted
    or rejected (another CPU or kernel may sum in another order), every other step must be
    decided as in exact arithmetic on those operands. Returns the violations as sentences
    (empty: the choice is one the rule allows). The oracle of the tests and the GPU suite.
    """
    problems = []
    for b in range(C.shape[0]):
        d = float(damps[b])
        steps = math.log2(d / damp)
        if abs(steps - round(steps)) > 1e-9 or steps < -1e-9:
            problems.append(f"matrix {b}: damp {d:g} is not {damp:g}·2^k")
            continue
        last = round(steps)
        for k in range(last + 1):
            fixed = fix_covariance(C[b : b + 1], torch.tensor([damp * 2.0**k], dtype=torch.float64))
            inv, info = inv_ex(fixed)
            r, rho = check_residual(fixed, inv)
            r, rho = float(r[0]), float(rho[0])
            if k < last and int(info[0]) == 0 and r + rho < threshold:
                problems.append(f"matrix {b}: damp {damp * 2.0**k:g} passes the check surely (r = {r:.3g} ± {rho:.2g})")
            if k == last and (int(info[0]) != 0 or r - rho >= threshold):
                problems.append(f"matrix {b}: damp {d:g} fails the check surely (r = {r:.3g} ± {rho:.2g})")
    return problems


def damped_inverse(
    C: torch.Tensor,
    *,
    damp: float = DEFAULT_DAMP,
    threshold: float = DEFAULT_THRESHOLD,
    max_steps: int = DEFAULT_MAX_STEPS,
    screen: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Damped inverse of a covariance ``C`` ``(n, n)`` or a batch ``(B, n, n)``.

    Returns ``(C_fix, C_inv, damp)`` with the input's shape; ``damp`` is a float for one
    matrix and a float64 ``(B,)`` tensor for a batch. ``C_inv`` is ``torch.linalg.inv(C_fix)``.
    ``screen=False`` runs the literal rule (module docstring). Raises ``ValueError`` on a
    non-finite or non-square ``C`` and :class:`DampingError` when ``max_steps`` doublings do not
    suffice.
    """
    C_fix, C_inv, damps, _ = _run(C, damp, threshold, max_steps, screen, inverse=True)
    if C.dim() == 2:
        return C_fix[0], C_inv[0], float(damps[0])
    return C_fix, C_inv, damps


def damp_covariance(
    C: torch.Tensor,
    *,
    damp: float = DEFAULT_DAMP,
    threshold: float = DEFAULT_THRESHOLD,
    max_steps: int = DEFAULT_MAX_STEPS,
    screen: bool = True,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule's ``C_fix`` and ``damp`` without handing back an inverse (what CO-SVD needs).

    ``C`` ``(n, n)`` or ``(B, n, n)``. Returns ``C_fix`` (``C``'s dtype and shape), float64 ``damps``
    ``(B,)`` and bool ``checked`` ``(B,)`` on the CPU (``(1,)`` for one matrix; true where the
    accepting step ran the literal check, not only the screen). With the screen, an accepted
    step costs one LU factorization instead of an inverse and an ``n³`` product. Errors as
    :func:`damped_inverse`.

    ``overwrite``: the caller gives ``C`` up (a contiguous ``(B, n, n)`` scratch copy). Where the op
    runs its torch implementation, a step that shifts every matrix shifts ``C`` itself, and
    ``C_fix`` may be ``C``: no copy of ``B·n²`` fresh pages (on a VM each first touch of a page
    is a fault). The same values, bit for bit.
    """
    in_place = overwrite and C.dim() == 3 and C.is_contiguous()
    if in_place and resolve("damped_inverse", C.device) is _damped_inverse_torch:
        Cb = _validated(C, max_steps)
        C_fix, _, damps, checked = search_damp(
            Cb,
            damp,
            threshold,
            max_steps,
            shifted=_shifted_in_place(Cb),
            residual=_identity_residual,
            probes=SCREEN_PROBES if screen else 0,
            inverse=False,
        )
        return C_fix, damps, checked
    C_fix, _, damps, checked = _run(C, damp, threshold, max_steps, screen, inverse=False)
    return (C_fix[0] if C.dim() == 2 else C_fix), damps, checked


def _shifted_in_place(C: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``shifted(idx, damps)`` for :func:`search_damp` that shifts ``C`` ``(B, n, n)`` itself when
    ``idx`` is all of it, else a copy of ``C[idx]``; every diagonal from ``C``'s original one, so the
    values are :func:`fix_covariance`'s of the original ``C``."""
    diag = C.diagonal(dim1=-2, dim2=-1)
    original = diag.clone()
    means = diag_means(C)

    def shifted(idx: torch.Tensor, damps: torch.Tensor) -> torch.Tensor:
        shift = (means[idx] * damps.to(device=C.device, dtype=C.dtype)).view(-1, 1)
        if idx.numel() == C.shape[0]:
            diag.copy_(original + shift)
            return C
        out = C[idx]
        out.diagonal(dim1=-2, dim2=-1).copy_(original[idx] + shift)
        return out

    return shifted


def _validated(C: torch.Tensor, max_steps: int) -> torch.Tensor:
    """``C`` as a ``(B, n, n)`` view after the checks every entry point makes (errors as :func:`damped_inverse`)."""
    if C.dim() not in (2, 3) or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"damped_inverse: C must be (n, n) or (B, n, n), got {tuple(C.shape)}")
    if not C.dtype.is_floating_point:
        raise TypeError(f"damped_inverse: C must be floating point, got {C.dtype}")
    if max_steps < 1:
        raise ValueError(f"damped_inverse: max_steps must be >= 1, got {max_steps}")
    Cb = C.unsqueeze(0) if C.dim() == 2 else C
    # a sum is finite when every entry is (a finite sum that overflows only costs the full check)
    finite = torch.isfinite(Cb.sum(dim=(-2, -1)))
    if not bool(finite.all()):
        finite = torch.isfinite(Cb).flatten(1).all(1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise ValueError(f"damped_inverse: covariance {bad} of the batch has NaN or Inf entries")
    return Cb


def _run(
    C: torch.Tensor, damp: float, threshold: float, max_steps: int, screen: bool, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate ``C`` and run the op on a ``(B, n, n)`` view."""
    Cb = _validated(C, max_steps)
    probes = SCREEN_PROBES if screen else 0
    return torch.ops.corda_kernels.damped_inverse(Cb.contiguous(), damp, threshold, max_steps, probes, inverse)
