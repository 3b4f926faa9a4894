"""NF4 quantize / pack / dequantize against bitsandbytes and float64 references (docs/design.md §6).

Every test draws fresh random data from the ``gen`` fixture. The byte-exact tests compare with
``bitsandbytes.functional.quantize_4bit`` on the CPU; the CUDA-arithmetic flavour (what
bitsandbytes' CUDA kernels compute) is checked here against a float64 nearest-level reference
and on a GPU by ``bench/gpu_nf4.py``.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

import corda_kernels as ck
from corda_kernels.ops import nf4 as nf4_ops
from corda_kernels.ops.nf4 import NF4_LEVELS, VALID_BLOCKSIZES, dynamic_map, nf4_bounds
from tests.conftest import rel_err

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes wraps its dequantize in torch.compile (seconds per new shape): run it eagerly."""
    from bitsandbytes.backends.default import ops as bnb_default

    compiled = bnb_default._dequantize_4bit_compute
    monkeypatch.setattr(bnb_default, "_dequantize_4bit_compute", getattr(compiled, "__wrapped__", compiled))


def _rand(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random weights with a spread of block scales (so absmax varies from block to block)."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    return x.to(dtype)


def _odd_shape(gen: torch.Generator, blocksize: int) -> tuple[int, int]:
    """A 2-D shape with an odd element count spanning a few blocks plus a partial one."""
    rows = int(torch.randint(1, 6, (1,), generator=gen)) * 2 + 1
    target = (
        blocksize * int(torch.randint(2, 5, (1,), generator=gen))
        + 1
        + int(torch.randint(0, blocksize - 1, (1,), generator=gen))
    )
    cols = max(1, target // rows) | 1
    return rows, cols


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:numel]


def _assert_same_state(ours, ref) -> None:  # noqa: ANN001
    assert ours.quant_type == ref.quant_type == "nf4"
    assert ours.blocksize == ref.blocksize and ours.dtype == ref.dtype and tuple(ours.shape) == tuple(ref.shape)
    assert torch.equal(ours.code, ref.code)
    assert ours.nested == ref.nested
    assert ours.absmax.dtype == ref.absmax.dtype
    assert torch.equal(ours.absmax, ref.absmax), "absmax / nested codes differ"
    if ref.nested:
        assert ours.offset.dtype == ref.offset.dtype and torch.equal(ours.offset, ref.offset)
        s2, r2 = ours.state2, ref.state2
        assert s2.blocksize == r2.blocksize == 256 and s2.dtype == r2.dtype
        assert torch.equal(s2.code, r2.code)
        assert torch.equal(s2.absmax, r2.absmax)


def _bnb_dequant_ok(shape: tuple[int, ...], blocksize: int) -> bool:
    """Shapes where bitsandbytes' native CPU dequantize_4bit is right.

    Its C++ kernel (used when the last dim is even) assumes blocks never straddle rows; for a
    last dim that is not a multiple of the blocksize it returns wrong values (seen with
    bitsandbytes 0.50.2 on this AVX-512 CPU), so those shapes are checked against float64 only.
    """
    return shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


# ------------------------------------------------------------------------------------------
# byte-exactness with bitsandbytes
# ------------------------------------------------------------------------------------------


def test_dynamic_map_matches_bitsandbytes() -> None:
    assert torch.equal(dynamic_map(), F.create_dynamic_map())
    assert torch.equal(nf4_ops.nf4_code(), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
def test_quantize_byte_exact(gen: torch.Generator, dtype: torch.dtype, blocksize: int, compress: bool) -> None:
    for shape in (_odd_shape(gen, blocksize), (3 * blocksize + 7,), (2 * blocksize, 3)):
        W = _rand(gen, shape, dtype)
        packed, state = ck.nf4_quantize(W, blocksize=blocksize, compress_statistics=compress)
        ref_p, ref_s = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=compress)
        assert packed.dtype == torch.uint8 and packed.shape == ((W.numel() + 1) // 2, 1)
        assert torch.equal(packed, ref_p), f"packed bytes differ (shape {shape})"
        _assert_same_state(state, ref_s)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_double_quant_many_blocks(gen: torch.Generator, blocksize: int) -> None:
    """Several nested 256-blocks, a partial one, and non-contiguous input."""
    W = _rand(gen, (2 * 256 + 37, blocksize + 1), torch.float32).T  # non-contiguous
    packed, state = ck.nf4_quantize(W, blocksize=blocksize, compress_statistics=True)
    ref_p, ref_s = F.quantize_4bit(W.contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert state.state2.absmax.numel() > 2
    assert torch.equal(packed, ref_p)
    _assert_same_state(state, ref_s)


def test_single_block_double_quant(gen: torch.Generator) -> None:
    """One block: absmax − offset is all zero, a degenerate nested block; still byte-exact."""
    W = _rand(gen, (5, 7), torch.bfloat16)
    packed, state = ck.nf4_quantize(W, blocksize=64, compress_statistics=True)
    ref_p, ref_s = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref_p)
    _assert_same_state(state, ref_s)
    assert rel_err(ck.nf4_dequantize(packed, state).float(), F.dequantize_4bit(ref_p, ref_s, quant_type="nf4")) == 0


# ------------------------------------------------------------------------------------------
# dequantize
# ------------------------------------------------------------------------------------------


def _float64_dequant(packed: torch.Tensor, absmax64: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    q = _unpack(packed, numel)
    block = torch.arange(numel) // blocksize
    return levels[q] * absmax64[block]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
def test_dequantize(gen: torch.Generator, dtype: torch.dtype, blocksize: int, compress: bool) -> None:
    for shape in (_odd_shape(gen, blocksize), (6, 2 * blocksize), (4, blocksize // 2 + 2)):
        W = _rand(gen, shape, dtype)
        packed, state = ck.nf4_quantize(W, blocksize=blocksize, compress_statistics=compress)
        out = ck.nf4_dequantize(packed, state)
        assert out.shape == W.shape and out.dtype == dtype
        # float64 reference of the format (nested statistics decoded in float64 too)
        if compress:
            s2 = state.state2
            codes = state.absmax.long()
            absmax64 = dynamic_map().double()[codes] * s2.absmax.double().repeat_interleave(256)[: codes.numel()]
            absmax64 = absmax64 + state.offset.double()
        else:
            absmax64 = state.absmax.double()
        ref64 = _float64_dequant(packed, absmax64, blocksize, W.numel()).reshape(shape)
        assert rel_err(out, ref64) < (1e-6 if dtype == torch.float32 else 1e-2)
        # the quantization error itself is that of 4 bits: a loose but failing-on-garbage bound
        assert rel_err(out, W) < 0.5
        if _bnb_dequant_ok(shape, blocksize):
            ref = F.dequantize_4bit(packed, state, quant_type="nf4").reshape(shape)
            assert torch.equal(out, ref)


def test_dequantize_matches_bnb_default_path(gen: torch.Generator) -> None:
    """Where bitsandbytes' native CPU kernel is wrong, its pure-torch path agrees with us."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    W = _rand(gen, (16, 96), torch.float32)
    packed, state = ck.nf4_quantize(W, blocksize=64)
    ref = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, state.shape, torch.float32)
    assert torch.equal(ck.nf4_dequantize(packed, state), ref)


# ------------------------------------------------------------------------------------------
# loading into bitsandbytes modules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loads_into_linear4bit(gen: torch.Generator, compress: bool, dtype: torch.dtype) -> None:
    m, n, bs = 48, 128, 64
    W = _rand(gen, (m, n), dtype)
    ref = bnb.nn.Linear4bit(n, m, bias=False, compute_dtype=dtype, compress_statistics=compress, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(
        W.clone(), requires_grad=False, blocksize=bs, compress_statistics=compress, quant_type="nf4"
    )
    ref = ref.to("cpu")  # bitsandbytes quantizes on this move

    packed, state = ck.nf4_quantize(W, blocksize=bs, compress_statistics=compress)
    ours = bnb.nn.Linear4bit(n, m, bias=False, compute_dtype=dtype, compress_statistics=compress, quant_type="nf4")
    ours.weight = bnb.nn.Params4bit.from_prequantized(packed, state.as_dict(packed=True), device="cpu", module=ours)

    assert torch.equal(ours.weight.data, ref.weight.data)
    deq_ours = F.dequantize_4bit(ours.weight.data, ours.weight.quant_state, quant_type="nf4")
    deq_ref = F.dequantize_4bit(ref.weight.data, ref.weight.quant_state, quant_type="nf4")
    assert torch.equal(deq_ours, deq_ref)
    assert torch.equal(ck.nf4_dequantize(packed, state), deq_ref)
    x = torch.randn(5, n, generator=gen).to(dtype)
    y = ours(x)
    assert torch.equal(y, ref(x))
    y64 = x.double() @ deq_ref.double().T
    assert rel_err(y, y64) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_quant_state_dict_roundtrip(gen: torch.Generator) -> None:
    """The packed state dict (safetensors form) restores the same state."""
    W = _rand(gen, (33, 65), torch.float16)
    packed, state = ck.nf4_quantize(W, blocksize=128, compress_statistics=True)
    restored = F.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(ck.nf4_dequantize(packed, restored), ck.nf4_dequantize(packed, state))


# ------------------------------------------------------------------------------------------
# rounding rule
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bnb_cuda", [False, True], ids=["cpu-arith", "cuda-arith"])
def test_ties_go_to_lower_code(gen: torch.Generator, bnb_cuda: bool) -> None:
    """Values exactly on a midpoint take the lower code; one ulp above takes the upper one."""
    bounds = nf4_bounds()
    scale = 2.0 ** int(torch.randint(-3, 4, (1,), generator=gen))  # exact scaling
    on = bounds * scale
    above = torch.nextafter(bounds, torch.full_like(bounds, 2.0)) * scale
    pick = torch.randint(0, 15, (3,), generator=gen)
    body = torch.cat([on, above, on[pick[:1]]])
    body = body[torch.randperm(body.numel(), generator=gen)]
    # block 0: 32 values with absmax = scale; block 1 (partial, odd count): scale and two ties
    vals = torch.cat([torch.tensor([scale]), body, torch.tensor([scale]), on[pick[1:]]])
    packed, absmax = torch.ops.corda_kernels.nf4_quantize(vals, 32, bnb_cuda)
    q = _unpack(packed, vals.numel())
    expect = torch.bucketize(vals / scale, bounds)  # a tie counts as "not above": lower code
    lower = torch.searchsorted(bounds, vals / scale)  # index of the midpoint hit, if any
    is_tie = torch.isin(vals / scale, bounds)
    assert is_tie.sum() == 15 + 3 and vals.numel() == 35
    assert torch.equal(q[is_tie], lower[is_tie])
    assert torch.equal(q, expect)
    if not bnb_cuda:
        ref_p, _ = F.quantize_4bit(vals, blocksize=32, quant_type="nf4")
        assert torch.equal(packed, ref_p)


# ------------------------------------------------------------------------------------------
# CUDA-arithmetic flavour (what bitsandbytes' CUDA kernels compute), checked on the CPU
# ------------------------------------------------------------------------------------------


def test_cuda_arith_against_float64_nearest(gen: torch.Generator) -> None:
    """Codes are the nearest level of ``x·(1/absmax)`` (fp32 scale), partial block included."""
    n = 64 * 37 + 29
    x = _rand(gen, (n,), torch.float32)
    packed, absmax = torch.ops.corda_kernels.nf4_quantize(x, 64, True)
    q = _unpack(packed, n)
    block = torch.arange(n) // 64
    ref_absmax = torch.stack([x[i * 64 : (i + 1) * 64].abs().max() for i in range(math.ceil(n / 64))])
    assert torch.equal(absmax, ref_absmax)
    scaled = x * (1.0 / absmax)[block]  # the fp32 product bitsandbytes' CUDA kernel forms
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    dist = (scaled.double().unsqueeze(1) - levels).abs()
    nearest = dist.argmin(1)
    near_mid = (scaled.double().unsqueeze(1) - nf4_bounds().double()).abs().min(1).values < 1e-7
    assert torch.equal(q[~near_mid], nearest[~near_mid])
    assert near_mid.float().mean() < 1e-3
    # the odd pad nibble is a zero scaled by a finite reciprocal: code 7
    assert int(packed[-1, 0]) & 15 == 7


def test_cuda_arith_zero_block(gen: torch.Generator) -> None:
    """An all-zero block: CUDA arithmetic gives NaN → code 0, the CPU path code 7; both decode to 0."""
    x = _rand(gen, (3 * 32,), torch.float32)
    x[32:64] = 0
    for bnb_cuda, code in ((True, 0), (False, 7)):
        packed, absmax = torch.ops.corda_kernels.nf4_quantize(x, 32, bnb_cuda)
        assert absmax[1] == 0
        assert torch.all(_unpack(packed, 96)[32:64] == code)
        out = torch.ops.corda_kernels.nf4_dequantize(packed, absmax, 32, 96, torch.float32)
        assert torch.all(out[32:64] == 0)
        assert rel_err(out, x) < 0.2


def test_nested_binary_search_is_nearest(gen: torch.Generator) -> None:
    """CUDA's 8-bit search returns the nearest dynamic-map entry (ties aside); CPU's table mostly does."""
    x = torch.randn(256 * 40 + 11, generator=gen) * torch.rand(1, generator=gen)
    code = dynamic_map().double()
    for bnb_cuda in (True, False):
        q, absmax = torch.ops.corda_kernels.blockwise8_quantize(x, 256, bnb_cuda)
        scaled = (x.reshape(-1) * (1.0 / absmax).repeat_interleave(256)[: x.numel()]).double()
        nearest = (scaled.unsqueeze(1) - code).abs().argmin(1)
        agree = (q.long() == nearest).float().mean()
        if bnb_cuda:
            assert agree == 1.0
        else:
            assert agree > 0.99
            # the table maps a bin of width 2/65535 to one code: near 0, where the dynamic map is
            # denser than the bins, it can be several codes off, but never worse than one bin width
            err = (code[q.long()] - scaled).abs()
            best = (code[nearest] - scaled).abs()
            assert bool((err <= best + 2.0 / 65535 + 1e-9).all())
        deq = torch.ops.corda_kernels.blockwise8_dequantize(q, absmax, 256)
        assert rel_err(deq, x) < 0.02


# ------------------------------------------------------------------------------------------
# error paths
# ------------------------------------------------------------------------------------------


def test_errors(gen: torch.Generator) -> None:
    W = _rand(gen, (8, 8), torch.float32)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        ck.nf4_quantize(W, blocksize=48)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        ck.nf4_quantize(W, blocksize=8192)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ck.nf4_quantize(torch.randint(0, 5, (8, 8), generator=gen))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ck.nf4_quantize(W.double())
    with pytest.raises(ValueError, match="empty tensor"):
        ck.nf4_quantize(torch.empty(0, 4))
    packed, state = ck.nf4_quantize(W)
    with pytest.raises(ValueError, match="packed bytes do not hold"):
        ck.nf4_dequantize(packed[:-1], state)
    with pytest.raises(TypeError, match="must be uint8"):
        ck.nf4_dequantize(packed.float(), state)
    B, A = torch.randn(8, 2, generator=gen), torch.randn(3, 8, generator=gen)
    with pytest.raises(ValueError, match="do not chain"):
        ck.nf4_quantize_residual(W, B, A, 1.0)


# ------------------------------------------------------------------------------------------
# residual → NF4 (torch path)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_torch_path(gen: torch.Generator, dtype: torch.dtype) -> None:
    m, n, r = 37, 53, 5
    W = _rand(gen, (m, n), dtype)
    B = torch.randn(m, r, generator=gen)
    A = torch.randn(r, n, generator=gen)
    s = 0.37
    packed, state = ck.nf4_quantize_residual(W, B, A, s, blocksize=64, compress_statistics=True)
    R = W.double() - s * B.double() @ A.double()
    R_cast = R.to(dtype)
    ref_p, ref_s = F.quantize_4bit(
        nf4_ops.residual(W, B, A, s), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    assert torch.equal(packed, ref_p)
    _assert_same_state(state, ref_s)
    # the fp32 residual agrees with float64 to rounding (before the cast to W's dtype)
    assert rel_err(nf4_ops.residual(W.float(), B, A, s), R) < 1e-6
    assert rel_err(ck.nf4_dequantize(packed, state), R_cast) < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_matches_adapter_residual(gen: torch.Generator, dtype: torch.dtype) -> None:
    """QCorDA: NF4 of the fused residual = NF4 of ``build_adapter``'s ``W_res``, byte for byte."""
    from corda_kernels.engine.adapters import build_adapter

    m, n, r = 40, 72, 6
    W = _rand(gen, (m, n), dtype)
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    s = 0.5
    A, B, W_res = build_adapter(W, U[:, :r], S[:r], Vh[:r].T, s)
    packed, state = ck.nf4_quantize_residual(W, B, A, s, blocksize=32)
    ref_p, ref_s = F.quantize_4bit(W_res, blocksize=32, quant_type="nf4")
    assert torch.equal(packed, ref_p)
    _assert_same_state(state, ref_s)
