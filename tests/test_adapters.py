"""Adapter construction (PEFT's convention) and the CordaLinear module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import corda_kernels as ck
from tests.conftest import rel_err


@pytest.mark.parametrize("which", ["top", "bottom"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_adapter_and_cordalinear(which: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    m, n, r, alpha = 40, 56, 6, 12.0
    linear = nn.Linear(n, m, bias=True).to(dtype)
    x = torch.randn(200, n, generator=gen)
    C = x.T @ x / 200
    U, S, V = ck.cosvd(linear.weight.float(), C, rank=r, which=which)
    s = ck.lora_scaling(alpha, r)
    A, B, W_res = ck.build_adapter(linear.weight, U, S, V, s)
    assert A.shape == (r, n) and B.shape == (m, r) and W_res.dtype == dtype
    # PEFT's formulas: A = diag(√(S/s))·Vᵀ, B = U·diag(√(S/s)).
    assert rel_err(A, (V.double().T * (S.double() / s).sqrt().view(-1, 1))) < 1e-6
    assert rel_err(B, U.double() * (S.double() / s).sqrt()) < 1e-6
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(W_res.double() + s * B.double() @ A.double(), linear.weight) < tol

    layer = ck.CordaLinear.from_linear(linear.float(), U, S, V, s)
    xs = torch.randn(3, 5, n, generator=gen)
    ref = linear.float()(xs)
    assert rel_err(layer(xs), ref) < 1e-5
    assert layer.lora_A.requires_grad and not layer.weight.requires_grad
    residual = layer.weight.detach().clone()
    layer.merge()
    assert rel_err(layer.weight, linear.weight.float()) < 1e-6
    assert rel_err(layer(xs), ref) < 1e-5
    layer.unmerge()
    assert rel_err(layer.weight, residual) < 1e-5


def test_rslora_scaling() -> None:
    assert ck.lora_scaling(16, 4) == 4.0
    assert ck.lora_scaling(16, 4, use_rslora=True) == 16 / math.sqrt(4)
    with pytest.raises(ValueError, match="positive"):
        ck.lora_scaling(16, 0)


def test_build_adapter_shape_errors() -> None:
    with pytest.raises(ValueError, match="do not match"):
        ck.build_adapter(torch.randn(4, 5), torch.randn(4, 2), torch.rand(2), torch.randn(4, 2), 1.0)
