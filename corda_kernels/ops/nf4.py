"""NF4 quantize / pack / dequantize, byte-exact with bitsandbytes (docs/design.md §6), and the fused residual.

Format. The flattened tensor is cut into blocks of ``blocksize`` consecutive elements (a partial
last block is its own block); ``absmax`` per block in fp32. Each value is scaled by the block's
reciprocal ``1/absmax`` and mapped to the NF4 code whose interval (bounded by the fp32 midpoints
between neighbouring codes) holds it; a value exactly on a midpoint goes to the lower code.
Element ``2j`` goes in the high nibble and ``2j+1`` in the low nibble of byte ``j``; the packed
result is ``uint8`` of shape ``((numel+1)//2, 1)``, an odd count padded with a zero value.

Double quantization (``compress_statistics=True``): ``offset = absmax.mean()``, then
``absmax − offset`` is quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic
map (uint8 codes + an fp32 absmax per 256 values, in a nested ``QuantState``).

bitsandbytes itself does not compute the same bytes on every device, so the arithmetic we
reproduce follows the tensor's device (``bnb_cuda`` below), as bitsandbytes' dispatch does:

* CPU (bitsandbytes' pure-torch 4-bit path and its native CPU 8-bit kernel): full blocks are
  scaled by ``1/max(absmax, 1e-38)``, the partial last block is *divided* by
  ``max(absmax, 1e-38)`` and stores that clamped absmax; an all-zero block gives code 7.
  The 8-bit nested codes come from a 65536-entry lookup table over ``[-1, 1]``
  (index ``⌊(v+1)·0.5·65535 + 0.5⌋``, each entry the code nearest to the bin's left edge),
  which is not always the nearest code.
* CUDA (bitsandbytes' CUDA kernels): every block, partial or not, is scaled by ``1/absmax``
  and stores the raw absmax; an all-zero block yields NaN scaled values and so code 0
  (dequantizing to 0 all the same). The 8-bit nested codes come from a 7-step binary search over
  the dynamic map with bitsandbytes' tie rules. bitsandbytes builds its CUDA kernels with
  ``--use_fast_math``, so its ``1/absmax`` is the approximate ``rcp.approx.ftz``; the Triton kernel
  uses that instruction on the GPU, the pure-torch path an IEEE reciprocal (a value within an ulp
  of a code boundary can then land in the neighbouring code: about one element in a million).
"""

from __future__ import annotations

import math

import torch

from ..backend import define_op, register_impl

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The 16 NF4 levels (docs/design.md §6), exactly representable in fp32.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _cached(key: str, device: torch.device, build) -> torch.Tensor:  # noqa: ANN001
    k = (key, str(device))
    if k not in _CACHE:
        _CACHE[k] = build().to(device)
    return _CACHE[k]


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, fp32 ``(16,)``, ascending."""
    return _cached("nf4", torch.device(device), lambda: torch.tensor(NF4_LEVELS, dtype=torch.float32))


def nf4_bounds(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 fp32 midpoints between neighbouring NF4 levels, ``(15,)`` ascending."""

    def build() -> torch.Tensor:
        c = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        return (c[:-1] + c[1:]) * 0.5

    return _cached("nf4_bounds", torch.device(device), build)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, fp32 ``(256,)`` ascending.

    For exponent ``e = 0..6``, ``2**e`` linear fractions: the midpoints of ``linspace(0.1, 1,
    2**e + 1)`` scaled by ``10**(e-6)``, both signs; plus 0 and 1 (256 values in all).
    """

    def build() -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for e in range(7):
            edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
            mids = (edges[:-1] + edges[1:]) / 2.0
            scaled = (10 ** (e - 6)) * mids
            parts += [scaled, -scaled]
        values = torch.cat([*parts, torch.tensor([0.0, 1.0])])
        # The table is built in float64 by bitsandbytes' Python lists and stored as fp32.
        return torch.tensor(sorted(values.tolist()), dtype=torch.float32)

    return _cached("dynamic", torch.device(device), build)


def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: code index (int64 ``(65536,)``) per bin of ``[-1, 1]``."""

    def build() -> torch.Tensor:
        code = dynamic_map("cpu")
        mids = 0.5 * (code[:-1] + code[1:])
        i = torch.arange(65536, dtype=torch.float32)
        left = -1.0 + (2.0 * i) / 65535.0
        return torch.searchsorted(mids, left, right=False)

    return _cached("dynamic_lut", device, build)


