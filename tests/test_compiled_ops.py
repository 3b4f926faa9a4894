"""The C++ CPU kernels of ``csrc/`` (the ``cpp`` backend) against the torch backend, bitsandbytes
and float64 references, on fresh random inputs: every blocksize, odd sizes, partial and all-zero
blocks, non-contiguous inputs, both arithmetics (bitsandbytes' CPU and CUDA flavours)."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

import corda_kernels as ck
from corda_kernels import backend
from corda_kernels.kernels import compiled
from corda_kernels.ops import nf4 as nf4_ops
from corda_kernels.ops.nf4 import NF4_LEVELS, VALID_BLOCKSIZES, nf4_bounds

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_extension_is_built() -> None:
    assert compiled.LOADED, (
        f"the compiled extension is {compiled.LOAD_ERROR}: build it with `pip install --no-build-isolation -e .` "
        "(scripts/env.sh does), which needs CMake and a C++17 compiler"
    )
    assert backend.compiled_backends()["cpp"] == compiled.CPP_OPS
    for op in compiled.CPP_OPS:
        assert "cpp" in backend.available_backends(op)


def _weights(gen: torch.Generator, n: int, dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Random values with block scales spread over decades, one all-zero block, and a tiny block."""
    x = torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))
    if n > 3 * blocksize:
        x[blocksize : 2 * blocksize] = 0
        x[2 * blocksize : 3 * blocksize] *= 1e-30
    return x.to(dtype)


