"""Streaming covariance ``C += Σ_t w_t x_t x_tᵀ`` over the activations entering a layer.

Shapes and dtypes: ``C`` is ``(n, n)`` or ``(K, n, n)`` float32 (K candidate buffers, the
CorDA++ rounds); ``x`` is ``(B, L, n)`` in bf16/fp16/fp32, ``B`` sequences of ``L`` tokens.
Optional per-token ``mask`` ``(B, L)`` (bool; False = padding, contributes nothing),
per-sequence ``seq_scale`` ``(B,)`` float32 (PEFT's ``1/max(X_s)²``) and per-sequence
``seq_bucket`` ``(B,)`` int64 (which of the K buffers the sequence goes to).
Accumulation is in float32. With ``upper_only`` only the upper triangle of ``C`` is
updated (about half the arithmetic); :func:`symmetrize_` mirrors it once at the end.
"""

from __future__ import annotations

import torch

from ..backend import define_op, register_impl

# Column blocks for the triangle: computing the upper block-triangle of an nb×nb grid costs
# (nb+1)/(2nb) of the full product. Measured on 2048-token batches (2 cores): 576 features in 3
# blocks 5.7 ms against 7.9 ms for one GEMM, 1536 in 6 blocks 35.7 ms against 58 ms (4: 37.7).
_TRIANGLE_BLOCKS = 6
_MIN_BLOCK = 192


def _fake(C, x, mask, seq_scale, seq_bucket, upper_only):  # noqa: ANN001, ANN202
    return None


define_op(
    "covariance_update",
    "(Tensor(a!) C, Tensor x, Tensor? mask, Tensor? seq_scale, Tensor? seq_bucket, bool upper_only) -> ()",
    _fake,
)


def _accumulate(C: torch.Tensor, xf: torch.Tensor, upper_only: bool, alpha: float = 1.0) -> None:
    """``C (+)= alpha·xfᵀ xf`` for fp32 ``xf`` ``(T, n)``; upper block-triangle only if asked."""
    n = xf.shape[1]
    if not upper_only or n < 2 * _MIN_BLOCK:
        C.addmm_(xf.T, xf, alpha=alpha)
        return
    nb = min(_TRIANGLE_BLOCKS, n // _MIN_BLOCK)
    edges = [round(i * n / nb) for i in range(nb + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        C[lo:hi, lo:].addmm_(xf[:, lo:hi].T, xf[:, lo:], alpha=alpha)


@register_impl("covariance_update", "torch")
def _covariance_update_torch(
    C: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    seq_scale: torch.Tensor | None,
    seq_bucket: torch.Tensor | None,
    upper_only: bool,
) -> None:
    B, L, n = x.shape
    dense = mask is None or bool(mask.all())
    buckets = [None] if seq_bucket is None else torch.unique(seq_bucket).tolist()
    for k in buckets:
        target = C if k is None else C[k]
        xs, keep = x, None if dense else mask.bool()
        if k is not None:
            in_k = seq_bucket == k
            xs, keep = x[in_k], None if keep is None else keep[in_k]
        # One GEMM over all tokens (per-sequence GEMMs run ~6x slower on the CPU); the scale
        # √(seq_scale) rides on the one fp32 copy that the GEMM needs anyway.
        rows = xs.reshape(-1, n) if keep is None else xs[keep]
        if seq_scale is not None:
            scale = seq_scale if k is None else seq_scale[seq_bucket == k]
            per_row = scale.float().sqrt().view(-1, 1).expand(-1, L)
            per_row = per_row.reshape(-1) if keep is None else per_row[keep]
            xf = rows * per_row.unsqueeze(1).to(rows.device)
        else:
            xf = rows.float()
        if xf.shape[0]:
            _accumulate(target, xf, upper_only)


def symmetrize_(C: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle of ``C`` (``(..., n, n)``) onto the lower one, in place.

    By panels of ``_MIRROR_BLOCK`` columns: a whole-matrix transpose walks memory with a stride of
    ``n`` and is cache-hostile (n = 1536: 9.1 ms whole, 1.3 ms by panels; n = 4096: 146 vs 6.3 ms).
    """
    n = C.shape[-1]
    for i in range(0, n, _MIRROR_BLOCK):
        e = min(n, i + _MIRROR_BLOCK)
        d = C[..., i:e, i:e]
        d.copy_(torch.triu(d) + torch.triu(d, 1).transpose(-1, -2))
        if e < n:
            C[..., e:, i:e].copy_(C[..., i:e, e:].transpose(-1, -2))
    return C


_MIRROR_BLOCK = 128


def _as_sequences(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() < 2:
        raise ValueError(f"covariance_update: x must have at least 2 dims (tokens, features), got {tuple(x.shape)}")
    x3 = x.reshape(1, *x.shape) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])
    if mask is None:
        return x3, None
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"covariance_update: mask shape {tuple(mask.shape)} must equal x's leading shape {tuple(x.shape[:-1])}"
        )
    return x3, mask.reshape(x3.shape[:2]).to(device=x.device, dtype=torch.bool)


def covariance_update(
    C: torch.Tensor,
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    seq_scale: torch.Tensor | None = None,
    seq_bucket: torch.Tensor | None = None,
    upper_only: bool = False,
) -> torch.Tensor:
    """Accumulate ``C += Σ_t x_tᵀ x_t`` in place and return ``C``.

    ``x`` is ``(..., L, n)``: every leading index is one sequence of ``L`` tokens (a 2-D ``x``
    is one sequence). ``mask`` has ``x``'s leading shape; ``seq_scale`` / ``seq_bucket`` one
    entry per sequence. Unless ``upper_only``, ``C`` comes back symmetric.
    """
    if C.dtype != torch.float32:
        raise TypeError(f"covariance_update: C must be float32, got {C.dtype}")
    x3, m3 = _as_sequences(x, mask)
    n = x3.shape[-1]
    want = (n, n) if seq_bucket is None else (C.shape[0], n, n)
    if C.dim() != len(want) or tuple(C.shape[-2:]) != (n, n):
        raise ValueError(f"covariance_update: C has shape {tuple(C.shape)}, expected {want} for x with {n} features")
    B = x3.shape[0]
    if seq_scale is not None:
        seq_scale = seq_scale.reshape(-1).to(device=x.device, dtype=torch.float32)
        if seq_scale.numel() != B:
            raise ValueError(f"covariance_update: seq_scale has {seq_scale.numel()} entries for {B} sequences")
    if seq_bucket is not None:
        seq_bucket = seq_bucket.reshape(-1).to(device=x.device, dtype=torch.int64)
        if seq_bucket.numel() != B:
            raise ValueError(f"covariance_update: seq_bucket has {seq_bucket.numel()} entries for {B} sequences")
        if B and (int(seq_bucket.min()) < 0 or int(seq_bucket.max()) >= C.shape[0]):
            raise ValueError(f"covariance_update: seq_bucket out of range [0, {C.shape[0]})")
    if not upper_only:
        # The full result is the mirror of the upper triangle computed from this call alone.
        delta = torch.zeros_like(C)
        torch.ops.corda_kernels.covariance_update(delta, x3, m3, seq_scale, seq_bucket, True)
        C.add_(symmetrize_(delta))
        return C
    torch.ops.corda_kernels.covariance_update(C, x3, m3, seq_scale, seq_bucket, True)
    return C
