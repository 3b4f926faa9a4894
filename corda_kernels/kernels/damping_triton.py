"""Triton support for CorDA's damped-inverse search (the ``triton`` backend of ``damped_inverse``).

The rule is the torch backend's, step for step (docs/design.md §2, :mod:`corda_kernels.ops.damping`):
``C_fix = C + damp·mean(diag C)·I`` in float32, ``C_inv = inv(C_fix)``, accept when
``‖C_fix·C_inv − I‖_F < threshold``, else ``damp *= 2``; batched over the matrices still
searching. Two kernels take the memory traffic out of each step:

- :func:`shifted_copy`: ``C_fix[b] = C[idx[b]] + shift[b]·I`` in one pass (gather of the
  matrices still searching, copy and diagonal shift fused; no identity, no ``shift·I``
  temporary). ``shift`` is computed exactly as the torch path computes it, so ``C_fix`` is
  bit-identical to the torch backend's and so is ``C_inv`` (the same ``torch.linalg.inv_ex``).
- :func:`residual_norm`: ``‖A[b]·B[b] − I‖_F`` tile by tile: each program forms one tile of
  the product in registers (fp32, ``input_precision="ieee"`` as the torch check, which runs
  with TF32 off), subtracts the identity and writes its sum of squares; the ``n×n`` product,
  the ``− I`` temporary and the norm pass never touch memory.

The chosen damp therefore equals the torch rule's except where ``‖C_fix·C_inv − I‖_F`` lies
within float32 rounding of the threshold (a different summation order of the same product).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..backend import register_impl, triton_interpreted
from ..ops.damping import diag_means, search_damp
from .covariance_triton import _on_device


@triton.jit
def _shift_kernel(
    c_ptr,  # *fp32, C (B0, n, n)
    idx_ptr,  # *i64, (B,) which matrix of C each output takes
    shift_ptr,  # *fp32, (B,) diagonal shift per output
    out_ptr,  # *fp32, (B, n, n) contiguous
    n,
    stride_cb,
    stride_cm,
    stride_cn,
    n_tiles,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    i = pid // n_tiles
    j = pid % n_tiles
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    src = tl.load(idx_ptr + b)
    shift = tl.load(shift_ptr + b)
    c = tl.load(c_ptr + src * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=inside)
    c = c + tl.where(rows[:, None] == cols[None, :], shift, 0.0)
    tl.store(out_ptr + b.to(tl.int64) * n * n + rows[:, None] * n + cols[None, :], c, mask=inside)


@triton.jit
def _residual_kernel(
    a_ptr,  # *fp32, A (B, n, n)
    b_ptr,  # *fp32, B (B, n, n)
    out_ptr,  # *fp32, (B, tiles) sums of squares of (A·B − I) per tile
    n,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    n_tiles,
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    i = pid // n_tiles
    j = pid % n_tiles
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + bat * stride_ab + rows[:, None] * stride_am
    b_base = b_ptr + bat * stride_bb + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_base + ks[None, :] * stride_ak, mask=(rows[:, None] < n) & (ks[None, :] < n), other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk, mask=(ks[:, None] < n) & (cols[None, :] < n), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    r = acc - tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    r = tl.where(inside, r, 0.0)
    tl.store(out_ptr + bat * tl.num_programs(0) + pid, tl.sum(tl.sum(r * r, axis=1), axis=0))


def _residual_config(n: int, interpreted: bool) -> dict[str, int]:
    if interpreted:
        block = min(128, max(16, triton.next_power_of_2(n)))
        return {"block": block, "block_k": block, "num_warps": 4, "num_stages": 1}
    return {"block": 64, "block_k": 32, "num_warps": 4, "num_stages": 3}


def _shift_block(interpreted: bool) -> int:
    return 128 if interpreted else 64


def shifted_copy(C: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b] = C[idx[b]] + shift[b]·I``: ``C`` ``(B0, n, n)`` fp32, ``idx`` ``(B,)`` int64,
    ``shift`` ``(B,)`` fp32 (all on ``C``'s device) → contiguous ``(B, n, n)`` fp32."""
    _, n, _ = C.shape
    B = idx.numel()
    out = torch.empty(B, n, n, dtype=C.dtype, device=C.device)
    if B == 0 or n == 0:
        return out
    block = _shift_block(triton_interpreted())
    n_tiles = triton.cdiv(n, block)
    with _on_device(C.device):
        _shift_kernel[(n_tiles * n_tiles, B)](
            C, idx.to(torch.int64).contiguous(), shift.to(torch.float32).contiguous(), out, n,
            C.stride(0), C.stride(1), C.stride(2), n_tiles, BLOCK=block,
        )  # fmt: skip
    return out