def _sizes(gen: torch.Generator, blocksize: int) -> list[int]:
    odd = int(torch.randint(3, 9, (1,), generator=gen)) * blocksize + int(
        torch.randint(1, blocksize, (1,), generator=gen)
    )
    return [1, 3, blocksize, odd | 1, odd + (odd % 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_quantize_matches_torch_backend(gen: torch.Generator, dtype: torch.dtype, blocksize: int) -> None:
    for n in _sizes(gen, blocksize):
        x = _weights(gen, n, dtype, blocksize)
        for bnb_cuda in (False, True):
            p_ref, a_ref = nf4_ops._nf4_quantize_torch(x, blocksize, bnb_cuda)
            p, a = torch.ops.corda_kernels_C.nf4_quantize(x, blocksize, bnb_cuda, compiled._RECIP_IEEE)
            assert torch.equal(p, p_ref), (n, bnb_cuda, int((p != p_ref).sum()))
            assert torch.equal(a, a_ref), (n, bnb_cuda)
            d = torch.ops.corda_kernels_C.nf4_dequantize(p, a, blocksize, n, dtype)
            d_ref = nf4_ops._nf4_dequantize_torch(p, a, blocksize, n, dtype)
            assert torch.equal(d, d_ref) or (torch.isnan(d) == torch.isnan(d_ref)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_byte_exact_with_bitsandbytes(gen: torch.Generator, dtype: torch.dtype) -> None:
    """bitsandbytes' own CPU quantization, single and double, through the public API on ``cpp``."""
    ck.set_backend("cpp")
    rows = int(torch.randint(3, 40, (1,), generator=gen)) * 2 + 1
    W = _weights(gen, rows * 257, dtype, 64).reshape(rows, 257)
    for compress in (False, True):
        p, s = ck.nf4_quantize(W, blocksize=64, compress_statistics=compress)
        rp, rs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=compress)
        assert torch.equal(p, rp)
        if compress:
            assert torch.equal(s.absmax, rs.absmax) and torch.equal(s.state2.absmax, rs.state2.absmax)
            assert float(s.offset) == float(rs.offset)
        else:
            assert torch.equal(s.absmax, rs.absmax)


def test_quantize_codes_are_nearest_levels_in_float64(gen: torch.Generator) -> None:
    """Each code is the level nearest to ``x/absmax`` computed in float64, except within a few ulp of
    a midpoint (where the fp32 scale decides); the padding nibble of an odd count is code 7."""
    n = 64 * 53 + 31
    x = torch.randn(n, generator=gen) * 3
    for bnb_cuda in (False, True):
        packed, absmax = torch.ops.corda_kernels_C.nf4_quantize(x, 64, bnb_cuda, compiled._RECIP_IEEE)
        q = torch.stack([packed.reshape(-1).long() >> 4, packed.reshape(-1).long() & 15], 1).reshape(-1)
        block = torch.arange(n) // 64
        exact_absmax = torch.stack([x[i : i + 64].abs().max() for i in range(0, n, 64)])
        assert torch.equal(absmax, exact_absmax)
        scaled = x.double() / exact_absmax.double()[block]
        nearest = (scaled.unsqueeze(1) - torch.tensor(NF4_LEVELS, dtype=torch.float64)).abs().argmin(1)
        near_mid = (scaled.unsqueeze(1) - nf4_bounds().double()).abs().min(1).values < 4 * 2.0**-24
        assert torch.equal(q[:n][~near_mid], nearest[~near_mid])
        assert int(q[n]) == 7  # 0 · (1/absmax): the zero level


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_against_float64(gen: torch.Generator, dtype: torch.dtype) -> None:
    """``level · absmax`` is exact in float64 (two fp32 factors); rounded once to fp32 then to the dtype.
    Tiny absmax values reach fp16 / bf16 subnormals and zero, large ones overflow fp16 to inf."""
    blocksize = 128
    n = blocksize * 40 + 77
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=gen, dtype=torch.uint8)
    absmax = torch.exp(torch.randn(-(-n // blocksize), generator=gen) * 12).float()
    out = torch.ops.corda_kernels_C.nf4_dequantize(packed, absmax, blocksize, n, dtype)
    codes = torch.stack([packed.reshape(-1).long() >> 4, packed.reshape(-1).long() & 15], 1).reshape(-1)[:n]
    exact = torch.tensor(NF4_LEVELS, dtype=torch.float64)[codes] * absmax.double()[torch.arange(n) // blocksize]
    ref = exact.float().to(dtype)
    assert torch.equal(out, ref)
    if dtype == torch.float16:
        assert bool((ref.abs() < 6.1e-5).logical_and(ref != 0).any()), "no fp16 subnormal exercised"


def test_non_contiguous_input(gen: torch.Generator) -> None:
    W = torch.randn(130, 97, generator=gen).to(torch.bfloat16).T  # a transposed view
    ck.set_backend("cpp")
    p, s = ck.nf4_quantize(W, blocksize=64)
    ck.set_backend("torch")
    rp, rs = ck.nf4_quantize(W, blocksize=64)
    assert torch.equal(p, rp) and torch.equal(s.absmax, rs.absmax)


def test_backend_selection() -> None:
    cpu = torch.device("cpu")
    ck.set_backend("auto")
    for op in ("nf4_quantize", "nf4_dequantize"):
        assert backend.resolve(op, cpu) is backend._IMPLS[op]["cpp"]
    assert backend.resolve("covariance_update", cpu) is backend._IMPLS["covariance_update"]["torch"]
    ck.set_backend("cpp")
    # ops without a C++ kernel run their torch path under the cpp backend
    assert backend.resolve("covariance_update", cpu) is backend._IMPLS["covariance_update"]["torch"]
    with pytest.raises(RuntimeError, match="cpp backend runs on CPU tensors"):
        backend.resolve("nf4_quantize", torch.device("cuda"))


def test_errors_name_the_op(gen: torch.Generator) -> None:
    x = torch.randn(100, generator=gen)
    with pytest.raises(RuntimeError, match="nf4_quantize: blocksize must be a power of two"):
        torch.ops.corda_kernels_C.nf4_quantize(x, 48, False, 1)
    with pytest.raises(RuntimeError, match="nf4_quantize: expected float32, float16 or bfloat16"):
        torch.ops.corda_kernels_C.nf4_quantize(x.to(torch.int32), 64, False, 1)
    with pytest.raises(RuntimeError, match="nf4_quantize: cannot quantize an empty tensor"):
        torch.ops.corda_kernels_C.nf4_quantize(x[:0], 64, False, 1)
    packed, absmax = torch.ops.corda_kernels_C.nf4_quantize(x, 64, False, 1)
    with pytest.raises(RuntimeError, match="nf4_dequantize: need 51 uint8 bytes"):
        torch.ops.corda_kernels_C.nf4_dequantize(packed[:-1], absmax, 64, 101, torch.float32)
    with pytest.raises(RuntimeError, match="nf4_dequantize: need 3 absmax values"):
        torch.ops.corda_kernels_C.nf4_dequantize(torch.zeros(65, 1, dtype=torch.uint8), absmax, 64, 130, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dequantize_rounds_ties_to_even(gen: torch.Generator, dtype: torch.dtype) -> None:
    """Products exactly halfway between two values of the dtype round to the even one, as torch's cast."""
    n = 4096
    dropped = 13 if dtype == torch.float16 else 16  # fp32 mantissa bits the cast drops
    high = torch.randint(0, 2**14, (n,), generator=gen, dtype=torch.int64)
    # fp32 bit patterns in the dtype's normal range whose dropped bits are exactly one half
    exponent = 112 + (high % 29) if dtype == torch.float16 else 64 + (high % 120)
    mantissa = ((high >> 5) % (1 << (23 - dropped))) << dropped
    bits = (exponent << 23) | mantissa | (1 << (dropped - 1))
    absmax = bits.to(torch.int32).view(torch.float32)
    packed = torch.full((n * 32, 1), 0xFF, dtype=torch.uint8)  # level 1.0 everywhere: value = absmax
    out = torch.ops.corda_kernels_C.nf4_dequantize(packed, absmax, 64, 64 * n, dtype)
    assert torch.equal(out.view(n, 64), absmax.to(dtype).unsqueeze(1).expand(n, 64))
