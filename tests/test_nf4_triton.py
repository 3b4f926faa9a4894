"""Triton NF4 kernels under the interpreter (``TRITON_INTERPRET=1``, set by conftest) on CPU tensors.

References: bitsandbytes' own CPU quantization (byte-exact), the torch backend (both arithmetic
flavours) and float64 residuals. The fused residual kernel is byte-exact wherever the residual
is summed in the same order as the reference (the flat kernel's term-by-term loop); the tiled
kernel's ``tl.dot`` (numpy's matmul here, cuBLAS-like blocked sums on the GPU) sums the rank
terms in another order than ``B @ A`` in torch, so a residual can differ by an ulp and, rarely, a
value on a code boundary or a block's absmax moves: those paths are checked by the fraction of
differing codes and by dequantized closeness.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

import corda_kernels as ck
from corda_kernels import backend
from corda_kernels.kernels import nf4_triton
from corda_kernels.ops.nf4 import VALID_BLOCKSIZES, residual
from tests.conftest import rel_err

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ops = torch.ops.corda_kernels


@pytest.fixture(autouse=True)
def _eager_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes wraps its dequantize in torch.compile (seconds per new shape): run it eagerly."""
    from bitsandbytes.backends.default import ops as bnb_default

    compiled = bnb_default._dequantize_4bit_compute
    monkeypatch.setattr(bnb_default, "_dequantize_4bit_compute", getattr(compiled, "__wrapped__", compiled))


