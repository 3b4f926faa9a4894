"""Products with ``M = W·C_fix`` in float64 (or float32) on row panels, and the float64 Gram matrix
of ``M`` by panels (used by :mod:`.top` and :mod:`.bottom`)."""

from __future__ import annotations

import torch

# The float64 products of M = W·C with a thin block are taken on row panels: (Xᵀ·W)·C rather
# than C·(Wᵀ·X). MKL's float64 GEMM with a thin right operand runs at 7–12 GFLOP/s on one
# core, with a thin left operand at 18–26 (measured at n = 4096, l = 16–32; float32 cares only
# for large n, where top_r uses the same helpers). C_fix is symmetric, so both forms are the
# same product.
_MM64_ROWS = 512  # rows of a float32 operand converted to float64 at a time by _mm64


def _mm64(Xt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``Xt @ A`` in ``Xt``'s dtype for ``Xt`` ``(B, l, p)`` and ``A`` ``(B, p, q)`` of any float dtype.

    A float32 ``A`` is converted ``_MM64_ROWS`` rows at a time into one reused buffer: a whole
    float64 copy of an 11008² covariance is 970 MB of fresh pages, whose first touch cost
    0.5–2.8 s on this machine, more than the product itself.
    """
    if A.dtype == Xt.dtype:
        return Xt @ A
    p = A.shape[-2]
    buf = torch.empty(*A.shape[:-2], min(p, _MM64_ROWS), A.shape[-1], dtype=Xt.dtype, device=A.device)
    out = None
    for i in range(0, p, _MM64_ROWS):
        h = min(_MM64_ROWS, p - i)
        blk = buf[..., :h, :]
        blk.copy_(A[..., i : i + h, :])
        if out is None:
            out = Xt[..., i : i + h] @ blk
        else:  # in place: a wide output (M itself) would otherwise cost a temporary per block
            out.baddbmm_(Xt[..., i : i + h], blk) if out.dim() == 3 else out.addmm_(Xt[..., i : i + h], blk)
    assert out is not None
    return out


_GRAM_PANEL = 512  # rows of the tall A formed at a time, and the block width of AᵀA, in _gram64


def _gram64(W64: torch.Tensor, C: torch.Tensor, wide: bool) -> torch.Tensor:
    """``AᵀA`` ``(B, k, k)`` in float64 for the tall ``A``: ``Mᵀ = C·Wᵀ`` if ``wide``, else ``M = W·C``.

    ``W64`` ``(B, m, n)`` float64, ``C`` ``(B, n, n)`` symmetric, any float dtype. ``A`` is formed
    ``_GRAM_PANEL`` rows at a time, never whole (a wide layer's ``C`` is converted to float64 a
    panel at a time too: its whole float64 copy at n = 11008 is 970 MB of fresh pages), and only
    the blocks on and above the diagonal of ``AᵀA`` are accumulated (0.56 of the Gram's flops
    at k = 4096), then mirrored.
    """
    Bn, m, n = W64.shape
    k, rows = (m, n) if wide else (n, m)
    G = torch.zeros(Bn, k, k, dtype=torch.float64, device=W64.device)
    C64 = None if wide else C.to(torch.float64)
    # a wide layer's C is converted a panel at a time into one buffer (fresh pages per panel cost
    # as much as the conversion)
    buf = torch.empty(Bn, min(rows, _GRAM_PANEL), n, dtype=torch.float64, device=W64.device) if wide else None
    for i in range(0, rows, _GRAM_PANEL):
        h = min(_GRAM_PANEL, rows - i)
        if wide:  # rows of C·Wᵀ
            assert buf is not None
            blk = buf[..., :h, :]
            blk.copy_(C[..., i : i + h, :])
            P = blk @ W64.transpose(-1, -2)
        else:  # rows of W·C
            assert C64 is not None
            P = W64[..., i : i + h, :] @ C64
        for j in range(0, k, _GRAM_PANEL):
            e = min(k, j + _GRAM_PANEL)
            G[..., :e, j:e].baddbmm_(P[..., :e].transpose(-1, -2), P[..., j:e])
    return G.triu() + G.triu(1).transpose(-1, -2)


def _mt_rows(W: torch.Tensor, C: torch.Tensor | None, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Mᵀ Q, Qᵀ W)`` in ``Q``'s dtype for ``Q`` ``(B, m, l)``: ``(B, n, l)`` (a transposed view), ``(B, l, n)``.

    ``C`` ``None`` stands for the identity (``M = W``: the plain SVD)."""
    QtW = _mm64(Q.transpose(-1, -2), W)
    return (QtW if C is None else _mm64(QtW, C)).transpose(-1, -2), QtW


def _m_rows(W: torch.Tensor, C: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """``M X = W·C·X`` in ``X``'s dtype for ``X`` ``(B, n, l)`` as ``((Xᵀ C) Wᵀ)ᵀ`` (a transposed view);
    ``C`` ``None`` stands for the identity."""
    XtC = X.transpose(-1, -2) if C is None else _mm64(X.transpose(-1, -2), C)
    return _mm64(XtC, W.transpose(-1, -2)).transpose(-1, -2)
