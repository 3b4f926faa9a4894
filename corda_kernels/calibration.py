"""Calibration: forward hooks that stream each target layer's input covariance.

Layers that read the same input tensor (q/k/v, gate/up) share one accumulator; sharing is
detected at run time from tensor identity, never from module names. Normalizations:

* ``peft`` (default, PEFT parity): every sequence ``s`` is scaled by ``1/|max(X_s)|`` (signed
  max over its real tokens, then abs) and ``C = (1/N_seq) Σ_s X_sᵀX_s / max(X_s)²``.
* ``mean``: ``C = (1/T) Σ_t x_t x_tᵀ`` over the ``T`` real tokens.

Any batch size is accepted: padding (``mask`` False) contributes nothing, so a batch gives
the covariance of its sequences fed one at a time. ``rounds = K > 1`` keeps K candidate
covariances (CorDA++), sequence ``i`` of the calibration going to round ``i mod K`` unless
the caller assigns rounds.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .covariance import covariance_update, symmetrize_

NORMALIZATIONS = ("peft", "mean")


class NonFiniteActivationError(ValueError):
    """A target layer saw NaN/Inf activations (or a sequence whose max is zero)."""


@dataclass
class Accumulator:
    """One streaming covariance, shared by every layer that reads the same input tensor."""

    n: int
    rounds: int
    device: torch.device
    members: list[str] = field(default_factory=list)
    C: torch.Tensor | None = None  # (rounds, n, n) float32, upper triangle valid until finalized
    weight: torch.Tensor | None = None  # (rounds,) float64: sequences (peft) or tokens (mean)
    updates: int = 0
    last: weakref.ReferenceType | None = None

    def __post_init__(self) -> None:
        self.C = torch.zeros(self.rounds, self.n, self.n, dtype=torch.float32, device=self.device)
        self.weight = torch.zeros(self.rounds, dtype=torch.float64)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (a view)."""
    w = module.weight
    return w.T if is_conv1d(module) else w


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def in_features(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


class CovarianceCollector:
    """Hooks ``modules`` (name → layer) and accumulates their input covariances.

    Use as ``with collector.attached(): ...forward passes...``, announcing each batch's
    padding mask with :meth:`set_batch` when there is padding. Then :meth:`covariance` /
    :meth:`candidates` give the finished ``(n, n)`` / ``(K, n, n)`` float32 matrices.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        normalization: str = "peft",
        rounds: int = 1,
        share_inputs: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if not modules:
            raise ValueError("CovarianceCollector: no target modules to calibrate")
        self.modules = modules
        self.normalization = normalization
        self.rounds = rounds
        self.share_inputs = share_inputs
        self.device = None if device is None else torch.device(device)
        self.acc_of: dict[str, Accumulator] = {}
        self.calls: dict[str, int] = {name: 0 for name in modules}
        self.order: list[str] = []  # layers in the order of their first call
        self._recent: deque[tuple[weakref.ReferenceType, Accumulator]] = deque(maxlen=16)
        self._mask: torch.Tensor | None = None
        self._bucket: torch.Tensor | None = None
        self._seen_sequences = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._finalized = False

    # -- batches ---------------------------------------------------------------------------
    def set_batch(self, mask: torch.Tensor | None = None, rounds: torch.Tensor | None = None) -> None:
        """Announce the next forward's padding ``mask`` ``(B, L)`` and, optionally, each sequence's round."""
        self._mask = mask
        if rounds is None and self.rounds > 1 and mask is not None:
            B = mask.shape[0]
            rounds = torch.arange(self._seen_sequences, self._seen_sequences + B) % self.rounds
            self._seen_sequences += B
        self._bucket = rounds

    @contextmanager
    def attached(self) -> Iterator[CovarianceCollector]:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    # -- the hook --------------------------------------------------------------------------
    def _hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            self._observe(name, module, x)

        return hook

    def _accumulator_for(self, name: str, module: nn.Module, x: torch.Tensor) -> Accumulator:
        acc = self.acc_of.get(name)
        if acc is not None:
            return acc
        if self.share_inputs:
            for ref, cand in self._recent:
                if ref() is x:
                    acc = cand
                    break
        if acc is None:
            device = self.device or x.device
            acc = Accumulator(n=x.shape[-1], rounds=self.rounds, device=device)
        acc.members.append(name)
        self.acc_of[name] = acc
        self.order.append(name)
        return acc

    @torch.no_grad()
    def _observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        n = in_features(module)
        if x.shape[-1] != n:
            raise ValueError(f"layer {name}: input has {x.shape[-1]} features, the layer expects {n}")
        acc = self._accumulator_for(name, module, x)
        self.calls[name] += 1
        if acc.last is not None and acc.last() is x:
            return  # a layer sharing this input already accumulated it
        acc.last = weakref.ref(x)
        self._recent.append((acc.last, acc))
        acc.updates += 1
        x3 = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.detach().view(1, 1, -1)
        B, L, _ = x3.shape
        mask = self._batch_mask(B, L, x3.device, name)
        bucket = self._batch_rounds(B, x3.device, name)
        if self.normalization == "peft":
            real = mask.any(1)
            peak = x3.amax(dim=-1).float().masked_fill(~mask, float("-inf")).amax(dim=1).abs()
            if bool((peak[real] == 0).any()):
                raise NonFiniteActivationError(
                    f"layer {name}: a calibration sequence has max activation 0; PEFT's normalization divides by it"
                )
            scale = torch.where(real, 1.0 / peak.clamp_min(torch.finfo(torch.float32).tiny) ** 2, 0.0)
            counts = real.double()
        else:
            scale = None
            counts = mask.sum(1).double()
        C = acc.C if acc.C.device == x3.device else None
        if C is None:  # accumulator kept off the activations' device
            tmp = torch.zeros_like(acc.C, device=x3.device)
            self._update(tmp, x3, mask, scale, bucket)
            acc.C += tmp.to(acc.C.device)
        else:
            self._update(C, x3, mask, scale, bucket)
        if bucket is None:
            acc.weight[0] += counts.sum().cpu()
        else:
            acc.weight.index_add_(0, bucket.cpu(), counts.cpu())

    def _update(self, C: torch.Tensor, x3, mask, scale, bucket) -> None:  # noqa: ANN001
        if bucket is None:
            covariance_update(C[0], x3, mask=mask, seq_scale=scale, upper_only=True)
        else:
            covariance_update(C, x3, mask=mask, seq_scale=scale, seq_bucket=bucket, upper_only=True)

    def _batch_mask(self, B: int, L: int, device: torch.device, name: str) -> torch.Tensor:
        if self._mask is None:
            return torch.ones(B, L, dtype=torch.bool, device=device)
        if tuple(self._mask.shape) != (B, L):
            raise ValueError(f"layer {name}: batch mask has shape {tuple(self._mask.shape)}, activations ({B}, {L})")
        return self._mask.to(device=device, dtype=torch.bool)

    def _batch_rounds(self, B: int, device: torch.device, name: str) -> torch.Tensor | None:
        if self.rounds == 1:
            return None
        if self._bucket is None:
            raise ValueError(f"layer {name}: rounds={self.rounds} needs set_batch(mask, rounds) before each forward")
        if self._bucket.numel() != B:
            raise ValueError(f"layer {name}: {self._bucket.numel()} round indices for {B} sequences")
        return self._bucket.to(device=device, dtype=torch.int64)

    # -- results ---------------------------------------------------------------------------
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteActivationError` naming the first layer whose covariance is not finite."""
        for name in self.order:
            if not bool(torch.isfinite(self.acc_of[name].C).all()):
                raise NonFiniteActivationError(
                    f"layer {name}: NaN or Inf in its input activations (the covariance is not finite)"
                )

    def finalize(self) -> None:
        """Check, mirror the triangles; idempotent. Layers never called get no covariance."""
        if self._finalized:
            return
        for acc in self.accumulators():
            bad = [m for m in acc.members if self.calls[m] != acc.updates]
            if bad:
                raise RuntimeError(
                    f"layers {', '.join(acc.members)} shared one input on their first call but not on later "
                    "ones; calibrate with share_inputs=False"
                )
        self.check_finite()
        for acc in self.accumulators():
            symmetrize_(acc.C)
            acc.last = None
        self._recent.clear()
        self._finalized = True

    def accumulators(self) -> list[Accumulator]:
        seen: dict[int, Accumulator] = {}
        for name in self.order:
            seen.setdefault(id(self.acc_of[name]), self.acc_of[name])
        return list(seen.values())

    def candidates(self, name: str) -> torch.Tensor:
        """The K per-round covariances of layer ``name``, ``(K, n, n)``, each normalized by its own count."""
        self.finalize()
        if name not in self.acc_of:
            raise ValueError(f"calibration never reached layer {name}: no covariance for it")
        acc = self.acc_of[name]
        if bool((acc.weight == 0).any()):
            raise ValueError(f"layer {name}: a calibration round received no sequence")
        return acc.C / acc.weight.to(acc.C).view(-1, 1, 1)

    def covariances(self) -> dict[str, torch.Tensor]:
        """Every layer's covariance; layers that share an input share one tensor (same object)."""
        out: dict[str, torch.Tensor] = {}
        for acc in self.accumulators():
            C = self.covariance(acc.members[0])
            out.update(dict.fromkeys(acc.members, C))
        return out

    def covariance(self, name: str) -> torch.Tensor:
        """The covariance of layer ``name`` over all rounds, ``(n, n)`` float32."""
        self.finalize()
        if name not in self.acc_of:
            raise ValueError(f"calibration never reached layer {name}: no covariance for it")
        acc = self.acc_of[name]
        total = float(acc.weight.sum())
        if total == 0:
            raise ValueError(f"layer {name}: calibration saw no real token")
        C = acc.C.sum(0) if self.rounds > 1 else acc.C[0]
        return C / total