def _rand(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    return x.to(dtype)


def _both(op, *args):  # noqa: ANN001, ANN202
    """Run ``op`` with the torch and with the triton backend."""
    ck.set_backend("torch")
    ref = op(*args)
    ck.set_backend("triton")
    out = op(*args)
    return out, ref


def test_triton_backend_is_used() -> None:
    ck.set_backend("triton")
    cpu = torch.device("cpu")
    assert backend.resolve("nf4_quantize", cpu) is nf4_triton._nf4_quantize_triton
    assert backend.resolve("nf4_dequantize", cpu) is nf4_triton._nf4_dequantize_triton
    assert backend.resolve("blockwise8_quantize", cpu) is nf4_triton._blockwise8_quantize_triton
    assert backend.resolve("nf4_quantize_residual", cpu) is nf4_triton._nf4_quantize_residual_triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
def test_quantize_byte_exact_with_bitsandbytes(
    gen: torch.Generator, dtype: torch.dtype, blocksize: int, compress: bool
) -> None:
    ck.set_backend("triton")
    rows = int(torch.randint(3, 9, (1,), generator=gen)) | 1
    cols = (blocksize * 3 + int(torch.randint(1, blocksize, (1,), generator=gen))) // rows | 1
    # odd count (byte stores), non-contiguous, and a count divisible by 8 (32-bit word stores)
    for W in (_rand(gen, (rows, cols), dtype), _rand(gen, (cols, rows), dtype).T, _rand(gen, (8, cols), dtype)):
        packed, state = ck.nf4_quantize(W, blocksize=blocksize, compress_statistics=compress)
        ref_p, ref_s = F.quantize_4bit(
            W.contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=compress
        )
        assert torch.equal(packed, ref_p)
        assert torch.equal(state.absmax, ref_s.absmax)
        if compress:
            assert torch.equal(state.offset, ref_s.offset)
            assert torch.equal(state.state2.absmax, ref_s.state2.absmax)
        out = ck.nf4_dequantize(packed, state)
        ck.set_backend("torch")
        assert torch.equal(out, ck.nf4_dequantize(packed, state))
        ck.set_backend("triton")


@pytest.mark.parametrize("bnb_cuda", [False, True], ids=["cpu-arith", "cuda-arith"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_torch_flavours(gen: torch.Generator, bnb_cuda: bool, dtype: torch.dtype) -> None:
    """Both arithmetic flavours, all-zero blocks (full and partial) and an odd pad included."""
    for blocksize, n in ((32, 32 * 5 + 3), (256, 256 * 5 + 3), (64, 64 * 5 + 24)):  # the last: 32-bit words
        x = _rand(gen, (n,), dtype)
        x[blocksize : 2 * blocksize] = 0
        out, ref = _both(ops.nf4_quantize, x, blocksize, bnb_cuda)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        x[4 * blocksize :] = 0  # the partial last block is all zero as well
        out, ref = _both(ops.nf4_quantize, x, blocksize, bnb_cuda)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_kernel(gen: torch.Generator, dtype: torch.dtype) -> None:
    for blocksize, n in ((64, 64 * 9 + 5), (4096, 4096 + 7), (32, 32 * 3)):
        x = _rand(gen, (n,), dtype)
        packed, absmax = ops.nf4_quantize(x, blocksize, False)
        out, ref = _both(ops.nf4_dequantize, packed, absmax, blocksize, n, dtype)
        assert out.dtype == dtype and out.shape == (n,)
        assert torch.equal(out, ref)
        assert rel_err(out, x) < 0.5
        state = F.QuantState(
            absmax=absmax,
            shape=torch.Size([n]),
            blocksize=blocksize,
            quant_type="nf4",
            dtype=dtype,
            code=F.get_4bit_type("nf4", device="cpu"),
        )
        bnb = F.dequantize_4bit(packed, state, quant_type="nf4")
        assert torch.equal(out, bnb.reshape(-1))


@pytest.mark.parametrize("bnb_cuda", [False, True], ids=["cpu-arith", "cuda-arith"])
def test_blockwise8_kernel(gen: torch.Generator, bnb_cuda: bool) -> None:
    x = torch.randn(256 * 6 + 17, generator=gen) * torch.rand(1, generator=gen)
    x[256:512] = 0
    out, ref = _both(ops.blockwise8_quantize, x, 256, bnb_cuda)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    if not bnb_cuda:
        q, st = F.quantize_blockwise(x, blocksize=256)
        assert torch.equal(out[0], q) and torch.equal(out[1], st.absmax)


# ------------------------------------------------------------------------------------------
# fused residual → NF4
# ------------------------------------------------------------------------------------------


def _loop_residual(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float) -> torch.Tensor:
    """The residual summed term by term in fp32 (the flat kernel's order), rounded to W's dtype."""
    acc = torch.zeros(W.shape)
    for k in range(B.shape[1]):
        acc = acc + B[:, k : k + 1].float() * A[k : k + 1, :].float()
    return (W.float() - s * acc).to(W.dtype)


def _factors(gen: torch.Generator, m: int, n: int, r: int, dtype: torch.dtype, strided: bool):  # noqa: ANN202
    W = _rand(gen, (n, m), dtype).T if strided else _rand(gen, (m, n), dtype)
    B = torch.randn(m, r, generator=gen) * 0.5
    A = (torch.randn(n, r, generator=gen) * 0.5).T if strided else torch.randn(r, n, generator=gen) * 0.5
    return W, B, A


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bnb_cuda", [False, True], ids=["cpu-arith", "cuda-arith"])
def test_fused_residual_flat_byte_exact(gen: torch.Generator, dtype: torch.dtype, bnb_cuda: bool) -> None:
    """Shapes whose last dim is not a multiple of the blocksize take the flat kernel: byte-exact."""
    for (m, n, r, bs), strided in (((37, 101, 7, 64), False), ((29, 75, 3, 32), True), ((9, 333, 5, 1024), True)):
        W, B, A = _factors(gen, m, n, r, dtype, strided)
        assert nf4_triton._residual_tiles(bs, m, n, r) is None
        s = float(torch.rand(1, generator=gen)) + 0.1
        ck.set_backend("triton")
        packed, absmax = ops.nf4_quantize_residual(W, B, A, s, bs, bnb_cuda)
        ck.set_backend("torch")
        ref_p, ref_a = ops.nf4_quantize(_loop_residual(W, B, A, s).reshape(-1), bs, bnb_cuda)
        assert torch.equal(packed, ref_p) and torch.equal(absmax, ref_a)
        if not bnb_cuda:
            bnb_p, bnb_s = F.quantize_4bit(_loop_residual(W, B, A, s), blocksize=bs, quant_type="nf4")
            assert torch.equal(packed, bnb_p) and torch.equal(absmax, bnb_s.absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_residual_tiled(gen: torch.Generator, dtype: torch.dtype) -> None:
    """Tiled kernel vs residual-then-quantize (``(W.float() − s·(B @ A)).to(W.dtype)``, then bitsandbytes)."""
    diff_codes = total = 0
    for (m, n, r, bs), strided in (((48, 128, 8, 64), False), ((40, 192, 5, 64), True), ((33, 512, 16, 256), False)):
        W, B, A = _factors(gen, m, n, r, dtype, strided)
        assert nf4_triton._residual_tiles(bs, m, n, r) is not None
        s = float(torch.rand(1, generator=gen)) + 0.1
        ck.set_backend("triton")
        packed, state = ck.nf4_quantize_residual(W, B, A, s, blocksize=bs)
        R = residual(W, B, A, s)
        ref_p, ref_s = F.quantize_4bit(R, blocksize=bs, quant_type="nf4")
        q = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)
        q_ref = torch.stack([ref_p.reshape(-1) >> 4, ref_p.reshape(-1) & 15], 1).reshape(-1)
        diff = q != q_ref
        diff_codes += int(diff.sum())
        total += diff.numel()
        # a differing code can only be a neighbour (a boundary value moved by an ulp)
        assert int((q.int() - q_ref.int()).abs().max()) <= 1
        # absmax equal up to an ulp or two of the residual's summation order
        assert bool(((state.absmax - ref_s.absmax).abs() <= 2.5e-7 * ref_s.absmax).all())
        ck.set_backend("torch")
        deq = ck.nf4_dequantize(packed, state).reshape(-1)
        deq_ref = ck.nf4_dequantize(ref_p, ref_s).reshape(-1)
        same = ~diff
        assert rel_err(deq[same], deq_ref[same]) < 1e-6
        R64 = W.double() - s * (B.double() @ A.double())
        assert rel_err(deq, R64.reshape(-1)) < 0.5
    assert diff_codes <= max(2, total // 1000), f"{diff_codes} of {total} codes differ"


def test_fused_residual_public_api(gen: torch.Generator) -> None:
    """``nf4_quantize_residual`` through the triton backend gives a state bitsandbytes decodes."""
    W, B, A = _factors(gen, 24, 96, 4, torch.bfloat16, False)  # 96 % 64 != 0: flat kernel, exact
    ck.set_backend("triton")
    packed, state = ck.nf4_quantize_residual(W, B, A, 0.75, blocksize=64, compress_statistics=True)
    ck.set_backend("torch")
    ref_p, ref_s = F.quantize_4bit(
        _loop_residual(W, B, A, 0.75), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    assert torch.equal(packed, ref_p)
    assert torch.equal(state.absmax, ref_s.absmax) and torch.equal(state.state2.absmax, ref_s.state2.absmax)
    assert torch.equal(ck.nf4_dequantize(packed, state), ck.nf4_dequantize(ref_p, ref_s))


def test_compile_specs_shape() -> None:
    """Every spec names a jitted kernel, types each of its arguments and values each constexpr."""
    specs = nf4_triton.compile_specs()
    assert len({s["name"] for s in specs}) == len(specs)
    kernels = {s["fn"] for s in specs}
    assert {
        nf4_triton.nf4_quantize_kernel,
        nf4_triton.nf4_dequantize_kernel,
        nf4_triton.blockwise8_quantize_kernel,
        nf4_triton.nf4_residual_tiled_kernel,
        nf4_triton.nf4_residual_flat_kernel,
    } <= kernels
    for s in specs:
        assert list(s["signature"]) == list(s["fn"].arg_names), s["name"]
        assert {k for k, v in s["signature"].items() if v == "constexpr"} == set(s["constexprs"]), s["name"]
