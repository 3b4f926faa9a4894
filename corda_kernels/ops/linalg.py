"""Linear-algebra helpers that stay correct and cheap on the CPU: the finiteness check, and LU.

``all_finite`` answers from one sum where ``torch.isfinite(x).all()`` writes a boolean tensor
of ``x``'s size (a 5632 × 2048 weight: 42 ms against ~3 ms).

torch 2.13's CPU build with MKL returns garbage pivots from *batched* LU (``inv``, ``solve``,
``lu_factor``; float32 and float64) once ``torch.set_num_threads`` has been called in the
process — even with the default count ("Pivots given to lu_solve must all be greater or equal
to 1", or silently wrong results). Single matrices are unaffected, and MKL factors batch
members one by one anyway, so on the CPU these helpers loop; elsewhere they batch.
"""

from __future__ import annotations

import torch


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite. A finite sum has only finite terms (a NaN or an
    infinity makes it NaN or infinite), so the elementwise check runs only when the sum is not
    finite: a NaN or Inf entry, or finite entries whose sum overflows."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _per_matrix(A: torch.Tensor) -> bool:
    return A.device.type == "cpu" and A.dim() > 2 and A.shape[:-2].numel() > 1


def inv_ex(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.inv_ex`` for ``(..., n, n)``."""
    if not _per_matrix(A):
        return torch.linalg.inv_ex(A)
    flat = A.reshape(-1, *A.shape[-2:])
    pairs = [torch.linalg.inv_ex(a) for a in flat]
    inv = torch.stack([p[0] for p in pairs]).reshape(A.shape)
    return inv, torch.stack([p[1] for p in pairs]).reshape(A.shape[:-2])


def solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(A, B)`` for ``A`` ``(..., n, n)``, ``B`` ``(..., n, k)`` (same batch)."""
    if not _per_matrix(A):
        return torch.linalg.solve(A, B)
    return _each_rhs(torch.linalg.solve, A, B, A.reshape(-1, *A.shape[-2:]))


def lu_factor_ex(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex`` for ``(..., m, n)``."""
    if not _per_matrix(A):
        return torch.linalg.lu_factor_ex(A)
    flat = A.reshape(-1, *A.shape[-2:])
    parts = [torch.linalg.lu_factor_ex(a) for a in flat]
    lead = A.shape[:-2]
    return (
        torch.stack([p[0] for p in parts]).reshape(A.shape),
        torch.stack([p[1] for p in parts]).reshape(*lead, -1),
        torch.stack([p[2] for p in parts]).reshape(lead),
    )


def lu_solve(LU: torch.Tensor, pivots: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.lu_solve(LU, pivots, B)`` for ``LU`` ``(..., n, n)``, ``B`` ``(..., n, k)`` (same batch)."""
    if not _per_matrix(LU):
        return torch.linalg.lu_solve(LU, pivots, B)
    return _each_rhs(torch.linalg.lu_solve, LU, B, LU.reshape(-1, *LU.shape[-2:]), pivots.reshape(-1, pivots.shape[-1]))


def _each_rhs(fn, A: torch.Tensor, B: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``fn(*factors_i, B_i)`` per matrix of the batch of ``A`` ``(..., n, n)`` (``factors`` flattened
    to one batch dim; ``B`` ``(..., n, k)`` broadcast to it), stacked back to ``A``'s batch shape."""
    lead = A.shape[:-2]
    Bf = B.expand(*lead, *B.shape[-2:]).reshape(-1, *B.shape[-2:])
    return torch.stack([fn(*f, b) for *f, b in zip(*factors, Bf)]).reshape(*lead, *B.shape[-2:])
