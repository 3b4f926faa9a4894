"""CorDA's damped (regularized) inverse, batched over a leading dimension.

The rule (CorDA / PEFT, exactly): ``damp = 0.01``; loop ``C_fix = C + damp·mean(diag C)·I``,
``C_inv = C_fix⁻¹``; stop when ``‖C_fix·C_inv − I‖_F < threshold`` (0.05), else ``damp *= 2``.
The check is evaluated in the covariance's own precision (float32), as PEFT does: it is
what makes the rule pick a damp large enough for float32 inverses, and what keeps the
chosen damp (and so the adapters) equal to PEFT's. Unlike upstream the loop is bounded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backend import define_op, register_impl
from .linalg import inv_ex

DEFAULT_DAMP = 0.01
DEFAULT_THRESHOLD = 0.05
DEFAULT_MAX_STEPS = 40


class DampingError(RuntimeError):
    """The damping search failed for one matrix of the batch (``index``)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _fake(C, damp, threshold, max_steps):  # noqa: ANN001, ANN202
    return torch.empty_like(C), torch.empty_like(C), C.new_empty(C.shape[0], dtype=torch.float64)


define_op(
    "damped_inverse",
    "(Tensor C, float damp, float threshold, int max_steps) -> (Tensor, Tensor, Tensor)",
    _fake,
)


def diag_means(C: torch.Tensor) -> torch.Tensor:
    """``mean(diag C_b)`` for each matrix of ``C`` ``(B, n, n)``, rounded exactly as PEFT rounds it.

    One matrix at a time, on a contiguous diagonal: a batched strided mean rounds differently.
    """
    return torch.stack([torch.mean(torch.diag(c)) for c in C])


def fix_covariance(C: torch.Tensor, damp: torch.Tensor) -> torch.Tensor:
    """``C + damp·mean(diag C)·I`` for ``C`` ``(B, n, n)`` and ``damp`` ``(B,)`` (PEFT's arithmetic)."""
    shift = diag_means(C) * damp.to(device=C.device, dtype=C.dtype)
    out = C.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(shift.view(-1, 1))  # off the diagonal PEFT adds exact zeros
    return out


def search_damp(
    C: torch.Tensor,
    damp: float,
    threshold: float,
    max_steps: int,
    shifted: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The damping loop shared by every backend, on ``C`` ``(B, n, n)``.

    ``shifted(idx, damps)`` gives ``C_fix`` of the matrices ``idx`` (on ``C``'s device) for their
    float64 ``damps``; ``residual(C_fix, C_inv)`` gives ``‖C_fix·C_inv − I‖_F`` per matrix.
    Returns ``(C_fix, C_inv, damps)``: ``C``'s dtype ``(B, n, n)`` twice, float64 ``(B,)`` on the CPU.
    """
    B = C.shape[0]
    damps = torch.full((B,), damp, dtype=torch.float64)
    C_fix = torch.empty_like(C)
    C_inv = torch.empty_like(C)
    todo = torch.arange(B)
    for step in range(max_steps):
        todo_dev = todo.to(C.device)
        fixed = shifted(todo_dev, damps[todo])
        inv, info = inv_ex(fixed)
        err = residual(fixed, inv).cpu()
        ok = (info.cpu() == 0) & (err < threshold)
        if step == 0 and bool(ok.all()):  # the common case: the first damp suffices for all, no copies
            return fixed, inv, damps
        done, ok_dev = todo[ok].to(C.device), ok.to(C.device)
        C_fix[done] = fixed[ok_dev]
        C_inv[done] = inv[ok_dev]
        todo = todo[~ok]
        if todo.numel() == 0:
            return C_fix, C_inv, damps
        damps[todo] *= 2
    raise DampingError(
        int(todo[0]),
        f"damped_inverse: no damp up to {damps[todo[0]].item() / 2:g} made ‖C_fix·C_inv − I‖_F < {threshold} "
        f"within {max_steps} doublings (matrix {int(todo[0])} of the batch)",
    )


@register_impl("damped_inverse", "torch")
def _damped_inverse_torch(
    C: torch.Tensor, damp: float, threshold: float, max_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return search_damp(
        C,
        damp,
        threshold,
        max_steps,
        shifted=lambda idx, damps: fix_covariance(C[idx], damps),
        residual=_identity_residual,
    )


def _identity_residual(fixed: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """``‖fixed·inv − I‖_F`` per matrix, the identity subtracted in place (same values as ``P − I``)."""
    prod = fixed @ inv
    prod.diagonal(dim1=-2, dim2=-1).sub_(1)
    return torch.linalg.matrix_norm(prod)


def damped_inverse(
    C: torch.Tensor,
    *,
    damp: float = DEFAULT_DAMP,
    threshold: float = DEFAULT_THRESHOLD,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Damped inverse of a covariance ``C`` ``(n, n)`` or a batch ``(B, n, n)``.

    Returns ``(C_fix, C_inv, damp)`` with the input's shape; ``damp`` is a float for one
    matrix and a float64 ``(B,)`` tensor for a batch. Raises ``ValueError`` on a non-finite
    or non-square ``C`` and :class:`DampingError` when ``max_steps`` doublings do not suffice.
    """
    if C.dim() not in (2, 3) or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"damped_inverse: C must be (n, n) or (B, n, n), got {tuple(C.shape)}")
    if not C.dtype.is_floating_point:
        raise TypeError(f"damped_inverse: C must be floating point, got {C.dtype}")
    if max_steps < 1:
        raise ValueError(f"damped_inverse: max_steps must be >= 1, got {max_steps}")
    single = C.dim() == 2
    Cb = C.unsqueeze(0) if single else C
    # a sum is finite when every entry is (a finite sum that overflows only costs the full check)
    finite = torch.isfinite(Cb.sum(dim=(-2, -1)))
    if not bool(finite.all()):
        finite = torch.isfinite(Cb).flatten(1).all(1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise ValueError(f"damped_inverse: covariance {bad} of the batch has NaN or Inf entries")
    C_fix, C_inv, damps = torch.ops.corda_kernels.damped_inverse(Cb.contiguous(), damp, threshold, max_steps)
    if single:
        return C_fix[0], C_inv[0], float(damps[0])
    return C_fix, C_inv, damps
