"""Cheap spectra (values only) against float64 references with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from corda_kernels.ops.spectra import candidate_spectrum, compactness, eig_extremes, singular_values


def _orth(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def _spd(n: int, lam: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    Q = _orth(n, gen)
    return (Q * lam) @ Q.T


def _wide_problem(m: int, n: int, gen: torch.Generator, decades: float = 8.0):
    """``W`` (m, n) and ``C_fix`` (n, n) float64 whose product spans ``decades`` orders of magnitude."""
    k = min(m, n)
    s = torch.logspace(0, -decades, k, dtype=torch.float64)
    U = _orth(m, gen)[:, :k]
    V = _orth(n, gen)[:, :k]
    P = (U * s) @ V.T  # the product we want
    lam = torch.logspace(0, -3, n, dtype=torch.float64)
    C = _spd(n, lam, gen)
    W = P @ torch.linalg.inv(C)
    return W, C, s


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64)])
def test_gram_spectrum_matches_float64_svd(shape: tuple[int, int], gen: torch.Generator) -> None:
    W, C, s_true = _wide_problem(*shape, gen)
    ref = torch.linalg.svdvals(W @ C)
    got = singular_values(W, C, method="gram")
    assert got.dtype == torch.float64 and got.shape == (min(shape),)
    assert torch.all(got[:-1] >= got[1:]), "not descending"
    # Σσ and σ_max: ~1e-12 relative in practice; stated tolerance 1e-9.
    assert abs(float(got.sum()) - float(ref.sum())) <= 1e-9 * float(ref.sum())
    assert abs(float(got[0]) - float(ref[0])) <= 1e-9 * float(ref[0])
    # every value to the stated absolute level √(k·ε)·σ_max
    k = min(shape)
    assert float((got - ref).abs().max()) <= math.sqrt(k * 2.3e-16) * 4 * float(ref[0])
    # the top half (≥ 1e-4·σ_max) is relatively accurate
    top = ref > 1e-4 * ref[0]
    assert float(((got - ref).abs() / ref)[top].max()) < 1e-6
    # and the reference itself is the spectrum we built
    assert float(((ref - s_true).abs() / s_true)[top].max()) < 1e-6


def test_svd_method_and_batch(gen: torch.Generator) -> None:
    W1, C1, _ = _wide_problem(40, 24, gen, decades=4)
    W2, C2, _ = _wide_problem(40, 24, gen, decades=2)
    batch = singular_values(torch.stack([W1, W2]), torch.stack([C1, C2]), method="svd")
    assert batch.shape == (2, 24)
    for i, (W, C) in enumerate([(W1, C1), (W2, C2)]):
        ref = torch.linalg.svdvals(W @ C)
        assert float(((batch[i] - ref).abs() / ref).max()) < 1e-10
        g = singular_values(W.float(), C.float(), method="gram")  # float32 inputs are promoted
        assert float(((g - torch.linalg.svdvals(W.float().double() @ C.float().double())).abs()).max()) < 1e-6 * float(
            ref[0]
        )
    with pytest.raises(ValueError):
        singular_values(W1, C1, method="lanczos")
    with pytest.raises(ValueError):
        singular_values(W1, C1[:10, :10])


def test_eig_extremes_and_compactness(gen: torch.Generator) -> None:
    n = 50
    lam = torch.rand(n, generator=gen, dtype=torch.float64) * 9 + 0.5
    lam[7], lam[31] = 0.125, 42.0
    C = _spd(n, lam, gen)
    lo, hi = eig_extremes(C.float())
    assert abs(float(lo) - 0.125) < 1e-5 and abs(float(hi) - 42.0) < 1e-4
    blo, bhi = eig_extremes(torch.stack([C, 2 * C]))
    assert torch.allclose(blo, torch.tensor([0.125, 0.25], dtype=torch.float64), rtol=1e-10)
    assert torch.allclose(bhi, torch.tensor([42.0, 84.0], dtype=torch.float64), rtol=1e-10)
    # π = √(m·λ_max)/λ_min
    assert compactness(0.125, 42.0, 30) == pytest.approx(math.sqrt(30 * 42.0) / 0.125, rel=1e-15)
    with pytest.raises(ValueError):
        compactness(0.0, 1.0, 3)


def test_candidate_spectrum_score(gen: torch.Generator) -> None:
    W, C, _ = _wide_problem(30, 20, gen, decades=3)
    sp = candidate_spectrum(W, C)
    ref = torch.linalg.svdvals(W @ C)
    ev = torch.linalg.eigvalsh(C)
    pi = math.sqrt(30 * float(ev[-1])) / float(ev[0])
    assert sp.compactness == pytest.approx(pi, rel=1e-9)
    assert sp.score == pytest.approx(math.log(pi) * float(ref.sum()) / float(ref[0]), rel=1e-9)
    shared = candidate_spectrum(W, C, extremes=(float(ev[0]), float(ev[-1])), keep_sigma=False)
    assert shared.sigma is None and shared.score == pytest.approx(sp.score, rel=1e-12)
