"""Triton streaming covariance ``C += Σ_t w_t x_t x_tᵀ`` (the ``triton`` backend of ``covariance_update``).

Inputs (the op's schema, see :mod:`corda_kernels.ops.covariance`):

- ``C``: ``(n, n)`` or ``(K, n, n)`` float32, any strides; updated in place.
- ``x``: ``(B, L, n)`` bf16 / fp16 / fp32, any strides. Read as it comes: no fp32 copy of X is
  made; bf16/fp16 tiles go straight into the tensor-core dot with fp32 accumulation (the
  products of two 16-bit floats are exact in fp32).
- ``mask``: ``(B, L)`` bool or None (False = padding: the token is not even loaded, so
  garbage or NaN under the mask cannot leak in).
- ``seq_scale``: ``(B,)`` float32 or None; sequence ``b`` contributes ``seq_scale[b]·X_bᵀX_b``
  (the scale multiplies the fp32 per-sequence partial product, so 16-bit operands stay exact).
- ``seq_bucket``: ``(B,)`` int64 or None; sequence ``b`` goes to buffer ``C[seq_bucket[b]]``.
  All K buffers are filled by one launch (grid axis 1 is the buffer index).
- ``upper_only``: only tiles ``(i, j)`` with ``i ≤ j`` are launched and, inside the diagonal
  tiles, only entries with row ≤ column are written: the strict lower triangle is left
  untouched for :func:`corda_kernels.covariance.symmetrize_`. Without it every tile is
  computed (the plain ``C += XᵀX``).

Grid: ``(tiles, K, split)``. ``split > 1`` cuts the (sequence, token-chunk) work units among
programs that add their partials with ``tl.atomic_add`` (used on the GPU when there are too
few tiles to fill the chip; the sum order then varies run to run, so those results are
reproducible to fp32 rounding, not bitwise). The dot uses ``input_precision="ieee"`` by default (exact fp32
for fp32 inputs, as on the CPU); ``input_precision="tf32"`` is an opt-in for fp32 inputs on
the GPU. Under ``TRITON_INTERPRET=1`` 16-bit tiles are cast to fp32 before ``tl.dot``
(the interpreter's bf16 arithmetic is wrong), and tiles are large so that few programs run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from ..backend import register_impl, triton_interpreted

_TL_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _sequence_xtx(
    acc,
    x_seq,
    m_seq,
    l_lo,
    l_hi,
    offs_m,
    offs_n,
    in_m,
    in_n,
    stride_xl,
    stride_xn,
    stride_ml,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc += X[l_lo:l_hi, cols m]ᵀ · X[l_lo:l_hi, cols n]`` over one sequence's unmasked tokens."""
    offs_k = tl.arange(0, BLOCK_K)
    for l0 in range(l_lo, l_hi, BLOCK_K):
        offs_l = l0 + offs_k
        keep = offs_l < l_hi
        if HAS_MASK:
            # Padding is not even loaded (on both operands), so garbage or NaN there cannot leak in.
            keep = keep & (tl.load(m_seq + offs_l * stride_ml, mask=keep, other=0) != 0)
        rows = x_seq + offs_l[:, None].to(tl.int64) * stride_xl
        a = tl.load(rows + offs_m[None, :] * stride_xn, mask=keep[:, None] & in_m[None, :], other=0.0)
        bt = tl.load(rows + offs_n[None, :] * stride_xn, mask=keep[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tl.trans(a), bt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _covariance_kernel(
    c_ptr,  # *fp32, C (K, n, n) (stride_ck = 0 when there is one buffer)
    x_ptr,  # *bf16/fp16/fp32, x (B, L, n)
    m_ptr,  # *u8, mask (B, L) (dummy when HAS_MASK is False)
    s_ptr,  # *fp32, seq_scale (B,) (dummy when HAS_SCALE is False)
    k_ptr,  # *i64, seq_bucket (B,) (dummy when HAS_BUCKET is False)
    n,
    L,
    stride_ck,
    stride_cm,
    stride_cn,
    stride_xb,
    stride_xl,
    stride_xn,
    stride_mb,
    stride_ml,
    n_tiles,  # tiles per side: cdiv(n, BLOCK)
    n_units,  # work units: B * l_split
    l_split,  # token chunks per sequence
    chunk_l,  # tokens per chunk (a multiple of BLOCK_K)
    TRIANGLE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BUCKET: tl.constexpr,
    ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    kbuf = tl.program_id(1)
    sid = tl.program_id(2)
    nsplit = tl.num_programs(2)
    if TRIANGLE:
        # pid enumerates the pairs i <= j column by column: pid = j(j+1)/2 + i.
        j = ((tl.sqrt(pid.to(tl.float32) * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
        j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
        i = pid - j * (j + 1) // 2
    else:
        i = pid // n_tiles
        j = pid % n_tiles
    offs_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_n = j * BLOCK + tl.arange(0, BLOCK)
    in_m = offs_m < n
    in_n = offs_n < n

    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    u_lo = sid * n_units // nsplit
    u_hi = (sid + 1) * n_units // nsplit
    for u in range(u_lo, u_hi):
        b = u // l_split
        l_lo = (u % l_split) * chunk_l
        l_hi = tl.minimum(l_lo + chunk_l, L)
        if HAS_BUCKET:
            # A sequence of another buffer: an empty token range.
            l_hi = tl.where(tl.load(k_ptr + b) == kbuf, l_hi, l_lo)
        x_seq = x_ptr + b.to(tl.int64) * stride_xb
        m_seq = m_ptr + b.to(tl.int64) * stride_mb
        if HAS_SCALE:
            # The scale multiplies this sequence's fp32 partial product (a second accumulator,
            # only in this variant), so 16-bit operands stay exact.
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            part = _sequence_xtx(part, x_seq, m_seq, l_lo, l_hi, offs_m, offs_n, in_m, in_n, stride_xl, stride_xn,
                                 stride_ml, HAS_MASK, UPCAST, INPUT_PRECISION, BLOCK_K)  # fmt: skip
            acc += part * tl.load(s_ptr + b)
        else:
            acc = _sequence_xtx(acc, x_seq, m_seq, l_lo, l_hi, offs_m, offs_n, in_m, in_n, stride_xl, stride_xn,
                                stride_ml, HAS_MASK, UPCAST, INPUT_PRECISION, BLOCK_K)  # fmt: skip

    c_tile = c_ptr + kbuf.to(tl.int64) * stride_ck + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    cmask = in_m[:, None] & in_n[None, :]
    if TRIANGLE:
        cmask = cmask & (offs_m[:, None] <= offs_n[None, :])
    if ATOMIC:
        tl.atomic_add(c_tile, acc, mask=cmask)
    else:
        cur = tl.load(c_tile, mask=cmask, other=0.0)
        tl.store(c_tile, cur + acc, mask=cmask)


def default_config(n: int, dtype: torch.dtype, interpreted: bool) -> dict[str, int]:
    """Tile sizes for ``n`` features of ``dtype``: big tiles under the interpreter (few programs)."""
    if interpreted:
        block = min(128, max(16, triton.next_power_of_2(n)))
        return {"block": block, "block_k": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"block": 64, "block_k": 32, "num_warps": 4, "num_stages": 3}
    return {"block": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def covariance_update_triton(
    C: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    seq_scale: torch.Tensor | None,
    seq_bucket: torch.Tensor | None,
    upper_only: bool,
    *,
    block: int | None = None,
    block_k: int | None = None,
    split: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    input_precision: str = "ieee",
) -> None:
    """Launch the covariance kernel; arguments as the op (``C`` updated in place).

    The keyword-only arguments override the tile configuration (tests and benchmarks):
    ``block`` (square output tile, power of two ≥ 16), ``block_k`` (tokens per step),
    ``split`` (programs sharing one tile's tokens, > 1 uses atomics), ``input_precision``
    (``"ieee"`` exact fp32, or ``"tf32"`` for fp32 inputs on the GPU).
    """
    if x.dim() != 3:
        raise ValueError(f"covariance_update (triton): x must be (B, L, n), got {tuple(x.shape)}")
    if x.dtype not in _TL_TYPES:
        raise TypeError(f"covariance_update (triton): x must be fp32/bf16/fp16, got {x.dtype}")
    if C.dtype != torch.float32:
        raise TypeError(f"covariance_update (triton): C must be float32, got {C.dtype}")
    if C.device != x.device:
        raise ValueError(f"covariance_update (triton): C is on {C.device}, x on {x.device}")
    B, L, n = x.shape
    if B == 0 or L == 0 or n == 0:
        return
    interpreted = triton_interpreted()
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(
            f"covariance_update (triton): input_precision must be 'ieee' or 'tf32', not {input_precision!r}"
        )
    cfg = default_config(n, x.dtype, interpreted)
    block = block or cfg["block"]
    block_k = block_k or cfg["block_k"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]

    C3 = C if C.dim() == 3 else C.unsqueeze(0)
    K = C3.shape[0]
    stride_ck = C3.stride(0) if K > 1 else 0
    if seq_bucket is None and K != 1:
        raise ValueError("covariance_update (triton): several buffers need seq_bucket")
    n_tiles = triton.cdiv(n, block)
    tiles = n_tiles * (n_tiles + 1) // 2 if upper_only else n_tiles * n_tiles
    if split is None:
        # Fill the GPU when there are few output tiles (small n); one program per tile otherwise.
        want = 2 * _sm_count(x.device)
        split = 1 if interpreted else max(1, min(B * triton.cdiv(L, block_k), want // max(1, tiles * K)))
    l_split = max(1, min(triton.cdiv(L, block_k), triton.cdiv(split, B)))
    chunk_l = triton.cdiv(triton.cdiv(L, l_split), block_k) * block_k
    l_split = triton.cdiv(L, chunk_l)
    n_units = B * l_split
    split = max(1, min(split, n_units))

    dummy = C3
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
            raise ValueError("covariance_update (triton): mask must be bool (B, L)")
        m = mask.view(torch.uint8)
        stride_mb, stride_ml = m.stride()
    else:
        m, stride_mb, stride_ml = dummy, 0, 0
    s = seq_scale.to(torch.float32).contiguous() if seq_scale is not None else dummy
    k = seq_bucket.to(torch.int64).contiguous() if seq_bucket is not None else dummy
    grid = (tiles, K, split)
    with _on_device(x.device):
        _covariance_kernel[grid](
            C3,
            x,
            m,
            s,
            k,
            n,
            L,
            stride_ck,
            C3.stride(1),
            C3.stride(2),
            x.stride(0),
            x.stride(1),
            x.stride(2),
            stride_mb,
            stride_ml,
            n_tiles,
            n_units,
            l_split,
            chunk_l,
            TRIANGLE=upper_only,
            HAS_MASK=mask is not None,
            HAS_SCALE=seq_scale is not None,
            HAS_BUCKET=seq_bucket is not None,
            ATOMIC=split > 1,
            UPCAST=interpreted and x.dtype != torch.float32,
            INPUT_PRECISION=input_precision,
            BLOCK=block,
            BLOCK_K=block_k,
            num_warps=num_warps,
            num_stages=num_stages,
        )


@register_impl("covariance_update", "triton")
def _covariance_update_triton(
    C: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    seq_scale: torch.Tensor | None,
    seq_bucket: torch.Tensor | None,
    upper_only: bool,
) -> None:
    covariance_update_triton(C, x, mask, seq_scale, seq_bucket, upper_only)


def compile_specs() -> list[dict[str, Any]]:
    """Kernels and signatures for the Hopper / Ampere compile check (fp32 / bf16 / fp16 inputs).

    Each entry: ``fn`` (the ``@triton.jit`` function), ``signature`` (argument → Triton type
    string), ``constexprs`` (argument → value), ``name``, ``num_warps``, ``num_stages``,
    ``attrs`` (argument → Triton attributes, e.g. ``[["tt.divisibility", 16]]``) and
    ``ptx_contains`` (capability → instructions the PTX must contain).

    Most variants are specialized as a launch on contiguous tensors with n a multiple of 16
    specializes them (stride 1 → constant, 16-byte aligned pointers, multiples of 16 marked):
    that is what turns the loads into pipelined ``cp.async`` copies and, for 16-bit inputs, the
    dot into ``wgmma`` on sm_90 (both required below). ``generic`` variants keep every
    integer a runtime value (odd n, strided x).
    """
    ints = [
        "n", "L", "stride_ck", "stride_cm", "stride_cn", "stride_xb", "stride_xl", "stride_xn",
        "stride_mb", "stride_ml", "n_tiles", "n_units", "l_split", "chunk_l",
    ]  # fmt: skip
    unit_strides = ("stride_cn", "stride_xn", "stride_ml")
    aligned = ("c_ptr", "x_ptr", "m_ptr", "s_ptr", "k_ptr", "n", "L", "stride_ck", "stride_cm", "stride_xb",
               "stride_xl", "stride_mb", "chunk_l")  # fmt: skip
    specs: list[dict[str, Any]] = []
    variants = [
        # (dtype, triangle, mask, scale, bucket, atomic, precision, runtime-specialized)
        (torch.bfloat16, True, False, False, False, False, "ieee", True),
        (torch.bfloat16, True, True, True, False, False, "ieee", True),  # the collector's call
        (torch.bfloat16, True, True, True, True, True, "ieee", False),
        (torch.float16, True, True, False, False, False, "ieee", True),
        (torch.float32, True, True, True, True, False, "ieee", True),
        (torch.float32, False, False, False, False, True, "ieee", False),
        (torch.float32, True, False, False, False, False, "tf32", True),
    ]
    for dtype, tri, has_mask, has_scale, has_bucket, atomic, prec, special in variants:
        cfg = default_config(4096, dtype, interpreted=False)
        sig = {"c_ptr": "*fp32", "x_ptr": f"*{_TL_TYPES[dtype]}", "m_ptr": "*u8", "s_ptr": "*fp32", "k_ptr": "*i64"}
        sig.update({name: "i32" for name in ints})
        constexprs: dict[str, Any] = {
            "TRIANGLE": tri,
            "HAS_MASK": has_mask,
            "HAS_SCALE": has_scale,
            "HAS_BUCKET": has_bucket,
            "ATOMIC": atomic,
            "UPCAST": False,
            "INPUT_PRECISION": prec,
            "BLOCK": cfg["block"],
            "BLOCK_K": cfg["block_k"],
        }
        attrs: dict[str, list[list[Any]]] = {}
        if special:
            constexprs.update({name: 1 for name in unit_strides})
            attrs = {name: [["tt.divisibility", 16]] for name in aligned}
        sig.update({name: "constexpr" for name in constexprs})
        on = (("T", tri), ("M", has_mask), ("S", has_scale), ("K", has_bucket), ("A", atomic))
        flags = "".join(f for f, flag in on if flag)
        need: dict[int, list[str]] = {}
        if dtype != torch.float32:
            # 16-bit inputs must reach the tensor cores: wgmma on Hopper, mma.sync on Ampere.
            need = {90: ["wgmma.mma_async"], 80: ["mma.sync"]}
        if special:
            for cap in (90, 80):
                need.setdefault(cap, []).append("cp.async")
        specs.append(
            {
                "fn": _covariance_kernel,
                "signature": sig,
                "constexprs": constexprs,
                "attrs": attrs,
                "name": f"covariance_{_TL_TYPES[dtype]}_{flags}_{prec}_{'launch' if special else 'generic'}",
                "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"],
                "ptx_contains": need,
            }
        )
    return specs