# ------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------


def _nblocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _fake_quant(A, blocksize, bnb_cuda):  # noqa: ANN001, ANN202
    n = A.numel()
    return A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), A.new_empty(_nblocks(n, blocksize), dtype=torch.float32)


define_op("nf4_quantize", "(Tensor A, int blocksize, bool bnb_cuda) -> (Tensor, Tensor)", _fake_quant)


def _fake_dequant(packed, absmax, blocksize, numel, dtype):  # noqa: ANN001, ANN202
    return packed.new_empty(numel, dtype=dtype)


define_op(
    "nf4_dequantize",
    "(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype) -> Tensor",
    _fake_dequant,
)


def _fake_q8(A, blocksize, bnb_cuda):  # noqa: ANN001, ANN202
    return A.new_empty(A.numel(), dtype=torch.uint8), A.new_empty(_nblocks(A.numel(), blocksize), dtype=torch.float32)


define_op("blockwise8_quantize", "(Tensor A, int blocksize, bool bnb_cuda) -> (Tensor, Tensor)", _fake_q8)


def _fake_dq8(codes, absmax, blocksize):  # noqa: ANN001, ANN202
    return codes.new_empty(codes.numel(), dtype=torch.float32)


define_op("blockwise8_dequantize", "(Tensor codes, Tensor absmax, int blocksize) -> Tensor", _fake_dq8)


def _fake_res(W, B, A, scaling, blocksize, bnb_cuda):  # noqa: ANN001, ANN202
    return _fake_quant(W, blocksize, bnb_cuda)


define_op(
    "nf4_quantize_residual",
    "(Tensor W, Tensor B, Tensor A, float scaling, int blocksize, bool bnb_cuda) -> (Tensor, Tensor)",
    _fake_res,
)


# ------------------------------------------------------------------------------------------
# torch implementations
# ------------------------------------------------------------------------------------------


