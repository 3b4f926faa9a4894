"""Calibration: forward hooks that stream each target layer's input covariance.

Layers that read the same input tensor (q/k/v, gate/up) share one accumulator; sharing is
detected at run time from tensor identity, never from module names, and re-checked on every
call: a layer called twice on one tensor counts two samples (as PEFT counts them), and layers
that shared an input once but later read different tensors are split apart with their exact
common history. Normalizations:

* ``peft`` (default, PEFT parity): every sequence ``s`` is scaled by ``1/|max(X_s)|`` (signed
  max over its real tokens, then abs) and ``C = (1/N_seq) Σ_s X_sᵀX_s / max(X_s)²``.
* ``mean``: ``C = (1/T) Σ_t x_t x_tᵀ`` over the ``T`` real tokens.

Any batch size is accepted: padding (``mask`` False) contributes nothing, so a batch gives
the covariance of its sequences fed one at a time. Batch-1 callers (PEFT's usage) feed a few
hundred tokens per call: the rows of small samples are copied into a per-accumulator buffer
of ``BUFFER_ROWS`` rows; when it is full, every buffered sequence's ``1/|max|`` is applied in one
pass and the buffer accumulated with one GEMM, so the cost per call is one copy, not a small
GEMM and a handful of small ops. Finiteness is checked once per accumulator at the end
(a NaN/Inf activation makes the sums non-finite), naming the layer. ``rounds = K > 1`` keeps K
candidate covariances (CorDA++), sequence ``i`` of the calibration going to round ``i mod K``
unless the caller assigns rounds. Under ``torch.distributed`` with more than one rank (each rank
calibrating its own shard of the data), the raw sums and counts are added over the ranks when the
collector is finalized (``sum_over_ranks``), so every rank holds the covariance of all shards.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.covariance import covariance_update, symmetrize_
from ..ops.linalg import all_finite
from . import distributed
from .layers import in_features

NORMALIZATIONS = ("peft", "mean")
BUFFER_ROWS = 512  # rows per accumulator buffer: one GEMM per 512 buffered tokens
_DIRECT_ROWS = 256  # a sample with at least this many real tokens goes to the GEMM directly


class NonFiniteActivationError(ValueError):
    """A target layer saw NaN/Inf activations (or a sequence whose max is zero)."""


@dataclass
class _Sample:
    """One forward's input to an accumulator, applied once every member has read it."""

    ref: weakref.ReferenceType
    x3: torch.Tensor  # (B, L, n), the activations themselves (no copy)
    mask: torch.Tensor | None  # (B, L) bool or None (all real)
    bucket: torch.Tensor | None  # (B,) round of each sequence, or None
    consumed: set[str]


