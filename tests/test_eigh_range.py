"""eigh_range against a float64 eigendecomposition: both solvers (LAPACK's subset ``syevr``, torch's
``eigh``), float32 and float64, bottom / top / inner ranges, batches, strided views, and garbage
in the lower triangle (only the upper one may be read).

Tolerances from backward stability: eigenvalues within ``c·√k·u·‖G‖₂`` of the exact ones,
eigen-residuals ``‖G x − λ x‖`` within the same, orthonormality within ``c·√k·u``.
"""

from __future__ import annotations

import math

import pytest
import torch

from corda_kernels.ops.cosvd.eigen import eigh_range


@pytest.mark.parametrize(
    ("k", "dtype", "first", "count", "batch", "subset"),
    [
        (300, torch.float64, 0, 16, 2, True),  # the bottom (KPM's eigh factor)
        (300, torch.float64, 3, 10, 5, True),  # a batch shared by the threads (more matrices than threads)
        (300, torch.float64, 284, 16, 1, True),  # the top
        (300, torch.float64, 0, 40, 1, False),  # more than k/16 pairs
        (200, torch.float64, 5, 12, 2, False),  # k below SUBSET_MIN_K, an inner range
        (600, torch.float32, 560, 40, 2, True),  # the top (the dense start)
        (600, torch.float32, 0, 100, 1, False),  # more than k/8 pairs
        (1030, torch.float32, 900, 64, 1, True),  # SciPy's BLAS on torch's thread count
    ],
)
def test_eigh_range_is_the_float64_range(
    k: int,
    dtype: torch.dtype,
    first: int,
    count: int,
    batch: int,
    subset: bool,
    gen: torch.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corda_kernels.ops.cosvd import eigen

    calls: list[tuple] = []
    solver = eigen._syevr

    def counting(a, first, count):  # noqa: ANN001, ANN202
        calls.append((first, first + count - 1))
        return solver(a, first, count)

    monkeypatch.setattr(eigen, "_syevr", counting)
    u = torch.finfo(dtype).eps / 2
    A = torch.randn(batch, k, k + 7, generator=gen, dtype=torch.float64)
    G64 = A @ A.mT / k + 0.1 * torch.eye(k, dtype=torch.float64)  # spectrum 0.1 … ~4.1, gaps ~1/k
    # a strided view whose strict lower triangle is garbage: only the upper triangle is G
    store = torch.randn(batch, k + 3, k + 3, generator=gen, dtype=torch.float64).mul_(1e3).to(dtype)
    G = store[:, 1 : k + 1, 2 : k + 2]
    upper = torch.ones(k, k, dtype=torch.bool).triu()
    G.copy_(torch.where(upper, G64.to(dtype), G))
    assert not G.is_contiguous()
    Gs = G64.to(dtype).double()  # the matrix the solver is given, exactly
    Gs = Gs.triu() + Gs.triu(1).mT

    values, vectors = eigh_range(G, first, count)
    assert calls == ([(first, first + count - 1)] * batch if subset else [])
    assert values.shape == (batch, count) and vectors.shape == (batch, k, count)
    assert values.dtype == vectors.dtype == dtype
    ref = torch.linalg.eigvalsh(Gs)[:, first : first + count]
    norm = float(torch.linalg.matrix_norm(Gs, 2).max())
    tol = 20 * math.sqrt(k) * u * norm
    assert float((values.double() - ref).abs().max()) <= tol
    X = vectors.double()
    residual = torch.linalg.vector_norm(Gs @ X - X * values.double().unsqueeze(-2), dim=-2)
    assert float(residual.max()) <= tol
    eye = torch.eye(count, dtype=torch.float64)
    assert float((X.mT @ X - eye).abs().max()) <= 20 * math.sqrt(k) * u


@pytest.mark.parametrize(("first", "count"), [(-1, 3), (8, 0), (5, 6)])
def test_eigh_range_rejects_indices_outside(first: int, count: int) -> None:
    with pytest.raises(ValueError, match="eigh_range: indices"):
        eigh_range(torch.eye(10, dtype=torch.float64).unsqueeze(0), first, count)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subset_solver_is_scipys_bit_for_bit(dtype: torch.dtype, gen: torch.Generator) -> None:
    """LAPACK's ``syevr`` called through SciPy's Cython export, several matrices on threads, gives
    exactly what ``scipy.linalg.eigh(driver="evr", subset_by_index=…)`` gives for each one."""
    import scipy.linalg

    from corda_kernels.ops.blas_threads import blas_threads

    k, batch = 520, 3
    A = torch.randn(batch, k, k, generator=gen, dtype=torch.float64)
    G = (A @ A.mT).to(dtype)
    values, vectors = eigh_range(G, 7, 20)
    with blas_threads(1):  # as eigh_range runs it below BLAS_THREADS_MIN_K
        for b in range(batch):
            # SciPy's wrapper on the same operand: G's upper triangle as a Fortran-ordered lower one
            w, v = scipy.linalg.eigh(
                G[b].numpy().T, lower=True, subset_by_index=(7, 26), driver="evr", check_finite=False
            )
            assert torch.equal(values[b], torch.from_numpy(w)) and torch.equal(vectors[b], torch.from_numpy(v)), b