def _scale_blocks(x: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``x`` ``(n,)`` → (scaled values ``(n,)``, absmax ``(nblocks,)``) with bnb's arithmetic."""
    n = x.numel()
    full = n - n % blocksize
    parts: list[torch.Tensor] = []
    absmaxes: list[torch.Tensor] = []
    if full:
        blocks = x[:full].view(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        recip = 1.0 / (am if bnb_cuda else am.clamp(min=1e-38))
        parts.append((blocks * recip.unsqueeze(1)).reshape(-1))
        absmaxes.append(am)
    if full < n:
        tail = x[full:]
        am = tail.abs().amax().reshape(1)
        if bnb_cuda:
            parts.append(tail * (1.0 / am))
        else:
            am = am.clamp(min=1e-38)
            parts.append(tail / am)
        absmaxes.append(am)
    scaled = parts[0] if len(parts) == 1 else torch.cat(parts)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return scaled, absmax


def _nf4_codes(scaled: torch.Tensor, may_be_nan: bool = False) -> torch.Tensor:
    """int32 NF4 code per value: the number of midpoints strictly below it (ties → lower code).

    NaN (an all-zero block under CUDA arithmetic) compares false everywhere: code 0, as in CUDA.
    """
    q = torch.bucketize(scaled, nf4_bounds(scaled.device), right=False, out_int32=True)
    if may_be_nan:
        q = torch.where(torch.isnan(scaled), torch.zeros_like(q), q)
    return q


def _pack(q: torch.Tensor) -> torch.Tensor:
    """int codes ``(n,)`` (0..15) → packed uint8 ``((n+1)//2, 1)``, high nibble first, pad code 7."""
    q8 = q.to(torch.uint8)
    if q8.numel() % 2:
        q8 = torch.cat([q8, q8.new_full((1,), 7)])
    pairs = q8.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)


@register_impl("nf4_quantize", "torch")
def _nf4_quantize_torch(A: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = A.reshape(-1).float()
    scaled, absmax = _scale_blocks(x, blocksize, bnb_cuda)
    # only CUDA arithmetic turns an all-zero block into NaNs (0·(1/0)); finite input otherwise
    zero_block = bnb_cuda and bool((absmax == 0).any())
    q = _nf4_codes(scaled, zero_block)
    if bnb_cuda and x.numel() % 2:
        # CUDA loads the pad element as 0 and scales it by the last block's 1/absmax.
        pad = x.new_zeros(1) * (1.0 / absmax[-1:])
        q = torch.cat([q, _nf4_codes(pad, True)])
    return _pack(q), absmax


def _pair_table(device: torch.device) -> torch.Tensor:
    """fp32 ``(256, 2)``: byte → (level of its high nibble, level of its low nibble)."""

    def build() -> torch.Tensor:
        code = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()

    return _cached("nf4_pairs", device, build)


@register_impl("nf4_dequantize", "torch")
def _nf4_dequantize_torch(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    p = packed.reshape(-1)
    vals = _pair_table(p.device).index_select(0, p.int()).view(-1)[:numel]
    absmax = absmax.float()
    full = numel - numel % blocksize
    out = torch.empty(numel, dtype=torch.float32, device=p.device)
    if full:
        torch.mul(
            vals[:full].view(-1, blocksize),
            absmax[: full // blocksize].unsqueeze(1),
            out=out[:full].view(-1, blocksize),
        )
    if full < numel:
        torch.mul(vals[full:], absmax[-1], out=out[full:])
    return out.to(dtype)


def _binary_search_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA ``dQuantize<0>``: 7-step binary search over the 256-entry ``code``."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_p = torch.full_like(pivot, 255)
    lower_p = torch.zeros_like(pivot)
    upper = torch.ones_like(x)
    lower = -torch.ones_like(x)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_p = torch.where(right, pivot, lower_p)
        lower = torch.where(right, val, lower)
        upper_p = torch.where(right, upper_p, pivot)
        upper = torch.where(right, upper, val)
        pivot = pivot + torch.where(right, step, -step)
        val = code[pivot]
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    right = x > val
    up_mid = (upper + val) * 0.5
    lo_mid = (lower + val) * 0.5
    out = torch.where(right, torch.where(x > up_mid, upper_p, pivot), torch.where(x < lo_mid, lower_p, pivot))
    return out


@register_impl("blockwise8_quantize", "torch")
def _blockwise8_quantize_torch(A: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = A.reshape(-1).float()
    n = x.numel()
    nb = _nblocks(n, blocksize)
    padded = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    recip = (1.0 / absmax).unsqueeze(1)
    scaled = (padded * recip).reshape(-1)[:n]
    if bnb_cuda:
        q = _binary_search_codes(scaled, dynamic_map(x.device))
    else:
        # An all-zero block stores code 0 (bitsandbytes skips it); its NaNs never reach the table.
        zero = (absmax == 0).repeat_interleave(blocksize)[:n]
        v = torch.where(zero, torch.zeros_like(scaled), scaled).clamp(-1.0, 1.0)
        idx = ((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
        q = torch.where(zero, torch.zeros_like(idx), _dynamic_lut(x.device)[idx])
    return q.to(torch.uint8), absmax


@register_impl("blockwise8_dequantize", "torch")
def _blockwise8_dequantize_torch(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = codes.numel()
    vals = dynamic_map(codes.device)[codes.reshape(-1).long()]
    return vals * absmax.float().repeat_interleave(blocksize)[:n]


def residual(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(W − scaling·B·A)`` computed in fp32 and returned in ``W``'s dtype (docs/design.md §4).

    The same expression as :func:`corda_kernels.engine.adapters.build_adapter`'s ``W_res``
    (``(W.float() − s·(B @ A)).to(W.dtype)``), so quantizing either gives the same bytes.
    """
    return (W.float() - scaling * (B.float() @ A.float())).to(W.dtype)


@register_impl("nf4_quantize_residual", "torch")
def _nf4_quantize_residual_torch(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, blocksize: int, bnb_cuda: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _nf4_quantize_torch(residual(W, B, A, scaling), blocksize, bnb_cuda)


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------


def _check_input(W: torch.Tensor, blocksize: int, where: str) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(W).__name__}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: NF4 quantization needs a float32, float16 or bfloat16 tensor, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{where}: cannot quantize an empty tensor (shape {tuple(W.shape)})")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{where}: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")


def _quant_state(absmax: torch.Tensor, W: torch.Tensor, shape: torch.Size, blocksize: int, compress: bool):  # noqa: ANN202
    from bitsandbytes.functional import QuantState

    code = nf4_code(absmax.device).clone()
    if not compress:
        return QuantState(absmax=absmax, shape=shape, code=code, blocksize=blocksize, quant_type="nf4", dtype=W.dtype)
    offset = absmax.mean()
    codes, absmax2 = torch.ops.corda_kernels.blockwise8_quantize(
        absmax - offset, NESTED_BLOCKSIZE, absmax.device.type == "cuda"
    )
    state2 = QuantState(
        absmax=absmax2, code=dynamic_map(absmax.device).clone(), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
    )
    return QuantState(
        absmax=codes,
        shape=shape,
        code=code,
        blocksize=blocksize,
        quant_type="nf4",
        dtype=W.dtype,
        offset=offset,
        state2=state2,
    )


def nf4_quantize(W: torch.Tensor, *, blocksize: int = 64, compress_statistics: bool = False):  # noqa: ANN201
    """Quantize ``W`` (any shape, fp32/fp16/bf16) to NF4, byte-exact with bitsandbytes.

    Returns ``(packed, quant_state)``: ``packed`` uint8 ``((numel+1)//2, 1)`` and a
    ``bitsandbytes.functional.QuantState`` (absmax fp32 ``(ceil(numel/blocksize),)``, or with
    ``compress_statistics`` uint8 codes plus ``offset`` and a nested ``state2``), as
    ``bitsandbytes.functional.quantize_4bit(W, blocksize=..., quant_type="nf4", ...)`` returns them.
    """
    _check_input(W, blocksize, "nf4_quantize")
    packed, absmax = torch.ops.corda_kernels.nf4_quantize(W.reshape(-1), blocksize, W.device.type == "cuda")
    return packed, _quant_state(absmax, W, W.shape, blocksize, compress_statistics)


def state_absmax(quant_state) -> torch.Tensor:  # noqa: ANN001
    """The fp32 per-block absmax of a ``QuantState`` (dequantizing nested statistics)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    dq = torch.ops.corda_kernels.blockwise8_dequantize(quant_state.absmax, s2.absmax, s2.blocksize)
    return dq + quant_state.offset.float()


def nf4_dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:  # noqa: ANN001
    """Dequantize NF4 ``packed`` (uint8 ``((numel+1)//2, 1)``) to ``quant_state.shape`` / ``.dtype``.

    Same values as ``bitsandbytes.functional.dequantize_4bit``: ``level · absmax`` in fp32, then
    cast to the state's dtype.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"nf4_dequantize: packed must be uint8, got {packed.dtype}")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"nf4_dequantize: quant_state holds {quant_state.quant_type!r}, not 'nf4'")
    shape = torch.Size(quant_state.shape)
    numel = math.prod(shape)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"nf4_dequantize: {packed.numel()} packed bytes do not hold {numel} values of shape {tuple(shape)}"
        )
    absmax = state_absmax(quant_state)
    out = torch.ops.corda_kernels.nf4_dequantize(packed, absmax, quant_state.blocksize, numel, quant_state.dtype)
    return out.reshape(shape)


def nf4_quantize_residual(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scaling: float,
    *,
    blocksize: int = 64,
    compress_statistics: bool = False,
):  # noqa: ANN201
    """NF4 of the frozen residual ``W − scaling·B·A`` (QCorDA), fused where the backend can.

    ``W`` ``(m, n)`` fp32/fp16/bf16, ``B`` ``(m, r)``, ``A`` ``(r, n)`` (any float dtype). The
    residual is formed in fp32 and rounded to ``W``'s dtype before quantization, exactly as
    ``nf4_quantize(residual(W, B, A, scaling))``; the Triton kernel does it tile by tile
    without materializing it. Returns ``(packed, quant_state)`` with shape/dtype of ``W``.
    """
    _check_input(W, blocksize, "nf4_quantize_residual")
    if W.dim() != 2 or B.dim() != 2 or A.dim() != 2:
        raise ValueError("nf4_quantize_residual: W, B, A must be 2-D")
    m, n = W.shape
    if B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"nf4_quantize_residual: shapes W {tuple(W.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)} do not chain"
        )
    if not (B.dtype.is_floating_point and A.dtype.is_floating_point):
        raise TypeError(f"nf4_quantize_residual: B and A must be floating point, got {B.dtype}, {A.dtype}")
    packed, absmax = torch.ops.corda_kernels.nf4_quantize_residual(
        W, B, A, float(scaling), blocksize, W.device.type == "cuda"
    )
    return packed, _quant_state(absmax, W, W.shape, blocksize, compress_statistics)
