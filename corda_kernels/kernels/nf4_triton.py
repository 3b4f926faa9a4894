"""Triton NF4 kernels: quantize-and-pack, dequantize, the 8-bit nested statistics, fused residual → NF4.

All kernels reproduce bitsandbytes' bytes (see :mod:`corda_kernels.ops.nf4` for the two arithmetic
flavours): ``BNB_CUDA`` selects CUDA arithmetic (reciprocal everywhere, raw absmax) over CPU
arithmetic (partial last block divided, absmax clamped at 1e-38), and ``APPROX_RCP`` uses
``rcp.approx.ftz.f32`` for ``1/absmax`` as bitsandbytes' fast-math CUDA build does (GPU only:
inline PTX does not run in the interpreter). Loads are upcast to fp32 before any arithmetic
(the interpreter computes bf16 wrongly); the only low-precision math is the optional bf16/fp16
``tl.dot`` of the fused residual on the GPU (``DOT_LOWP``), whose products are exact in fp32.

Layout of the quantize kernels: a program owns ``NB`` consecutive quantization blocks as an
``[NB, BLOCKSIZE]`` tile of the flattened tensor; element pairs are split (even → high nibble,
odd → low nibble) and stored as ``[NB, BLOCKSIZE/2]`` bytes. Under the interpreter every program
instance costs milliseconds, so tiles are large there.

Why one file of 700+ lines: the four kernels are one op family (the NF4 format) and share the
code table, the nibble packing, the two arithmetic flavours and the tile layout above; split,
each file would repeat them or import private helpers from its siblings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register_impl, triton_interpreted
from ..ops import nf4 as _nf4

# ------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------


@triton.jit
def _recip(x, APPROX_RCP: tl.constexpr):
    """``1/x`` in fp32: ``rcp.approx.ftz`` (bitsandbytes' fast-math CUDA) or IEEE round-to-nearest."""
    if APPROX_RCP:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def _nf4_code(v, bounds_ptr):
    """NF4 code (int32) of scaled values: the number of fp32 midpoints strictly below (ties → lower;
    NaN → 0, as bitsandbytes' CUDA decision tree)."""
    q = tl.zeros(v.shape, tl.int32)
    for i in tl.static_range(15):
        t = tl.load(bounds_ptr + i)
        q += (v > t).to(tl.int32)
    return q


@triton.jit
def _round_to(x, ROUND: tl.constexpr):
    """Round fp32 ``x`` to the weight dtype and back (0: fp32, 1: fp16, 2: bf16, nearest-even)."""
    if ROUND == 1:
        return x.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        # bf16 round-to-nearest-even by integer arithmetic (the interpreter's bf16 cast is not RNE)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _quantize_tile(
    x,
    valid,
    blk,
    blk_ok,
    n,
    bounds_ptr,
    out_ptr,
    absmax_ptr,
    NB: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BNB_CUDA: tl.constexpr,
    APPROX_RCP: tl.constexpr,
    WORDS: tl.constexpr,
):
    """Quantize an fp32 ``[NB, BLOCKSIZE]`` tile holding blocks ``blk`` (``[NB]``; stored where
    ``blk_ok``) of a flattened tensor of ``n`` elements; store the packed bytes and the absmax.

    ``WORDS`` (``n % 8 == 0``; ``out_ptr`` is then the packed bytes viewed as int32): eight codes
    are assembled into one little-endian 32-bit word and stored as such, instead of eight single
    byte stores per thread."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    x = tl.where(valid, x, 0.0)
    am = tl.max(tl.abs(x), axis=1)  # [NB]
    if BNB_CUDA:
        r = _recip(am, APPROX_RCP)
        v = x * r[:, None]
        am_store = am
    else:
        amc = tl.maximum(am, 1e-38)
        partial = (blk + 1) * BLOCKSIZE > n  # only the last block can be partial
        r = _recip(amc, False)
        v_full = x * r[:, None]
        v_part = tl.math.div_rn(x, tl.broadcast_to(amc[:, None], x.shape))
        v = tl.where(partial[:, None], v_part, v_full)
        am_store = tl.where(partial, amc, am)
    q = _nf4_code(v, bounds_ptr)
    if WORDS:
        # element 8k+i of a word: byte i//2 (little-endian), high nibble for even i
        i = tl.arange(0, 8)
        shift = (i // 2) * 8 + (1 - i % 2) * 4
        q3 = tl.reshape(q, (NB, BLOCKSIZE // 8, 8)).to(tl.uint32)
        word = tl.sum(q3 << shift[None, None, :].to(tl.uint32), axis=2)  # disjoint bits: sum == or
        widx = blk[:, None] * (BLOCKSIZE // 8) + tl.arange(0, BLOCKSIZE // 8)[None, :]
        tl.store(out_ptr + widx, word.to(tl.int32, bitcast=True), mask=blk_ok[:, None] & (widx < n // 8))
    else:
        hi, lo = tl.split(tl.reshape(q, (NB, HALF, 2)))
        byte = ((hi << 4) | lo).to(tl.uint8)
        bidx = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
        tl.store(out_ptr + bidx, byte, mask=blk_ok[:, None] & (bidx < (n + 1) // 2))
    tl.store(absmax_ptr + blk, am_store, mask=blk_ok)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def nf4_quantize_kernel(
    x_ptr,
    bounds_ptr,
    out_ptr,
    absmax_ptr,
    n,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    BNB_CUDA: tl.constexpr,
    APPROX_RCP: tl.constexpr,
    WORDS: tl.constexpr,
):
    """NF4 quantize + pack of a flat contiguous ``x`` (fp32/fp16/bf16, ``n`` elements)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * NB + tl.arange(0, NB)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    _quantize_tile(
        x, valid, blk, blk < nblocks, n, bounds_ptr, out_ptr, absmax_ptr, NB, BLOCKSIZE, BNB_CUDA, APPROX_RCP, WORDS
    )


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
    """``out[2j], out[2j+1] = code[byte_j >> 4], code[byte_j & 15]`` times the block's absmax."""
    pid = tl.program_id(0).to(tl.int64)
    j = pid * TILE + tl.arange(0, TILE)
    nbytes = (n + 1) // 2
    b = tl.load(packed_ptr + j, mask=j < nbytes, other=0).to(tl.int32)
    s = tl.load(absmax_ptr + (2 * j) // BLOCKSIZE, mask=j < nbytes, other=0.0)
    v_hi = tl.load(code_ptr + (b >> 4)) * s
    v_lo = tl.load(code_ptr + (b & 15)) * s
    v = tl.reshape(tl.join(v_hi, v_lo), (2 * TILE,))
    e = pid * 2 * TILE + tl.arange(0, 2 * TILE)
    tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=e < n)


