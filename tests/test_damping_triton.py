"""The Triton damped-inverse support through the interpreter (CPU tensors, ``set_backend("triton")``).

The triton backend must choose a damp the rule allows (the torch rule's, unless a residual lies
within rounding of the threshold: :func:`~corda_kernels.ops.damping.rule_allows`) and return the same
``C_fix`` / ``C_inv`` for the same damp; its two kernels (fused diagonal shift, fused
‖A·B − I‖_F) are checked against float64 / torch references on fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch

import corda_kernels as ck
from corda_kernels.kernels.damping_triton import residual_norm, shifted_copy
from corda_kernels.ops.damping import DampingError, check_residual, diag_means, fix_covariance, rule_allows

from .conftest import rel_err


def ill_conditioned(B: int, n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """``(B, n, n)`` fp32 covariances of low-rank activations (``rank`` ≪ n, a little noise) with
    three outlier channels whose scale grows along the batch, so the matrices need different
    numbers of doublings."""
    Cs = []
    for b in range(B):
        X = torch.randn(2 * n, rank, generator=gen, dtype=torch.float64)
        X = X @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
        X += 1e-2 * torch.randn(2 * n, n, generator=gen, dtype=torch.float64)
        X[:, torch.randperm(n, generator=gen)[:3]] *= 10.0 * (b + 1)
        Cs.append((X.T @ X).float())
    return torch.stack(Cs)


def test_triton_backend_registered() -> None:
    from corda_kernels.backend import available_backends

    assert "triton" in available_backends("damped_inverse")


def assert_same_or_allowed(C: torch.Tensor, ref: tuple, got: tuple, damp0: float) -> None:
    """Each backend's damps are ones the rule allows (float64 replay, rounding band); where the two
    chose the same damp, ``C_fix`` and ``C_inv`` are bit-identical (same shift, same inverse)."""
    (f0, i0, d0), (f1, i1, d1) = ref, got
    d0, d1 = (torch.as_tensor(d, dtype=torch.float64).reshape(-1) for d in (d0, d1))
    Cb = C.reshape(-1, *C.shape[-2:])
    for name, d in (("torch", d0), ("triton", d1)):
        assert not rule_allows(Cb, d, damp=damp0), (name, rule_allows(Cb, d, damp=damp0))
    f0, i0, f1, i1 = (t.reshape(Cb.shape) for t in (f0, i0, f1, i1))
    for b in range(Cb.shape[0]):
        if d0[b] == d1[b]:
            assert torch.equal(f1[b], f0[b]) and torch.equal(i1[b], i0[b])


@pytest.mark.parametrize("n,rank", [(64, 4), (130, 32)])
def test_same_damp_as_torch_rule(n: int, rank: int, gen: torch.Generator) -> None:
    """Several doublings, different per matrix: the damps the rule allows, bit-identical C_fix and
    C_inv where the damps agree (they may differ only where a residual lies within rounding of
    the threshold)."""
    C = ill_conditioned(3, n, rank, gen)
    damp0 = 1e-6  # small start: these n are too small for the default 0.01 to need doublings
    ck.set_backend("torch")
    ref = ck.damped_inverse(C, damp=damp0)
    steps = torch.log2(ref[2] / damp0).round()
    assert int(steps.min()) >= 2, f"the case must exercise the search (steps {steps.tolist()})"
    ck.set_backend("triton")
    got = ck.damped_inverse(C, damp=damp0)
    assert got[2].dtype == torch.float64 and got[2].shape == (3,)
    assert_same_or_allowed(C, ref, got, damp0)
    r, rho = check_residual(got[0], got[1])
    assert bool((r - rho < 0.05).all())


def test_single_matrix_default_rule(gen: torch.Generator) -> None:
    """One (n, n) matrix with the default damp / threshold: a float damp the rule allows."""
    C = ill_conditioned(1, 48, 6, gen)[0]
    ck.set_backend("torch")
    ref = ck.damped_inverse(C)
    ck.set_backend("triton")
    got = ck.damped_inverse(C)
    assert isinstance(got[2], float)
    assert_same_or_allowed(C, ref, got, 0.01)


def test_max_steps_error_names_the_matrix(gen: torch.Generator) -> None:
    """Both backends refuse; each names a matrix whose first step the rule may reject."""
    C = ill_conditioned(3, 40, 4, gen)
    indices = []
    for backend in ("torch", "triton"):
        ck.set_backend(backend)
        with pytest.raises(DampingError) as err:
            ck.damped_inverse(C, damp=1e-7, max_steps=1)
        indices.append(err.value.index)
    for i in indices:
        fixed = fix_covariance(C[i : i + 1], torch.tensor([1e-7], dtype=torch.float64))
        r, rho = check_residual(fixed, torch.linalg.inv(fixed))
        assert float(r[0] + rho[0]) >= 0.05, (i, float(r[0]), float(rho[0]))


@pytest.mark.parametrize("n,block", [(37, 16), (130, 64)])
def test_residual_norm_random(n: int, block: int, gen: torch.Generator) -> None:
    """‖A·B − I‖_F of random fp32 matrices (several partial tiles) against float64."""
    A = torch.randn(3, n, n, generator=gen)
    Bm = torch.randn(3, n, n, generator=gen).transpose(1, 2)  # strided operand
    got = residual_norm(A, Bm, block=block)
    ref = torch.linalg.matrix_norm(A.double() @ Bm.double() - torch.eye(n, dtype=torch.float64))
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert rel_err(got, ref) < 1e-6, gen.initial_seed()


def test_residual_norm_near_identity(gen: torch.Generator) -> None:
    """The regime the rule decides in: B ≈ A⁻¹ with a small residual. The kernel and torch's fp32
    check each lie within the derived rounding bound of the float64 value of the same residual
    (:func:`check_residual`), whatever order either sums in; the bound is far below the norm a
    kernel that forgot the identity would return."""
    n = 96
    A = ill_conditioned(2, n, 8, gen)
    A = fix_covariance(A, torch.tensor([1e-4, 1e-3], dtype=torch.float64))
    inv = torch.linalg.inv(A)
    got = residual_norm(A, inv)
    torch_check = torch.linalg.matrix_norm(A @ inv - torch.eye(n))
    ref64, rho = check_residual(A, inv)
    assert float(ref64.min()) > 1e-5, "residual should be a rounding-level but nonzero quantity"
    assert bool((rho < 0.1 * n**0.5).all()), "the bound must be able to tell ‖A·B‖ from ‖A·B − I‖"
    assert bool(((got.double() - ref64).abs() <= rho).all()), (got, ref64, rho)
    assert bool(((torch_check.double() - ref64).abs() <= rho).all()), (torch_check, ref64, rho)


def test_shifted_copy_matches_fix_covariance(gen: torch.Generator) -> None:
    """Gather + copy + diagonal shift in one kernel is bit-identical to the torch arithmetic."""
    n = 130
    C = torch.randn(5, n, n, generator=gen)
    idx = torch.tensor([3, 0, 4])
    damps = torch.rand(3, generator=gen, dtype=torch.float64) + 0.01
    shift = diag_means(C)[idx] * damps.float()
    got = shifted_copy(C, idx, shift)
    assert got.is_contiguous() and got.shape == (3, n, n)
    assert torch.equal(got, fix_covariance(C[idx], damps))


def test_float64_input_keeps_torch_arithmetic(gen: torch.Generator) -> None:
    """The kernels are fp32; a float64 covariance takes the torch path's arithmetic unchanged."""
    C = ill_conditioned(2, 40, 4, gen).double()
    ck.set_backend("torch")
    f0, i0, d0 = ck.damped_inverse(C, damp=1e-9)
    ck.set_backend("triton")
    f1, i1, d1 = ck.damped_inverse(C, damp=1e-9)
    assert f1.dtype == torch.float64
    assert torch.equal(d1, d0) and torch.equal(f1, f0) and torch.equal(i1, i0)
