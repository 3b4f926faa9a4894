"""The Triton covariance kernel through the interpreter (CPU tensors, ``set_backend("triton")``).

Every check compares with a float64 reference built from fresh random inputs. Shapes are
small (the interpreter runs one program at a time in Python, a 128×64×128 ``tl.dot`` costs
~15 ms there) but chosen so that several tiles, partial tiles and partial token blocks occur.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import corda_kernels as ck
from corda_kernels.kernels.covariance_triton import covariance_update_triton

from .conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]


def reference(
    C0: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    seq_scale: torch.Tensor | None = None,
    seq_bucket: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 ``C0 + Σ_b s_b Σ_{t unmasked} x_bt x_btᵀ`` (per buffer when ``seq_bucket`` is given)."""
    ref = C0.double().clone()
    for b in range(x.shape[0]):
        xb = x[b].double()
        if mask is not None:
            xb = xb[mask[b]]
        contrib = xb.T @ xb
        if seq_scale is not None:
            contrib = contrib * float(seq_scale[b])
        if seq_bucket is None:
            ref += contrib
        else:
            ref[int(seq_bucket[b])] += contrib
    return ref


def test_triton_backend_registered() -> None:
    from corda_kernels.backend import available_backends

    assert "triton" in available_backends("covariance_update")