@dataclass
class Accumulator:
    """One streaming covariance, shared by every layer that reads the same input tensor."""

    n: int
    rounds: int
    device: torch.device
    normalization: str
    members: list[str] = field(default_factory=list)
    C: torch.Tensor | None = None  # (rounds, n, n) float32, upper triangle until finalized; None: on another rank
    weight: torch.Tensor | None = None  # (rounds,) float64: sequences (peft) or tokens (mean)
    samples: int = 0  # samples applied (each read by every member)
    pending: _Sample | None = None
    last: weakref.ReferenceType | None = None  # the input of the last applied sample
    buf: torch.Tensor | None = None  # (BUFFER_ROWS, n) float32 rows not yet in C (rounds == 1), unscaled
    fill: int = 0
    lengths: list[int] = field(default_factory=list)  # the buffered sequences' token counts
    pending_weight: float = 0.0  # weight of the buffered sequences, added to ``weight`` at flush
    normalized: bool = False  # C already divided by its weight in place (one round, once finalized)

    def __post_init__(self) -> None:
        self.C = torch.zeros(self.rounds, self.n, self.n, dtype=torch.float32, device=self.device)
        self.weight = torch.zeros(self.rounds, dtype=torch.float64)

    def fork(self, members: list[str]) -> Accumulator:
        """A copy of the applied history (not the pending sample) for ``members``."""
        twin = Accumulator(self.n, self.rounds, self.device, self.normalization, list(members))
        twin.C = self.C.clone()
        twin.weight = self.weight.clone()
        twin.samples, twin.last = self.samples, self.last
        if self.buf is not None:
            twin.buf, twin.fill, twin.lengths = self.buf.clone(), self.fill, list(self.lengths)
        twin.pending_weight = self.pending_weight
        return twin

    # -- applying samples ------------------------------------------------------------------
    def apply(self, sample: _Sample) -> None:
        """Add ``sample`` to the sums (PEFT's normalization per sequence, padding masked)."""
        x3, mask, bucket = sample.x3, sample.mask, sample.bucket
        B, L, n = x3.shape
        self.samples += 1
        self.last = sample.ref
        if bucket is None and mask is None and 0 < B * L < _DIRECT_ROWS:  # bucket is None exactly when rounds == 1
            self.pending_weight += B if self.normalization == "peft" else B * L
            self._buffer(x3.reshape(B * L, n), L)
            return
        if self.normalization == "peft":
            if mask is None:
                peak = x3.amax(dim=(1, 2)).float().abs()
                counts = torch.ones(B, dtype=torch.float64)
            else:
                peak = x3.amax(dim=-1).float().masked_fill(~mask, float("-inf")).amax(dim=1).abs()
                real = mask.any(1)
                peak = torch.where(real, peak, torch.ones_like(peak))
                counts = real.double().cpu()
            # 1/0 = inf for a zero max: the sums become non-finite and finalize names the layer
            scale = (1.0 / peak).square()
        else:
            scale = None
            counts = torch.full((B,), float(L), dtype=torch.float64) if mask is None else mask.sum(1).double().cpu()
        if bucket is None:
            self.weight[0] += counts.sum()
        else:
            self.weight.index_add_(0, bucket.cpu(), counts)
        self._gemm(x3, mask, scale, bucket)

    def _buffer(self, rows: torch.Tensor, length: int) -> None:
        """Copy ``rows`` (whole sequences of ``length`` tokens) into the buffer; scaled at :meth:`flush`."""
        if self.buf is None:
            self.buf = torch.empty(BUFFER_ROWS, self.n, dtype=torch.float32, device=rows.device)
        if self.fill + rows.shape[0] > BUFFER_ROWS:
            self.flush()
        self.buf[self.fill : self.fill + rows.shape[0]].copy_(rows)
        self.lengths.extend([length] * (rows.shape[0] // length))
        self.fill += rows.shape[0]

    def flush(self) -> None:
        """Scale the buffered sequences (PEFT's ``1/|max|`` each) and accumulate them with one GEMM."""
        if self.pending_weight:
            self.weight[0] += self.pending_weight
            self.pending_weight = 0.0
        if not self.fill:
            return
        rows = self.buf[: self.fill]
        if self.normalization == "peft":
            _scale_sequences_(rows, self.lengths)
        self._gemm(rows.unsqueeze(0), None, None, None)
        self.fill = 0
        self.lengths.clear()

    def _gemm(self, x3, mask, scale, bucket) -> None:  # noqa: ANN001
        if self.C.device == x3.device:
            _update(self.C, x3, mask, scale, bucket)
        else:  # accumulator kept off the activations' device
            tmp = torch.zeros_like(self.C, device=x3.device)
            _update(tmp, x3, mask, scale, bucket)
            self.C += tmp.to(self.C.device)


def _scale_sequences_(rows: torch.Tensor, lengths: list[int]) -> None:
    """Multiply each sequence of ``rows`` ``(T, n)`` (sequences of ``lengths`` tokens) by its ``1/|max|``, in place."""
    L = lengths[0]
    # 1/0 = inf for a zero max: the sums become non-finite and finalize names the layer
    if all(length == L for length in lengths):  # the usual case: one reduction and one product
        seqs = rows.view(len(lengths), L * rows.shape[1])
        seqs.mul_((1.0 / seqs.amax(dim=1).abs()).unsqueeze(1))
    else:
        for part in rows.split(lengths):
            part.mul_(1.0 / part.amax().abs())


def _update(C: torch.Tensor, x3, mask, scale, bucket) -> None:  # noqa: ANN001
    if bucket is None:
        covariance_update(C[0], x3, mask=mask, seq_scale=scale, upper_only=True)
    else:
        covariance_update(C, x3, mask=mask, seq_scale=scale, seq_bucket=bucket, upper_only=True)


def _nonfinite(acc: Accumulator) -> NonFiniteActivationError:
    return NonFiniteActivationError(
        f"layer {acc.members[0]}: NaN or Inf in its input activations, or a calibration sequence "
        "whose max activation is 0 (PEFT's normalization divides by it): the covariance is not finite"
    )


class CovarianceCollector:
    """Hooks ``modules`` (name → layer) and accumulates their input covariances.

    Use as ``with collector.attached(): ...forward passes...``, announcing each batch's
    padding mask with :meth:`set_batch` when there is padding. Then :meth:`covariance` /
    :meth:`candidates` give the finished ``(n, n)`` / ``(K, n, n)`` float32 matrices and
    ``calls[name]`` the number of forward calls each layer saw (PEFT's ``sample_count``).
    ``sum_over_ranks`` (default): inside a ``torch.distributed`` group of several ranks, finalizing
    adds every rank's sums, counts and calls (a collective: every rank must finalize). With
    ``share_out`` each covariance is summed only on the rank that decomposes it
    (:func:`~corda_kernels.engine.pipeline.layer_owners`, recorded in ``owners``): the others drop
    theirs, and :meth:`covariances` gives this rank's share.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        normalization: str = "peft",
        rounds: int = 1,
        share_inputs: bool = True,
        device: torch.device | str | None = None,
        sum_over_ranks: bool = True,
        share_out: bool = False,
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
        self.sum_over_ranks = sum_over_ranks
        self.share_out = share_out
        self.owners: dict[str, int] | None = None  # layer → rank holding its covariance (share_out)
        self.acc_of: dict[str, Accumulator] = {}
        self.calls: dict[str, int] = {name: 0 for name in modules}
        self.order: list[str] = []  # layers in the order of their first call
        self._recent: deque[Accumulator] = deque(maxlen=16)
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

    def _join(self, x: torch.Tensor) -> Accumulator | None:
        """An accumulator whose whole history is this very input (a layer reading the same tensor)."""
        if not self.share_inputs:
            return None
        for acc in reversed(self._recent):
            pend = acc.pending
            if pend is not None and pend.ref() is x and acc.samples == 0:
                return acc
            if pend is None and acc.samples == 1 and acc.last is not None and acc.last() is x:
                return acc
        return None

    @torch.no_grad()
    def _observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        n = in_features(module)
        if x.shape[-1] != n:
            raise ValueError(f"layer {name}: input has {x.shape[-1]} features, the layer expects {n}")
        self.calls[name] += 1
        acc = self.acc_of.get(name)
        if acc is None:
            self.order.append(name)
            acc = self._join(x)
            if acc is not None:  # its whole history is this input: nothing to add
                acc.members.append(name)
                self.acc_of[name] = acc
                if acc.pending is not None:
                    acc.pending.consumed.add(name)
                    self._close_if_complete(acc)
                return
            acc = Accumulator(n, self.rounds, self.device or x.device, self.normalization, [name])
            self.acc_of[name] = acc
            self._recent.append(acc)
        pend = acc.pending
        if pend is not None and pend.ref() is x and name not in pend.consumed:
            pend.consumed.add(name)  # another member reading the same input: shared, no work
            self._close_if_complete(acc)
            return
        if pend is not None:  # a new sample begins before every member read the pending one
            self._close(acc)
            acc = self.acc_of[name]
        x3 = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.detach().view(1, 1, -1)
        B, L, _ = x3.shape
        acc.pending = _Sample(
            weakref.ref(x), x3, self._batch_mask(B, L, x3.device, name), self._batch_rounds(B, x3.device, name), {name}
        )
        self._close_if_complete(acc)

    def _close_if_complete(self, acc: Accumulator) -> None:
        if acc.pending is not None and len(acc.pending.consumed) == len(acc.members):
            self._close(acc)

    def _close(self, acc: Accumulator) -> None:
        """Apply the pending sample; members that did not read it leave with the history before it."""
        pend = acc.pending
        assert pend is not None
        acc.pending = None
        missed = [m for m in acc.members if m not in pend.consumed]
        if missed:
            twin = acc.fork(missed)
            for m in missed:
                self.acc_of[m] = twin
            acc.members = [m for m in acc.members if m in pend.consumed]
            self._recent.append(twin)
        acc.apply(pend)

    def _batch_mask(self, B: int, L: int, device: torch.device, name: str) -> torch.Tensor | None:
        if self._mask is None:
            return None
        if tuple(self._mask.shape) != (B, L):
            raise ValueError(f"layer {name}: batch mask has shape {tuple(self._mask.shape)}, activations ({B}, {L})")
        mask = self._mask.to(device=device, dtype=torch.bool)
        return None if bool(mask.all()) else mask

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
        for acc in self.accumulators():
            if acc.C is not None and not all_finite(acc.C):
                raise _nonfinite(acc)

    def finalize(self) -> None:
        """Apply what is pending, check, mirror the triangles; idempotent. Layers never called get no covariance."""
        if self._finalized:
            return
        for acc in self.accumulators():
            if acc.pending is not None:
                self._close(acc)
        for acc in self.accumulators():
            acc.flush()
            acc.buf = None
        if self.sum_over_ranks and distributed.active():
            if self.share_out:
                self.owners = self._owners()
            bad = distributed.reduce_collector(self, self.owners)
            if bad:  # on every rank, whichever holds the sums
                raise _nonfinite(self.accumulators()[bad[0]])
        self.check_finite()
        for acc in self.accumulators():
            if acc.C is not None:
                symmetrize_(acc.C)
            acc.last = None
        self._recent.clear()
        self._finalized = True

    def _owners(self) -> dict[str, int]:
        from .pipeline import layer_owners

        reached = {name: self.modules[name] for name in self.modules if name in self.acc_of}
        return layer_owners(reached, {name: self.acc_of[name].C for name in reached}, distributed.rank_and_world()[1])

    def _held(self, name: str) -> Accumulator:
        """Layer ``name``'s finished accumulator, which must hold its sums on this rank."""
        self.finalize()
        if name not in self.acc_of:
            raise ValueError(f"calibration never reached layer {name}: no covariance for it")
        acc = self.acc_of[name]
        if acc.C is None:
            raise ValueError(f"layer {name}: its covariance is held by rank {self.owners[name]}, not this one")
        return acc

    def accumulators(self) -> list[Accumulator]:
        seen: dict[int, Accumulator] = {}
        for name in self.order:
            seen.setdefault(id(self.acc_of[name]), self.acc_of[name])
        return list(seen.values())

    def candidates(self, name: str) -> torch.Tensor:
        """The K per-round covariances of layer ``name``, ``(K, n, n)``, each normalized by its own count."""
        acc = self._held(name)
        if bool((acc.weight == 0).any()):
            raise ValueError(f"layer {name}: a calibration round received no sequence")
        if acc.normalized:
            return acc.C.clone()
        return acc.C / acc.weight.to(acc.C).view(-1, 1, 1)

    def covariances(self) -> dict[str, torch.Tensor]:
        """Every layer's covariance held here (``share_out``: this rank's share); layers that share an
        input share one tensor (same object)."""
        out: dict[str, torch.Tensor] = {}
        self.finalize()
        for acc in self.accumulators():
            if acc.C is None:
                continue
            C = self.covariance(acc.members[0])
            out.update(dict.fromkeys(acc.members, C))
        return out

    def covariance(self, name: str) -> torch.Tensor:
        """The covariance of layer ``name`` over all rounds, ``(n, n)`` float32."""
        acc = self._held(name)
        total = float(acc.weight.sum())
        if total == 0:
            raise ValueError(f"layer {name}: calibration saw no real token")
        if self.rounds > 1:
            return acc.C.sum(0) / total
        if not acc.normalized:  # in place, once: a fresh n×n result would cost its pages again
            acc.C.div_(total)
            acc.normalized = True
        return acc.C[0]
