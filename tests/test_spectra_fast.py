"""eig_extremes_fast (Lanczos estimates of λ_min / λ_max) against float64 eigvalsh on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from corda_kernels.ops.damping import damped_inverse
from corda_kernels.ops.spectra import eig_extremes_fast

from .conftest import rel_err

# Measured worst cases over many seeds are ~50× below these (λ_max ~2e-11, λ_min ~6e-7 with a
# one-decade tail); λ_min is the hard end: the edge of a dense bulk, seen through a float32 inverse.
TOL_MAX = 1e-9
TOL_MIN = 1e-5


def _outlier_covariance(n: int, gen: torch.Generator, decades: float = 1.0, outliers: int = 3) -> torch.Tensor:
    """Float32 SPD ``(n, n)``: a bulk decaying over ``decades`` plus a few eigenvalues 1e3–1e4× its top."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, -decades, n, dtype=torch.float64)
    k = min(outliers, n - 1)
    lam[:k] = 10 ** (3 + torch.rand(k, generator=gen, dtype=torch.float64))
    return ((q * lam) @ q.T).float()


def _damped(n: int, gen: torch.Generator, decades: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_fix, C_inv)`` float32 of a damped outlier covariance, as the library damps them."""
    C_fix, C_inv, _ = damped_inverse(_outlier_covariance(n, gen, decades))
    return C_fix, C_inv


def _check(
    lo: torch.Tensor, hi: torch.Tensor, bound: torch.Tensor, C_fix: torch.Tensor, tol_min: float = TOL_MIN
) -> None:
    """Values against float64 eigvalsh, the Rayleigh–Ritz sides, and the bound against the actual error."""
    ev = torch.linalg.eigvalsh(C_fix.double())
    ref_lo, ref_hi = ev[..., 0], ev[..., -1]
    assert lo.dtype == hi.dtype == bound.dtype == torch.float64
    assert lo.shape == hi.shape == ref_lo.shape and bound.shape == (*ref_lo.shape, 2)
    err_lo = ((lo - ref_lo) / ref_lo).abs()
    err_hi = ((hi - ref_hi) / ref_hi).abs()
    assert float(err_hi.max()) <= TOL_MAX, f"λ_max rel err {err_hi.tolist()}"
    assert float(err_lo.max()) <= tol_min, f"λ_min rel err {err_lo.tolist()}"
    # Ritz values never leave the spectrum (up to float64 rounding of the reference)
    slack = 1e-12 * ref_hi
    assert bool((lo >= ref_lo - slack).all()) and bool((hi <= ref_hi + slack).all())
    assert bool(torch.isfinite(bound).all()) and bool((bound >= 0).all())
    # the bound may be loose, but not below the error it claims to bound (factor 2 for rounding)
    assert bool((2 * bound[..., 0] >= err_lo).all()), f"λ_min bound {bound[..., 0].tolist()} < {err_lo.tolist()}"
    assert bool((2 * bound[..., 1] >= err_hi).all()), f"λ_max bound {bound[..., 1].tolist()} < {err_hi.tolist()}"


@pytest.mark.parametrize("n", [37, 211, 600])
def test_outlier_spectrum_with_inverse(n: int, gen: torch.Generator) -> None:
    C_fix, C_inv = _damped(n, gen)
    lo, hi, bound = eig_extremes_fast(C_fix, C_inv, generator=gen)
    assert lo.shape == () and bound.shape == (2,)
    _check(lo, hi, bound, C_fix)


def test_dense_cluster_at_the_damping_floor(gen: torch.Generator) -> None:
    """A tail three decades deep sinks under the damping floor: hundreds of eigenvalues within a
    few 1e-3 of λ_min, relative gaps ~4e-5. The hardest case for Lanczos (measured worst ~1.3e-4);
    the bound must still cover the error."""
    C_fix, C_inv = _damped(600, gen, decades=3.0)
    _check(*eig_extremes_fast(C_fix, C_inv, generator=gen), C_fix, tol_min=1e-3)


@pytest.mark.parametrize("block", [1, 4])
def test_without_inverse_uses_cholesky(block: int, gen: torch.Generator) -> None:
    C_fix, _ = _damped(211, gen)
    _check(*eig_extremes_fast(C_fix, block=block, steps=192 // block, generator=gen), C_fix)


@pytest.mark.parametrize("with_inverse", [True, False])
def test_batch_of_three(with_inverse: bool, gen: torch.Generator) -> None:
    pairs = [_damped(n_i, gen) for n_i in (97, 97, 97)]
    C_fix = torch.stack([p[0] for p in pairs])
    C_inv = torch.stack([p[1] for p in pairs]) if with_inverse else None
    lo, hi, bound = eig_extremes_fast(C_fix, C_inv, generator=gen)
    assert lo.shape == hi.shape == (3,) and bound.shape == (3, 2)
    _check(lo, hi, bound, C_fix)


def test_non_contiguous_inputs(gen: torch.Generator) -> None:
    C_fix, C_inv = _damped(101, gen)
    # transposed views (the same symmetric matrix) and a strided view that needs a copy
    big = torch.zeros(2 * 101, 2 * 101)
    big[::2, ::2] = C_fix
    strided = big[::2, ::2]
    assert not C_fix.mT.is_contiguous() and not strided.is_contiguous()
    for A, Ai in ((C_fix.mT, C_inv.mT), (strided, None)):
        _check(*eig_extremes_fast(A, Ai, generator=gen), C_fix)


def test_float64_input(gen: torch.Generator) -> None:
    C_fix, C_inv = _damped(150, gen)
    C64 = C_fix.double()
    _check(*eig_extremes_fast(C64, generator=gen), C64)
    _check(*eig_extremes_fast(C64, C_inv.double(), block=3, steps=40, generator=gen), C64)


@pytest.mark.parametrize("n", [2, 3, 11])
def test_krylov_capped_at_n(n: int, gen: torch.Generator) -> None:
    """n below block·steps: the Krylov space is all of R^n (λ_min is limited only by the float32 inverse)."""
    C_fix, C_inv = _damped(n, gen)
    lo, hi, bound = eig_extremes_fast(C_fix, C_inv, block=4, steps=12, generator=gen)
    _check(lo, hi, bound, C_fix)
    lo, hi, bound = eig_extremes_fast(C_fix, torch.linalg.inv(C_fix.double()), block=4, steps=12, generator=gen)
    _check(lo, hi, bound, C_fix, tol_min=1e-9)


def test_few_steps_bound_covers_error(gen: torch.Generator) -> None:
    """Too few steps: λ_min is far off, and the bound says so (it stays above the error)."""
    C_fix, C_inv = _damped(300, gen)
    lo, hi, bound = eig_extremes_fast(C_fix, C_inv, block=2, steps=4, generator=gen)
    _check(lo, hi, bound, C_fix, tol_min=1.0)
    assert float(bound[0]) > 1e-6  # not converged, and not claiming to be


def test_deterministic_given_generator(gen: torch.Generator) -> None:
    C_fix, C_inv = _damped(120, gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    a = eig_extremes_fast(C_fix, C_inv, block=2, steps=6, generator=torch.Generator().manual_seed(seed))
    b = eig_extremes_fast(C_fix, C_inv, block=2, steps=6, generator=torch.Generator().manual_seed(seed))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a float32 inverse good to ~1e-4 gives the same values as an exact one, to far better than that
    exact = torch.linalg.inv(C_fix.double())
    c = eig_extremes_fast(C_fix, exact, generator=torch.Generator().manual_seed(seed))
    d = eig_extremes_fast(C_fix, C_inv, generator=torch.Generator().manual_seed(seed))
    assert rel_err(c[0], d[0]) <= TOL_MIN and rel_err(c[1], d[1]) <= TOL_MAX


@pytest.mark.parametrize(
    ("C_fix", "C_inv", "match"),
    [
        (torch.eye(3)[:2], None, "C_fix"),
        (torch.eye(4).expand(2, 2, 4, 4), None, "C_fix"),
        (torch.eye(3), torch.eye(4), "C_inv"),
    ],
)
def test_rejects_bad_shapes(C_fix: torch.Tensor, C_inv: torch.Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        eig_extremes_fast(C_fix, C_inv)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="C_fix"):
        eig_extremes_fast(torch.eye(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="block"):
        eig_extremes_fast(torch.eye(3), block=0)
    with pytest.raises(ValueError, match="positive definite"):
        eig_extremes_fast(-torch.eye(3))