def residual_norm(
    A: torch.Tensor,
    Binv: torch.Tensor,
    *,
    block: int | None = None,
    input_precision: str = "ieee",
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``‖A[b]·Binv[b] − I‖_F`` for fp32 ``A``, ``Binv`` ``(B, n, n)`` → fp32 ``(B,)`` on their device.

    The product is formed tile by tile in registers (exact fp32 ``ieee`` dots, the rule's
    arithmetic; ``"tf32x3"`` is an opt-in for GPU experiments, never used by the search);
    only one float per tile goes to memory. ``block`` overrides the tile size (tests);
    ``config`` overrides any of ``block``, ``block_k``, ``num_warps``, ``num_stages`` (benchmarks).
    """
    if A.shape != Binv.shape or A.dim() != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"residual_norm: need two (B, n, n) tensors, got {tuple(A.shape)} and {tuple(Binv.shape)}")
    B, n, _ = A.shape
    cfg = _residual_config(n, triton_interpreted())
    if block is not None and block != cfg["block"]:
        cfg.update(block=block, block_k=min(cfg["block_k"], block))
    cfg.update(config or {})
    block, block_k = cfg["block"], cfg["block_k"]
    n_tiles = triton.cdiv(n, block)
    part = torch.empty(B, n_tiles * n_tiles, dtype=torch.float32, device=A.device)
    if B == 0:
        return part.sum(1)
    with _on_device(A.device):
        _residual_kernel[(n_tiles * n_tiles, B)](
            A, Binv, part, n,
            A.stride(0), A.stride(1), A.stride(2), Binv.stride(0), Binv.stride(1), Binv.stride(2),
            n_tiles, INPUT_PRECISION=input_precision, BLOCK=block, BLOCK_K=block_k,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return part.sum(1).sqrt()


# Precision of the fused check's dot. "ieee" (default) is exact fp32 like the torch rule's check;
# "tf32x3" (three TF32 tensor-core passes, close to fp32) is a GPU experiment the suite measures
# (bench/gpu_damping.py) before anyone considers it: it may flip a decision within rounding of
# the threshold, as any different summation order may.
CHECK_INPUT_PRECISION = "ieee"


@register_impl("damped_inverse", "triton")
def _damped_inverse_triton(
    C: torch.Tensor, damp: float, threshold: float, max_steps: int, probes: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch backend's search with the fused shift and the fused residual check.

    ``C`` ``(B, n, n)`` fp32 → ``(C_fix, C_inv, damps, checked)`` as the torch backend returns them
    (the screen, when ``probes > 0``, is the torch backend's; its literal checks use the fused kernel).
    """
    if C.dtype != torch.float32:
        # The kernels are float32; other precisions keep the torch path's arithmetic.
        from ..ops.damping import _damped_inverse_torch

        return _damped_inverse_torch(C, damp, threshold, max_steps, probes, inverse)
    # The same reduction as fix_covariance's (diagonal of each matrix, mean in fp32).
    diag_mean = diag_means(C)

    def shifted(idx: torch.Tensor, damps: torch.Tensor) -> torch.Tensor:
        return shifted_copy(C, idx, diag_mean[idx] * damps.to(device=C.device, dtype=C.dtype))

    return search_damp(
        C,
        damp,
        threshold,
        max_steps,
        shifted=shifted,
        residual=lambda fixed, inv: residual_norm(fixed, inv, input_precision=CHECK_INPUT_PRECISION),
        probes=probes,
        inverse=inverse,
    )


def compile_specs() -> list[dict[str, Any]]:
    """The shift and residual kernels with their GPU configurations, for the compile check.

    Specialized as a launch on contiguous ``(B, n, n)`` tensors with n a multiple of 16
    (unit strides constant, aligned pointers and strides), which must give pipelined
    ``cp.async`` loads; the residual check is also compiled with runtime strides (odd n).
    """
    cfg = _residual_config(4096, interpreted=False)
    ints = ("n", "stride_ab", "stride_am", "stride_ak", "stride_bb", "stride_bk", "stride_bn", "n_tiles")
    specs: list[dict[str, Any]] = []
    for prec, special in (("ieee", True), ("ieee", False), ("tf32x3", True)):
        sig: dict[str, str] = {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32"}
        sig.update({k: "i32" for k in ints})
        const: dict[str, Any] = {"INPUT_PRECISION": prec, "BLOCK": cfg["block"], "BLOCK_K": cfg["block_k"]}
        attrs: dict[str, list[list[Any]]] = {}
        if special:
            const.update({"stride_ak": 1, "stride_bn": 1})
            aligned = ("a_ptr", "b_ptr", "out_ptr", "n", "stride_ab", "stride_am", "stride_bb", "stride_bk")
            attrs = {k: [["tt.divisibility", 16]] for k in aligned}
        sig.update({k: "constexpr" for k in const})
        specs.append(
            {
                "fn": _residual_kernel,
                "signature": sig,
                "constexprs": const,
                "attrs": attrs,
                "name": f"damping_residual_fp32_{prec}_{'launch' if special else 'generic'}",
                "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"],
                "ptx_contains": {90: ["cp.async"], 80: ["cp.async"]} if special else {},
            }
        )
    shift_sig = {"c_ptr": "*fp32", "idx_ptr": "*i64", "shift_ptr": "*fp32", "out_ptr": "*fp32"}
    shift_sig.update({k: "i32" for k in ("n", "stride_cb", "stride_cm", "stride_cn", "n_tiles")})
    shift_sig["BLOCK"] = "constexpr"
    specs.append(
        {
            "fn": _shift_kernel,
            "signature": shift_sig,
            "constexprs": {"BLOCK": _shift_block(False)},
            "name": "damping_shift_fp32",
            "num_warps": 4,
            "num_stages": 1,
        }
    )
    return specs
