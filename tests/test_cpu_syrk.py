"""BLAS ssyrk for the covariance's upper triangle, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from corda_kernels import cpu_syrk
from corda_kernels.covariance import covariance_update

from .conftest import rel_err

needs_blas = pytest.mark.skipif(cpu_syrk._ssyrk() is None, reason="numpy ships no OpenBLAS ssyrk here")


@needs_blas
@pytest.mark.parametrize(("T", "n", "threads"), [(67, 37, 1), (130, 301, 2), (41, 1031, 2), (3, 1100, 2)])
def test_upper_triangle_matches_float64(T: int, n: int, threads: int, gen: torch.Generator) -> None:
    X = torch.randn(T, n, generator=gen) * torch.logspace(0, 2, n)  # outlier-like channel scales
    C0 = torch.randn(n, n, generator=gen)
    C = C0.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_syrk.syrk_upper_(C, X, alpha=0.25)
    finally:
        torch.set_num_threads(before)
    ref = C0.double() + 0.25 * X.double().T @ X.double()
    assert rel_err(torch.triu(C), torch.triu(ref)) < 1e-6
    assert torch.equal(torch.tril(C, -1), torch.tril(C0, -1)), "the lower triangle must not be written"


@needs_blas
def test_non_contiguous_rows_and_buffer_views(gen: torch.Generator) -> None:
    X = torch.randn(90, 2 * 53, generator=gen)[:, ::2]  # column stride 2
    C = torch.zeros(3, 53, 53)
    assert cpu_syrk.syrk_upper_(C[1], X)
    ref = X.double().T @ X.double()
    assert rel_err(torch.triu(C[1]), torch.triu(ref)) < 1e-6
    assert not C[0].any() and not C[2].any()


def test_refuses_what_it_cannot_do(gen: torch.Generator) -> None:
    X = torch.randn(10, 8, generator=gen)
    C64 = torch.zeros(8, 8, dtype=torch.float64)
    assert not cpu_syrk.syrk_upper_(C64, X.double())
    Ct = torch.zeros(8, 16)[:, ::2]  # column stride 2: BLAS cannot address it
    assert not cpu_syrk.syrk_upper_(Ct, X)
    assert not Ct.any()


def test_disabled_by_environment_falls_back_to_addmm(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator) -> None:
    """With ``CORDA_KERNELS_SYRK=0`` the covariance still comes out right (through addmm)."""
    monkeypatch.setenv("CORDA_KERNELS_SYRK", "0")
    cpu_syrk._ssyrk.cache_clear()
    try:
        assert cpu_syrk._ssyrk() is None
        x = torch.randn(2, 33, 29, generator=gen)
        C = covariance_update(torch.zeros(29, 29), x)
        ref = x.reshape(-1, 29).double().T @ x.reshape(-1, 29).double()
        assert rel_err(C, ref) < 1e-6
    finally:
        monkeypatch.delenv("CORDA_KERNELS_SYRK")
        cpu_syrk._ssyrk.cache_clear()