@triton.jit
def blockwise8_quantize_kernel(
    x_ptr,
    code_ptr,
    lut_ptr,
    out_ptr,
    absmax_ptr,
    n,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    BNB_CUDA: tl.constexpr,
    APPROX_RCP: tl.constexpr,
):
    """bitsandbytes' 8-bit blockwise quantization with the dynamic map (the nested NF4 statistics).

    CUDA arithmetic: the 7-step binary search of ``dQuantize<0>``; CPU arithmetic: the 65536-bin
    lookup table ``lut`` (all-zero blocks → code 0).
    """
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * NB + tl.arange(0, NB)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)
    r = _recip(am, APPROX_RCP)
    v = x * r[:, None]
    if BNB_CUDA:
        pivot = tl.full(v.shape, 127, tl.int32)
        upper_p = tl.full(v.shape, 255, tl.int32)
        lower_p = tl.zeros(v.shape, tl.int32)
        upper = tl.full(v.shape, 1.0, tl.float32)
        lower = tl.full(v.shape, -1.0, tl.float32)
        val = tl.load(code_ptr + pivot)
        for k in tl.static_range(7):
            step = 64 >> k
            right = v > val
            lower_p = tl.where(right, pivot, lower_p)
            lower = tl.where(right, val, lower)
            upper_p = tl.where(right, upper_p, pivot)
            upper = tl.where(right, upper, val)
            pivot = tl.where(right, pivot + step, pivot - step)
            val = tl.load(code_ptr + pivot)
        upper = tl.where(upper_p == 255, tl.load(code_ptr + 255), upper)
        lower = tl.where(lower_p == 0, tl.load(code_ptr), lower)
        right = v > val
        q = tl.where(
            right,
            tl.where(v > (upper + val) * 0.5, upper_p, pivot),
            tl.where(v < (lower + val) * 0.5, lower_p, pivot),
        )
    else:
        zero = (am == 0.0)[:, None]
        vc = tl.minimum(tl.maximum(tl.where(zero, 0.0, v), -1.0), 1.0)
        t = (vc + 1.0) * 0.5
        t = t * 65535.0
        idx = (t + 0.5).to(tl.int32)
        q = tl.where(zero, 0, tl.load(lut_ptr + idx).to(tl.int32))
    tl.store(out_ptr + offs, q.to(tl.uint8), mask=valid)
    tl.store(absmax_ptr + blk, am, mask=blk < nblocks)