@pytest.mark.parametrize("n", [37, 130])
def test_fp32_public_api(n: int, gen: torch.Generator) -> None:
    """fp32 activations: symmetric result, relative error ≪ 1e-5 against float64."""
    ck.set_backend("triton")
    x = torch.randn(3, 45, n, generator=gen)
    C0 = torch.randn(n, n, generator=gen)
    C0 = C0 + C0.T
    C = ck.covariance_update(C0.clone(), x)
    ref = reference(C0, x)
    assert rel_err(C, ref) < 1e-6, gen.initial_seed()
    assert torch.equal(C, C.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs(dtype: torch.dtype, gen: torch.Generator) -> None:
    """16-bit activations: exact products, fp32 accumulation (vs the rounded values: ≪ 1e-5;
    vs the unrounded fp32 activations: ≤ 1e-2)."""
    ck.set_backend("triton")
    n = 130
    x32 = torch.randn(2, 70, n, generator=gen) * 3.0
    x = x32.to(dtype)
    C = ck.covariance_update(torch.zeros(n, n), x)
    assert rel_err(C, reference(torch.zeros(n, n), x)) < 1e-6, gen.initial_seed()
    assert rel_err(C, reference(torch.zeros(n, n), x32)) < 1e-2, gen.initial_seed()


def test_mask_scale_noncontiguous(gen: torch.Generator) -> None:
    """Padding contributes nothing (one sequence fully padded), per-sequence scales apply,
    and a strided view of x is read in place."""
    ck.set_backend("triton")
    n, B, L = 37, 4, 33
    base = torch.randn(B, n, 2 * L, generator=gen).to(torch.bfloat16)
    x = base[:, :, ::2].transpose(1, 2)  # (B, L, n), strides (2Ln, 2, 2L)
    assert not x.is_contiguous()
    mask = torch.rand(B, L, generator=gen) > 0.4
    mask[2] = False
    scale = torch.rand(B, generator=gen) + 0.1
    C0 = torch.randn(n, n, generator=gen)
    C0 = C0 + C0.T
    C = ck.covariance_update(C0.clone(), x, mask=mask, seq_scale=scale)
    ref = reference(C0, x, mask, scale)
    assert rel_err(C, ref) < 1e-6, gen.initial_seed()
    # The masked tokens really are ignored: garbage (even NaN) under the mask changes nothing.
    x_poison = x.clone()
    x_poison[~mask] = float("nan")
    C2 = ck.covariance_update(C0.clone(), x_poison, mask=mask, seq_scale=scale)
    assert torch.equal(C2, C)


def test_batch_equals_sequences_one_at_a_time(gen: torch.Generator) -> None:
    ck.set_backend("triton")
    n, B, L = 37, 3, 20
    x = torch.randn(B, L, n, generator=gen)
    mask = torch.rand(B, L, generator=gen) > 0.3
    together = ck.covariance_update(torch.zeros(n, n), x, mask=mask)
    apart = torch.zeros(n, n)
    for b in range(B):
        ck.covariance_update(apart, x[b][mask[b]])
    assert rel_err(together, apart) < 1e-6


def test_k_buffers_one_launch(gen: torch.Generator) -> None:
    """Sequences go to the buffer named by seq_bucket; an unused buffer is left bit-identical."""
    ck.set_backend("triton")
    n, B, L, K = 37, 6, 24, 4
    x = torch.randn(B, L, n, generator=gen).to(torch.float16)
    bucket = torch.tensor([0, 2, 0, 3, 2, 0])[torch.randperm(B, generator=gen)]  # buffer 1 unused
    mask = torch.rand(B, L, generator=gen) > 0.2
    scale = torch.rand(B, generator=gen) + 0.5
    C0 = torch.randn(K, n, n, generator=gen)
    C0 = C0 + C0.transpose(1, 2)
    C = ck.covariance_update(C0.clone(), x, mask=mask, seq_scale=scale, seq_bucket=bucket)
    ref = reference(C0, x, mask, scale, bucket)
    for k in (0, 2, 3):
        assert rel_err(C[k], ref[k]) < 1e-6, (k, gen.initial_seed())
    assert torch.equal(C[1], C0[1])


def test_upper_only_leaves_strict_lower_untouched(gen: torch.Generator) -> None:
    """The op with upper_only=True: upper triangle (with diagonal) updated, strict lower bit-identical."""
    ck.set_backend("triton")
    n = 130
    x = torch.randn(2, 40, n, generator=gen)
    C0 = torch.randn(n, n, generator=gen)
    C = C0.clone()
    torch.ops.corda_kernels.covariance_update(C, x, None, None, None, True)
    ref = reference(C0, x)
    up = torch.ones(n, n, dtype=torch.bool).triu()
    assert rel_err(C[up], ref[up]) < 1e-6, gen.initial_seed()
    assert torch.equal(C[~up], C0[~up])
    # upper_only=False: the plain full update of a non-symmetric starting C.
    C = C0.clone()
    torch.ops.corda_kernels.covariance_update(C, x, None, None, None, False)
    assert rel_err(C, ref) < 1e-6, gen.initial_seed()


@pytest.mark.parametrize("upper_only", [True, False])
def test_small_tiles_split_atomics(upper_only: bool, gen: torch.Generator) -> None:
    """Many tiles (16-wide on n=37: partial last tile), token chunks split across programs that
    add with atomics, together with mask, scale and buckets."""
    n, B, L, K = 37, 3, 50, 2
    x = torch.randn(B, L, n, generator=gen)
    mask = torch.rand(B, L, generator=gen) > 0.25
    scale = torch.rand(B, generator=gen) + 0.5
    bucket = torch.tensor([1, 0, 1])
    C0 = torch.randn(K, n, n, generator=gen)
    C = C0.clone()
    covariance_update_triton(C, x, mask, scale, bucket, upper_only, block=16, block_k=16, split=5)
    ref = reference(C0, x, mask, scale, bucket)
    if upper_only:
        up = torch.ones(n, n, dtype=torch.bool).triu()
        assert rel_err(C[:, up], ref[:, up]) < 1e-6, gen.initial_seed()
        assert torch.equal(C[:, ~up], C0[:, ~up])
    else:
        assert rel_err(C, ref) < 1e-6, gen.initial_seed()


def test_triton_and_torch_backends_agree(gen: torch.Generator) -> None:
    n = 130
    x = torch.randn(2, 30, n, generator=gen).to(torch.bfloat16)
    mask = torch.rand(2, 30, generator=gen) > 0.5
    scale = torch.rand(2, generator=gen) + 0.5
    ck.set_backend("torch")
    a = ck.covariance_update(torch.zeros(n, n), x, mask=mask, seq_scale=scale)
    ck.set_backend("triton")
    b = ck.covariance_update(torch.zeros(n, n), x, mask=mask, seq_scale=scale)
    assert rel_err(b, a) < 1e-6


def test_triton_backend_without_interpreter_is_a_clear_error() -> None:
    """With TRITON_INTERPRET=0 and CPU tensors the triton backend refuses (covariance and damped
    inverse); auto uses torch."""
    code = textwrap.dedent(
        """
        import torch, corda_kernels as ck
        x = torch.randn(1, 8, 5)
        C = ck.covariance_update(torch.zeros(5, 5), x)  # auto -> torch on the CPU
        assert torch.allclose(C, x[0].T @ x[0], rtol=1e-5, atol=1e-5)
        ck.set_backend("triton")
        try:
            ck.covariance_update(torch.zeros(5, 5), x)
        except RuntimeError as e:
            assert "triton backend needs CUDA tensors" in str(e), e
            print("REFUSED")
        try:
            ck.damped_inverse(torch.eye(5) * 2.0)
        except RuntimeError as e:
            assert "triton backend needs CUDA tensors" in str(e), e
            print("REFUSED damped_inverse")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("CORDA_KERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED\n" in out.stdout and "REFUSED damped_inverse" in out.stdout
