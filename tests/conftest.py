"""Test set-up: Triton runs through its CPU interpreter, so this must precede any triton import."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``ref``, computed in float64."""
    ref64 = ref.double()
    denom = ref64.norm()
    assert denom > 0, "reference is zero: the comparison would be meaningless"
    return float((a.double() - ref64).norm() / denom)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly, randomly seeded generator; its seed is printed (pytest shows it on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _torch_backend_default():
    import corda_kernels as ck

    before = ck.get_backend()
    yield
    ck.set_backend(before)
