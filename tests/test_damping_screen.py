"""The damping screen (:mod:`corda_kernels.ops.damping`): the same damp, ``C_fix`` and ``C_inv`` as the
literal rule, with the literal check only where the probe estimate is near the threshold."""

from __future__ import annotations

import math

import pytest
import torch

import corda_kernels as ck
from corda_kernels.ops.damping import (
    SCREEN_MARGIN,
    _identity_residual,
    damp_covariance,
    fix_covariance,
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
    """Counting the literal checks: none where the estimate is ≥ 8× away, one where it is near."""
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
    lo, hi = math.log(damps[0]), math.log(damps[-1])  # bisect (log damp) to a residual just below 0.05
    for _ in range(60):
        mid = (lo + hi) / 2
        r = float(_identity_residual(*_fix_inv(C, math.exp(mid)))[0])
        if 0.02 < r < 0.045:
            break
        lo, hi = (lo, mid) if r < 0.02 else (mid, hi)
    assert 0.02 < r < 0.045, r
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
    # a damp whose literal residual lands inside the screen's margin (between t/8 and t)
    lo, hi = math.log(1e-10), math.log(1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        r = float(_identity_residual(*_fix_inv(near.unsqueeze(0), math.exp(mid)))[0])
        if 0.05 / SCREEN_MARGIN < r < 0.045:
            break
        lo, hi = (lo, mid) if r < 0.05 / SCREEN_MARGIN else (mid, hi)
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
