"""The damping screen (:mod:`corda_kernels.ops.damping`): the same damp, ``C_fix`` and ``C_inv`` as the
literal rule, with the literal check only where the probe estimate is near the threshold."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import corda_kernels as ck
from corda_kernels.ops.damping import (
    INVERSE_PROBES,
    SCREEN_MARGIN,
    SCREEN_PROBES,
    _identity_residual,
    check_residual,
    damp_covariance,
    exactly_symmetric,
    fix_covariance,
    inverse_residual,
    probe_residual,
    rule_allows,
    search_damp,
)
from corda_kernels.ops.linalg import lu_factor_ex


def covariance(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 ``(n, n)`` covariances with the structures real layers show, and harder ones."""
    g = dict(generator=gen, dtype=torch.float64)
    if kind == "outlier":  # a few channels 300× the rest, as in LLM activations
        X = torch.randn(3 * n, n, **g)
        X[:, torch.randperm(n, generator=gen)[:3]] *= 300.0
    elif kind == "lowrank":  # fewer tokens than features
        X = torch.randn(n // 3, n, **g)
    elif kind == "scaled":  # channel scales over six orders of magnitude
        X = torch.randn(2 * n, n, **g) * torch.logspace(-3, 3, n, dtype=torch.float64)
    else:  # power-law spectrum
        Q, _ = torch.linalg.qr(torch.randn(n, n, **g))
        return ((Q * torch.arange(1, n + 1, dtype=torch.float64) ** -3.0) @ Q.T).float()
    return (X.T @ X).float()


KINDS = ["outlier", "lowrank", "scaled", "powerlaw"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [57, 200])
def test_screen_chooses_the_literal_damp(kind: str, n: int, gen: torch.Generator) -> None:
    """From a start far below 0.01 every step is decided; the screen must agree with the rule at each.

    A step whose residual lies within rounding of the threshold may go either way (the screen's
    literal check and the literal rule's take their float32 products on batches of different
    sizes, whose kernels may sum in another order): every damp must be one the rule allows
    (:func:`rule_allows`, float64 replay), and where the two damps agree so must ``C_fix`` and the inverse.
    """
    C = torch.stack([covariance(kind, n, gen) for _ in range(3)])
    for damp0 in (1e-9, 1e-4, 0.01):
        f0, i0, d0 = ck.damped_inverse(C, damp=damp0, screen=False)
        f1, i1, d1 = ck.damped_inverse(C, damp=damp0)
        f2, d2, _ = damp_covariance(C, damp=damp0)
        for d in (d0, d1, d2):
            assert rule_allows(C, d, damp=damp0) == [], (kind, damp0, d.tolist(), gen.initial_seed())
        for b in range(C.shape[0]):
            if float(d1[b]) == float(d0[b]):
                assert torch.equal(f1[b], f0[b]) and torch.equal(i1[b], i0[b])
            if float(d2[b]) == float(d0[b]):
                assert torch.equal(f2[b], f0[b])


def test_screen_decides_far_from_threshold_and_checks_near_it(gen: torch.Generator) -> None:
    """Counting the literal checks: none where the estimate is a margin away, one where it is near."""
    C = covariance("lowrank", 160, gen).unsqueeze(0)  # singular: hopeless at tiny damps
    calls: list[int] = []

    def counted(fixed: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        calls.append(fixed.shape[0])
        return _identity_residual(fixed, inv)

    def run(damp: float) -> tuple[float, bool]:
        calls.clear()
        _, _, d, checked = search_damp(
            C, damp, 0.05, 60, lambda idx, ds: fix_covariance(C[idx], ds), counted, inverse=False
        )
        return float(d[0]), bool(checked[0])

    # literal residuals along the doublings from a tiny damp
    damps = [1e-10 * 2**k for k in range(45)]
    res = [float(_identity_residual(*_fix_inv(C, d))[0]) for d in damps]
    far = [d for d, r in zip(damps, res) if r < 0.05 / (4 * SCREEN_MARGIN)]
    assert far, res
    d, checked = run(far[0] * 4)  # well inside: accepted by the screen alone
    assert calls == [] and not checked and d == far[0] * 4
    mid = _damp_with_residual(C, NEAR)
    d, checked = run(math.exp(mid))  # near the threshold: the literal check decides
    assert checked and len(calls) == 1 and d == math.exp(mid)
    start = damps[0]
    d, _ = run(start)  # from far below: rejections by the screen, then the rule's damp
    literal = next(dd for dd, r in zip(damps, res) if r < 0.05)
    assert d == literal
    assert len(calls) < round(math.log2(literal / start)), "the screen must reject the hopeless steps itself"


def _fix_inv(C: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    F = fix_covariance(C, torch.full((C.shape[0],), damp, dtype=torch.float64))
    return F, torch.linalg.inv(F)


# Literal residuals near the threshold 0.05 (the second tier's 2× margin reaches down to 0.025: at
# 0.038 its 64 probes would have to be 1.5× low, a ~1e-5 event for a rank-one residual) and well
# inside the screen's margin but more than the second tier's below it.
NEAR = (0.038, 0.048)
INSIDE = (0.009, 0.016)


def _damp_with_residual(C: torch.Tensor, band: tuple[float, float]) -> float:
    """log of a damp whose literal residual for ``C`` ``(1, n, n)`` lies in ``band`` (bisection on log damp)."""
    lo, hi = math.log(1e-10), math.log(10.0)
    for _ in range(80):
        mid = (lo + hi) / 2
        r = float(_identity_residual(*_fix_inv(C, math.exp(mid)))[0])
        if band[0] < r < band[1]:
            return mid
        lo, hi = (lo, mid) if r < band[0] else (mid, hi)
    raise AssertionError(f"no damp gives a residual in {band} (last {r:.3g})")


@pytest.mark.parametrize("kind", KINDS)
def test_probe_estimate_tracks_the_residual(kind: str, gen: torch.Generator) -> None:
    """The estimate against ‖fl(C_fix·X) − I‖_F for the same LU solve ``X`` (the float32 product the
    rule's check takes), where the screen has to decide: residuals from 1e-4 up."""
    C = covariance(kind, 120, gen).double()
    C = (C - 0.999 * torch.linalg.eigvalsh(C)[0] * torch.eye(120, dtype=torch.float64)).float()  # κ up ≥ 1000×
    checked = 0
    for damp in (1e-10, 1e-8, 1e-6, 1e-4, 1e-3):
        F = fix_covariance(C.unsqueeze(0), torch.tensor([damp], dtype=torch.float64))
        LU, piv, info = lu_factor_ex(F)
        assert int(info[0]) == 0
        X = torch.linalg.lu_solve(LU, piv, torch.eye(120).unsqueeze(0))
        exact = float(torch.linalg.matrix_norm((F @ X).double() - torch.eye(120, dtype=torch.float64))[0])
        if exact < 1e-4:  # far below the threshold: float32 rounding noise, which the screen accepts
            continue
        est = float(probe_residual(F, LU, piv, 32)[0])
        assert 0.4 < est / exact < 2.5, (kind, damp, est, exact, gen.initial_seed())
        checked += 1
    assert checked >= 1, f"no damp gave a residual ≥ 1e-4 for {kind} (seed {gen.initial_seed()})"


def test_second_tier_decides_inside_the_screen_margin_without_the_product(gen: torch.Generator) -> None:
    """A residual inside the screen's margin but a factor 3+ below the threshold: the probes through
    the inverse accept the step (no float32 ``n³`` product), with the rule's damp, ``C_fix`` and inverse."""
    C = covariance("lowrank", 160, gen).unsqueeze(0)
    mid = _damp_with_residual(C, INSIDE)
    F = fix_covariance(C, torch.tensor([math.exp(mid)], dtype=torch.float64))
    LU, piv, _ = lu_factor_ex(F)
    assert 0.05 / SCREEN_MARGIN < float(probe_residual(F, LU, piv, SCREEN_PROBES)[0]), "the screen alone would decide"
    calls: list[int] = []

    def counted(fixed: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        calls.append(fixed.shape[0])
        return _identity_residual(fixed, inv)

    for batch, inverse in itertools.product((1, 2), (False, True)):  # a CPU batch is decided matrix by matrix
        calls.clear()
        Cb = C.expand(batch, -1, -1).contiguous()
        fixed, inv, d, checked = search_damp(
            Cb, math.exp(mid), 0.05, 60, lambda idx, ds, Cb=Cb: fix_covariance(Cb[idx], ds), counted, inverse=inverse
        )
        assert calls == [] and not bool(checked.any()), (batch, inverse, calls)
        assert d.tolist() == [math.exp(mid)] * batch and rule_allows(Cb, d, damp=math.exp(mid)) == []
        f0, i0, d0 = ck.damped_inverse(Cb, damp=math.exp(mid), screen=False)
        assert torch.equal(d0, d) and torch.equal(fixed, f0)
        if inverse:
            assert torch.equal(inv, i0)


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_probes_estimate_the_check(kind: str, gen: torch.Generator) -> None:
    """The second tier's estimate against the check's float64 value for the same inverse: only the
    probes' spread, ``√(χ²₆₄/64)`` at worst (rank one) inside 0.62–1.44 but for a 1e-5 event."""
    C = covariance(kind, 150, gen).double()
    C = (C - 0.999 * torch.linalg.eigvalsh(C)[0] * torch.eye(150, dtype=torch.float64)).float()
    checked = 0
    for damp in (1e-10, 1e-8, 1e-6, 1e-4, 1e-3):
        F = fix_covariance(C.unsqueeze(0), torch.tensor([damp], dtype=torch.float64))
        X = torch.linalg.inv(F)
        r = float(check_residual(F, X)[0][0])
        if r < 1e-4:
            continue
        for symmetric in (True, False):
            est = float(inverse_residual(F, X, INVERSE_PROBES, symmetric)[0])
            assert 0.6 < est / r < 1.5, (kind, damp, symmetric, est, r, gen.initial_seed())
        checked += 1
    assert checked >= 1, f"no damp gave a residual ≥ 1e-4 for {kind} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("n", [5, 128, 300])
def test_exactly_symmetric_finds_any_asymmetric_entry(n: int, gen: torch.Generator) -> None:
    """Every position, on either side of the diagonal, in every panel; one matrix of a batch suffices."""
    C = torch.stack([covariance("outlier", n, gen) for _ in range(2)])
    C = (C + C.mT) / 2  # exactly symmetric whatever the float32 product gave
    assert exactly_symmetric(C)
    for i, j in [(0, n - 1), (n - 1, 0), (n // 2, n // 3), (n - 2, n - 1), (1, 0)]:
        D = C.clone()
        D[1, i, j] = torch.nextafter(D[1, i, j], torch.tensor(float("inf")))
        assert not exactly_symmetric(D), (i, j)


def test_asymmetric_input_gets_the_inverse_of_itself(gen: torch.Generator) -> None:
    """A covariance that is not exactly symmetric (one entry a bit off) is factored as it is: the
    screen's inverse is ``torch.linalg.inv`` of its own ``C_fix``, not of its transpose's."""
    n = 200
    C = covariance("powerlaw", n, gen)
    C = (C + C.T) / 2
    C[3, 150] *= 1.001
    fixed, inv, d = ck.damped_inverse(C, damp=1e-3)
    assert torch.equal(fixed, fix_covariance(C.unsqueeze(0), torch.tensor([d], dtype=torch.float64))[0])
    assert torch.equal(inv, torch.linalg.inv(fixed))


def test_damp_covariance_single_matrix_and_literal(gen: torch.Generator) -> None:
    C = covariance("lowrank", 90, gen)
    f, d, checked = damp_covariance(C)
    f0, _, d0 = ck.damped_inverse(C, screen=False)
    assert f.shape == (90, 90) and torch.equal(f, f0) and float(d[0]) == d0
    _, _, checked_literal = damp_covariance(C, screen=False)
    assert bool(checked_literal.all())
    with pytest.raises(ValueError, match="NaN or Inf"):
        damp_covariance(torch.full((4, 4), float("inf")))


def test_cpu_batch_decides_each_matrix_as_alone(gen: torch.Generator) -> None:
    """On the CPU a batch is decided one matrix at a time (no stacked LU factors): every decision,
    every literal check and every inverse equals what the one-matrix step gives for that matrix —
    on a batch holding a screen accept, a literal check near the threshold and a rejection."""
    from corda_kernels.ops.damping import _decide

    n = 96
    ok_far = covariance("outlier", n, gen)
    hopeless = covariance("lowrank", n, gen)  # singular: its tiny damp is rejected
    near = hopeless.clone()
    mid = _damp_with_residual(near.unsqueeze(0), NEAR)  # inside both margins: the literal check
    fixed = torch.stack(
        [
            fix_covariance(ok_far.unsqueeze(0), torch.tensor([0.01], dtype=torch.float64))[0],
            fix_covariance(near.unsqueeze(0), torch.tensor([math.exp(mid)], dtype=torch.float64))[0],
            fix_covariance(hopeless.unsqueeze(0), torch.tensor([1e-12], dtype=torch.float64))[0],
        ]
    )
    for inverse in (True, False):
        ok, inv, unsure = _decide(fixed, 0.05, _identity_residual, 32, inverse)
        for i in range(3):
            ok1, inv1, unsure1 = _decide(fixed[i : i + 1], 0.05, _identity_residual, 32, inverse)
            assert bool(ok[i]) == bool(ok1[0]) and bool(unsure[i]) == bool(unsure1[0]), (i, inverse)
            if inverse and bool(ok[i]):
                assert torch.equal(inv[i], inv1[0]), i
        assert bool(ok[0]) and not bool(unsure[0])  # far below: the screen alone
        assert bool(unsure[1])  # near: the literal check ran
        assert not bool(ok[2])  # hopeless: rejected


@pytest.mark.parametrize(
    "kinds,damp0",
    [
        (("outlier", "lowrank", "powerlaw", "scaled"), 0.01),  # all accepted at once
        (("outlier", "lowrank", "powerlaw", "scaled"), 1e-7),  # some need more doublings
        (("lowrank", "lowrank"), 1e-9),  # all rejected at first: the whole batch shifted again
    ],
)
def test_overwrite_gives_the_same_damps_and_values_in_place(kinds: tuple, damp0: float, gen: torch.Generator) -> None:
    """``overwrite=True`` shifts the caller's scratch copy instead of a fresh one: the same damps and
    bits as the copying path, whether every matrix is accepted at the first damp (``C_fix`` is the
    scratch itself) or some need more doublings (from the original diagonal, not the shifted one)."""
    n = 120
    C = torch.stack([covariance(kind, n, gen) for kind in kinds])
    f0, d0, c0 = damp_covariance(C, damp=damp0)
    scratch = C.clone()
    f1, d1, c1 = damp_covariance(scratch, damp=damp0, overwrite=True)
    assert torch.equal(d1, d0) and torch.equal(c1, c0)
    assert torch.equal(f1, f0)
    assert torch.equal(f1, fix_covariance(C, d0))
    if bool((d0 == damp0).all()):
        assert f1.data_ptr() == scratch.data_ptr()  # no copy
    else:
        assert not bool((d0 == damp0).any()) or f1.data_ptr() != scratch.data_ptr()
    assert torch.equal(C.tril(-1), scratch.tril(-1))  # only the diagonal is ever written
    with pytest.raises(ValueError, match="NaN or Inf"):
        damp_covariance(torch.full((2, 4, 4), float("inf")), overwrite=True)