@triton.jit
def nf4_residual_tiled_kernel(
    w_ptr,
    b_ptr,
    a_ptr,
    bounds_ptr,
    out_ptr,
    absmax_ptr,
    M,
    N,
    R,
    scaling,
    stride_wm,
    stride_wn,
    stride_bm,
    stride_br,
    stride_ar,
    stride_an,
    BLOCKSIZE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    ROUND: tl.constexpr,
    DOT_LOWP: tl.constexpr,
    BNB_CUDA: tl.constexpr,
    APPROX_RCP: tl.constexpr,
    WORDS: tl.constexpr,
):
    """Fused ``NF4(W − s·B·A)`` for ``N % BLOCKSIZE == 0`` (every quantization block inside one row).

    A program forms the ``[BM, BN]`` residual tile with one ``tl.dot`` (``B`` tile ``[BM, RP]``,
    ``A`` tile ``[RP, BN]``, rank zero-padded to ``RP``), rounds it to the weight dtype and
    quantizes its ``BM·BN/BLOCKSIZE`` blocks in registers: the residual never reaches memory.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, RP)
    mm = rm < M
    mn = rn < N
    bt = tl.load(
        b_ptr + rm[:, None] * stride_bm + rk[None, :] * stride_br, mask=mm[:, None] & (rk[None, :] < R), other=0.0
    )
    at = tl.load(
        a_ptr + rk[:, None] * stride_ar + rn[None, :] * stride_an, mask=(rk[:, None] < R) & mn[None, :], other=0.0
    )
    if DOT_LOWP:
        acc = tl.dot(bt, at, out_dtype=tl.float32)
    else:
        acc = tl.dot(bt.to(tl.float32), at.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    wmask = mm[:, None] & mn[None, :]
    w = tl.load(w_ptr + rm[:, None].to(tl.int64) * stride_wm + rn[None, :] * stride_wn, mask=wmask, other=0.0).to(
        tl.float32
    )
    res = _round_to(w - scaling * acc, ROUND)
    # [BM, BN] → [BM·BN/BLOCKSIZE, BLOCKSIZE]: row-major blocks of the flattened weight
    NBT: tl.constexpr = BM * (BN // BLOCKSIZE)
    x = tl.reshape(res, (NBT, BLOCKSIZE))
    valid = tl.reshape(wmask, (NBT, BLOCKSIZE))
    t = tl.arange(0, NBT)
    per_row: tl.constexpr = BN // BLOCKSIZE
    row = pid_m * BM + t // per_row
    blk = row.to(tl.int64) * (N // BLOCKSIZE) + pid_n * per_row + t % per_row
    ok_blk = (row < M) & (pid_n * BN + (t % per_row) * BLOCKSIZE < N)
    n_total = M.to(tl.int64) * N
    # blocks past W's last row or column would alias the next row's blocks: not stored
    _quantize_tile(
        x, valid, blk, ok_blk, n_total, bounds_ptr, out_ptr, absmax_ptr, NBT, BLOCKSIZE, BNB_CUDA, APPROX_RCP, WORDS
    )


@triton.jit
def nf4_residual_flat_kernel(
    w_ptr,
    b_ptr,
    a_ptr,
    bounds_ptr,
    out_ptr,
    absmax_ptr,
    n,
    nblocks,
    N,
    R,
    scaling,
    stride_wm,
    stride_wn,
    stride_bm,
    stride_br,
    stride_ar,
    stride_an,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    ROUND: tl.constexpr,
    BNB_CUDA: tl.constexpr,
    APPROX_RCP: tl.constexpr,
):
    """Fused ``NF4(W − s·B·A)`` for any shape: blocks of the flattened weight, rows gathered.

    Each element ``f`` is ``(f // N, f % N)``; the rank-``R`` product is accumulated term by term
    in fp32 (``acc += B[i, k]·A[k, j]``), so under the interpreter it equals the same loop in torch.
    """
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * NB + tl.arange(0, NB)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    valid = offs < n
    row = offs // N
    col = offs % N
    acc = tl.zeros((NB, BLOCKSIZE), tl.float32)
    for k in range(0, R):
        bv = tl.load(b_ptr + row * stride_bm + k * stride_br, mask=valid, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + k * stride_ar + col * stride_an, mask=valid, other=0.0).to(tl.float32)
        acc += bv * av
    w = tl.load(w_ptr + row * stride_wm + col * stride_wn, mask=valid, other=0.0).to(tl.float32)
    x = _round_to(w - scaling * acc, ROUND)
    _quantize_tile(
        x, valid, blk, blk < nblocks, n, bounds_ptr, out_ptr, absmax_ptr, NB, BLOCKSIZE, BNB_CUDA, APPROX_RCP, False
    )


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------

# Elements per program: under the interpreter each program instance costs milliseconds.
_TILE_ELEMS_INTERP = 1 << 16
_TILE_ELEMS_GPU = 2048


# bitsandbytes' CUDA build (--use_fast_math) computes 1/absmax with rcp.approx.ftz; set this to
# False to use an IEEE reciprocal on the GPU instead (bench/gpu_nf4.py measures both against bnb).
APPROX_RCP_ON_GPU = True


def _approx_rcp(t: torch.Tensor) -> bool:
    return APPROX_RCP_ON_GPU and t.device.type == "cuda" and not triton_interpreted()


def _blocks_per_program(blocksize: int, nblocks: int) -> int:
    target = _TILE_ELEMS_INTERP if triton_interpreted() else _TILE_ELEMS_GPU
    nb = max(1, target // blocksize)
    return min(nb, triton.next_power_of_2(nblocks))


@register_impl("nf4_quantize", "triton")
def _nf4_quantize_triton(A: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = A.reshape(-1).contiguous()
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    nb = _blocks_per_program(blocksize, nblocks)
    grid = (triton.cdiv(nblocks, nb),)
    words = n % 8 == 0
    nf4_quantize_kernel[grid](
        x,
        _nf4.nf4_bounds(x.device),
        packed.view(-1).view(torch.int32) if words else packed,
        absmax,
        n,
        nblocks,
        BLOCKSIZE=blocksize,
        NB=nb,
        BNB_CUDA=bnb_cuda,
        APPROX_RCP=bnb_cuda and _approx_rcp(x),
        WORDS=words,
    )
    return packed, absmax


@register_impl("nf4_dequantize", "triton")
def _nf4_dequantize_triton(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    p = packed.reshape(-1).contiguous()
    # Under the interpreter the fp32 → bf16 store is not round-to-nearest: cast in torch instead.
    direct = not (triton_interpreted() and dtype == torch.bfloat16)
    out = torch.empty(numel, dtype=dtype if direct else torch.float32, device=p.device)
    tile = (_TILE_ELEMS_INTERP if triton_interpreted() else _TILE_ELEMS_GPU) // 2
    tile = min(tile, triton.next_power_of_2(p.numel()))
    grid = (triton.cdiv(p.numel(), tile),)
    nf4_dequantize_kernel[grid](
        p, absmax.float().contiguous(), _nf4.nf4_code(p.device), out, numel, BLOCKSIZE=blocksize, TILE=tile
    )
    return out if direct else out.to(dtype)


@register_impl("blockwise8_quantize", "triton")
def _blockwise8_quantize_triton(A: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = A.reshape(-1).contiguous()
    n = x.numel()
    nblocks = -(-n // blocksize)
    out = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    nb = _blocks_per_program(blocksize, nblocks)
    lut = _nf4._dynamic_lut(x.device).to(torch.int32) if not bnb_cuda else out  # unused pointer in CUDA mode
    blockwise8_quantize_kernel[(triton.cdiv(nblocks, nb),)](
        x,
        _nf4.dynamic_map(x.device),
        lut,
        out,
        absmax,
        n,
        nblocks,
        BLOCKSIZE=blocksize,
        NB=nb,
        BNB_CUDA=bnb_cuda,
        APPROX_RCP=bnb_cuda and _approx_rcp(x),
    )
    return out, absmax


_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _residual_tiles(blocksize: int, M: int, N: int, R: int) -> tuple[int, int, int] | None:
    """(BM, BN, RP) for the tiled kernel, or None when it does not apply."""
    if N % blocksize or blocksize > 256 or R > 256:
        return None
    rp = max(16, triton.next_power_of_2(R))
    if triton_interpreted():
        bn = max(blocksize, min(256, triton.next_power_of_2(N)))
        bm = max(16, min(128, triton.next_power_of_2(M)))
    else:
        bn = max(blocksize, 64)
        bm = 32 if rp <= 64 else 16
    return bm, bn, rp


@register_impl("nf4_quantize_residual", "triton")
def _nf4_quantize_residual_triton(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, blocksize: int, bnb_cuda: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = W.shape
    R = B.shape[1]
    n = M * N
    nblocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=W.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=W.device)
    bounds = _nf4.nf4_bounds(W.device)
    approx = bnb_cuda and _approx_rcp(W)
    tiles = _residual_tiles(blocksize, M, N, R)
    if tiles is not None:
        bm, bn, rp = tiles
        lowp = not triton_interpreted() and B.dtype == A.dtype and B.dtype in (torch.float16, torch.bfloat16)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        # N % BLOCKSIZE == 0 here, so the element count is a multiple of 8: whole 32-bit words
        nf4_residual_tiled_kernel[grid](
            W,
            B,
            A,
            bounds,
            packed.view(-1).view(torch.int32),
            absmax,
            M,
            N,
            R,
            float(scaling),
            W.stride(0),
            W.stride(1),
            B.stride(0),
            B.stride(1),
            A.stride(0),
            A.stride(1),
            BLOCKSIZE=blocksize,
            BM=bm,
            BN=bn,
            RP=rp,
            ROUND=_ROUND[W.dtype],
            DOT_LOWP=lowp,
            BNB_CUDA=bnb_cuda,
            APPROX_RCP=approx,
            WORDS=True,
        )
    else:
        nb = _blocks_per_program(blocksize, nblocks)
        nf4_residual_flat_kernel[(triton.cdiv(nblocks, nb),)](
            W,
            B,
            A,
            bounds,
            packed,
            absmax,
            n,
            nblocks,
            N,
            R,
            float(scaling),
            W.stride(0),
            W.stride(1),
            B.stride(0),
            B.stride(1),
            A.stride(0),
            A.stride(1),
            BLOCKSIZE=blocksize,
            NB=nb,
            ROUND=_ROUND[W.dtype],
            BNB_CUDA=bnb_cuda,
            APPROX_RCP=approx,
        )
    return packed, absmax


# ------------------------------------------------------------------------------------------
# compile check (Hopper / Ampere): what tests/test_triton_compile.py builds
# ------------------------------------------------------------------------------------------


def compile_specs() -> list[dict]:
    """Kernels and signatures for ``triton.compile`` on ``GPUTarget("cuda", 90|80, 32)``.

    Each entry: ``fn`` (the ``@triton.jit`` function), ``signature`` (arg name → Triton type or
    ``"constexpr"``), ``constexprs`` (name → value), ``name``. The GPU configurations are built
    (``APPROX_RCP=True`` inline PTX, bf16 dots), not the interpreter ones.
    """
    specs: list[dict] = []
    for dt in ("fp32", "bf16", "fp16"):
        for bs in (64, 4096):
            specs.append(
                {
                    "name": f"nf4_quantize_{dt}_bs{bs}",
                    "fn": nf4_quantize_kernel,
                    "signature": {
                        "x_ptr": f"*{dt}",
                        "bounds_ptr": "*fp32",
                        "out_ptr": "*i32",
                        "absmax_ptr": "*fp32",
                        "n": "i64",
                        "nblocks": "i64",
                        "BLOCKSIZE": "constexpr",
                        "NB": "constexpr",
                        "BNB_CUDA": "constexpr",
                        "APPROX_RCP": "constexpr",
                        "WORDS": "constexpr",
                    },
                    "constexprs": {
                        "BLOCKSIZE": bs,
                        "NB": max(1, _TILE_ELEMS_GPU // bs),
                        "BNB_CUDA": True,
                        "APPROX_RCP": True,
                        "WORDS": True,
                    },
                }
            )
    specs.append(
        {
            "name": "nf4_quantize_cpu_arith",
            "fn": nf4_quantize_kernel,
            "signature": {
                "x_ptr": "*fp32",
                "bounds_ptr": "*fp32",
                "out_ptr": "*u8",
                "absmax_ptr": "*fp32",
                "n": "i64",
                "nblocks": "i64",
                "BLOCKSIZE": "constexpr",
                "NB": "constexpr",
                "BNB_CUDA": "constexpr",
                "APPROX_RCP": "constexpr",
                "WORDS": "constexpr",
            },
            "constexprs": {"BLOCKSIZE": 64, "NB": 32, "BNB_CUDA": False, "APPROX_RCP": False, "WORDS": False},
        }
    )
    for dt in ("fp32", "bf16"):
        specs.append(
            {
                "name": f"nf4_dequantize_{dt}",
                "fn": nf4_dequantize_kernel,
                "signature": {
                    "packed_ptr": "*u8",
                    "absmax_ptr": "*fp32",
                    "code_ptr": "*fp32",
                    "out_ptr": f"*{dt}",
                    "n": "i64",
                    "BLOCKSIZE": "constexpr",
                    "TILE": "constexpr",
                },
                "constexprs": {"BLOCKSIZE": 64, "TILE": _TILE_ELEMS_GPU // 2},
            }
        )
    for cuda in (True, False):
        specs.append(
            {
                "name": f"blockwise8_quantize_{'cuda' if cuda else 'cpu'}_arith",
                "fn": blockwise8_quantize_kernel,
                "signature": {
                    "x_ptr": "*fp32",
                    "code_ptr": "*fp32",
                    "lut_ptr": "*i32" if not cuda else "*u8",
                    "out_ptr": "*u8",
                    "absmax_ptr": "*fp32",
                    "n": "i64",
                    "nblocks": "i64",
                    "BLOCKSIZE": "constexpr",
                    "NB": "constexpr",
                    "BNB_CUDA": "constexpr",
                    "APPROX_RCP": "constexpr",
                },
                "constexprs": {"BLOCKSIZE": 256, "NB": 8, "BNB_CUDA": cuda, "APPROX_RCP": cuda},
            }
        )
    res_sig = {
        "w_ptr": "*bf16",
        "b_ptr": "*bf16",
        "a_ptr": "*bf16",
        "bounds_ptr": "*fp32",
        "out_ptr": "*i32",
        "absmax_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "R": "i32",
        "scaling": "fp32",
        "stride_wm": "i32",
        "stride_wn": "i32",
        "stride_bm": "i32",
        "stride_br": "i32",
        "stride_ar": "i32",
        "stride_an": "i32",
        "BLOCKSIZE": "constexpr",
        "BM": "constexpr",
        "BN": "constexpr",
        "RP": "constexpr",
        "ROUND": "constexpr",
        "DOT_LOWP": "constexpr",
        "BNB_CUDA": "constexpr",
        "APPROX_RCP": "constexpr",
        "WORDS": "constexpr",
    }
    specs.append(
        {
            "name": "nf4_residual_tiled_bf16",
            "fn": nf4_residual_tiled_kernel,
            "signature": res_sig,
            "constexprs": {
                "BLOCKSIZE": 64,
                "BM": 32,
                "BN": 64,
                "RP": 64,
                "ROUND": 2,
                "DOT_LOWP": True,
                "BNB_CUDA": True,
                "APPROX_RCP": True,
                "WORDS": True,
            },
        }
    )
    specs.append(
        {
            "name": "nf4_residual_tiled_fp32",
            "fn": nf4_residual_tiled_kernel,
            "signature": {**res_sig, "w_ptr": "*fp32", "b_ptr": "*fp32", "a_ptr": "*fp32"},
            "constexprs": {
                "BLOCKSIZE": 64,
                "BM": 32,
                "BN": 64,
                "RP": 64,
                "ROUND": 0,
                "DOT_LOWP": False,
                "BNB_CUDA": True,
                "APPROX_RCP": True,
                "WORDS": True,
            },
        }
    )
    specs.append(
        {
            "name": "nf4_residual_flat_fp16",
            "fn": nf4_residual_flat_kernel,
            "signature": {
                "w_ptr": "*fp16",
                "b_ptr": "*fp32",
                "a_ptr": "*fp32",
                "bounds_ptr": "*fp32",
                "out_ptr": "*u8",
                "absmax_ptr": "*fp32",
                "n": "i64",
                "nblocks": "i64",
                "N": "i64",
                "R": "i32",
                "scaling": "fp32",
                "stride_wm": "i64",
                "stride_wn": "i64",
                "stride_bm": "i64",
                "stride_br": "i64",
                "stride_ar": "i64",
                "stride_an": "i64",
                "BLOCKSIZE": "constexpr",
                "NB": "constexpr",
                "ROUND": "constexpr",
                "BNB_CUDA": "constexpr",
                "APPROX_RCP": "constexpr",
            },
            "constexprs": {"BLOCKSIZE": 128, "NB": 16, "ROUND": 1, "BNB_CUDA": True, "APPROX_RCP": True},
        }
    )
    # Launch-like specialization: torch allocations are 16-byte aligned, as a launch would see them.
    aligned = [["tt.divisibility", 16]]
    for spec in specs:
        spec["attrs"] = {a: aligned for a, t in spec["signature"].items() if t.startswith("*")}
        if spec["constexprs"].get("APPROX_RCP"):
            spec["ptx_contains"] = {90: "rcp.approx.ftz.f32", 80: "rcp.approx.ftz.f32"}
    return specs
