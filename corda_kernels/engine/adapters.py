"""CorDA adapters (PEFT's convention) and the ``CordaLinear`` module.

With scaling ``s = alpha / r`` (``alpha / √r`` with rsLoRA) and the chosen triplets
``(U_r (m×r), S_r (r,), V_r (n×r))``: ``A = diag(√(S_r/s))·V_rᵀ`` (r×n),
``B = U_r·diag(√(S_r/s))`` (m×r), ``W_res = W − s·B·A``, computed as a difference so that
``W_res + s·B·A`` reproduces ``W`` whatever the accuracy of the triplets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / √r`` with rsLoRA."""
    if r <= 0:
        raise ValueError(f"rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def build_adapter(
    W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, W_res)`` from ``W`` ``(m, n)`` and cropped triplets; A/B float32, W_res in W's dtype."""
    if S.dim() != 1 or U.shape != (W.shape[0], S.numel()) or V.shape != (W.shape[1], S.numel()):
        raise ValueError(
            f"build_adapter: W {tuple(W.shape)}, U {tuple(U.shape)}, S {tuple(S.shape)}, "
            f"V {tuple(V.shape)} do not match"
        )
    root = (S.float() / scaling).sqrt()
    A = (V.float().T * root.view(-1, 1)).contiguous()
    B = (U.float() * root.view(1, -1)).contiguous()
    W_res = (W.float() - scaling * (B @ A)).to(W.dtype)
    return A, B, W_res


class CordaLinear(nn.Module):
    """``y = x·W_resᵀ + b + s·(x·Aᵀ)·Bᵀ``: a frozen residual plus trainable ``A`` / ``B``.

    ``merge()`` folds ``s·B·A`` into the weight (inference); ``unmerge()`` takes it out again.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.scaling = scaling
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_linear(
        cls, linear: nn.Module, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, scaling: float
    ) -> CordaLinear:
        """Build from an ``nn.Linear`` (or transformers ``Conv1D``) and its cropped CO-SVD triplets."""
        from .layers import linear_weight

        W = linear_weight(linear).detach()
        A, B, W_res = build_adapter(W, U, S, V, scaling)
        return cls(W_res.contiguous(), getattr(linear, "bias", None), A.to(W.dtype), B.to(W.dtype), scaling)

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.scaling * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}"
