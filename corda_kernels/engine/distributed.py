"""Data-parallel calibration and cost-shared decomposition under ``torch.distributed``.

Nothing here starts a process group: under one (``torchrun``, or a user's own
``init_process_group``) with more than one rank,

* the covariance collector sums each accumulator's raw ``Σ xᵀx``, its sequence / token counts and
  the layers' call counts over the ranks once, at the end, in float64 and in buckets
  (:func:`reduce_collector`), after checking that every rank calibrated the same layers with the
  same input sharing — each rank having run its own shard of the calibration data, the result is
  a single process's over all shards, up to summation order;
* the decomposition is split into the units the single-process pipeline runs (a damping chunk's
  batch of same-shaped layers), assigned to ranks longest first by an estimated cost
  (:func:`assign_by_cost`), each computed exactly as one process computes it, and the cropped
  triplets broadcast from their owner (:func:`share_triplets`).

Collectives go through the CPU with ``gloo`` and through the current CUDA device with ``nccl``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20  # float64 bytes summed per all-reduce


def active() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same(value: object, what: str) -> None:
    """Raise ``ValueError`` unless every rank passes an equal ``value`` (``what`` names it)."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    for r, other in enumerate(gathered):
        if other != gathered[0]:
            raise ValueError(f"ranks 0 and {r} disagree on {what}: {_short(gathered[0])} against {_short(other)}")


def _short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


def all_reduce_sums(tensors: list[torch.Tensor]) -> None:
    """Replace every tensor by its sum over the ranks, added in float64, in place (any dtype and device).

    Consecutive tensors share one all-reduce up to :data:`BUCKET_BYTES` of float64.
    """
    dev = _comm_device()
    bucket: list[torch.Tensor] = []
    size = 0
    for t in [*tensors, None]:
        if t is not None and (not bucket or size + t.numel() * 8 <= BUCKET_BYTES):
            bucket.append(t)
            size += t.numel() * 8
            continue
        if bucket:
            flat = torch.cat([b.detach().reshape(-1).to(device=dev, dtype=torch.float64) for b in bucket])
            dist.all_reduce(flat)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view(b.shape).to(device=b.device, dtype=b.dtype))
        bucket, size = ([t], t.numel() * 8) if t is not None else ([], 0)


def reduce_collector(collector) -> None:  # noqa: ANN001
    """Sum a :class:`~corda_kernels.engine.calibration.CovarianceCollector`'s flushed accumulators over the ranks.

    Checks first that every rank saw the same layers, grouped the same way by shared input, with
    the same widths and rounds; raises ``ValueError`` naming the difference otherwise.
    """
    accs = sorted(collector.accumulators(), key=lambda a: sorted(a.members)[0])
    layout = [(tuple(sorted(a.members)), a.n, a.rounds) for a in accs]
    check_same(layout, "the calibrated layers and which of them read one input")
    names = sorted(collector.calls)
    calls = torch.tensor([collector.calls[n] for n in names], dtype=torch.float64)
    all_reduce_sums([a.C for a in accs] + [a.weight for a in accs] + [calls])
    collector.calls.update({n: int(c) for n, c in zip(names, calls.tolist())})


def assign_by_cost(costs: list[float], world: int) -> list[int]:
    """Owner rank of each unit: longest first, each to the least-loaded rank (ties: lower index, lower rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def share_triplets(
    triplets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    owners: dict[str, int],
    shapes: dict[str, tuple[int, int, int]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every layer's float32 ``(U (m, r), S (r,), V (n, r))`` on every rank, broadcast from its owner.

    ``triplets`` holds this rank's own layers, ``owners`` each layer's rank, ``shapes`` its ``(m, n, r)``.
    """
    dev = _comm_device()
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name in sorted(owners):
        m, n, r = shapes[name]
        if owners[name] == dist.get_rank():
            U, S, V = (t.detach().to(device=dev, dtype=torch.float32).contiguous() for t in triplets[name])
        else:
            U, S, V = (torch.empty(s, dtype=torch.float32, device=dev) for s in ((m, r), (r,), (n, r)))
        for t in (U, S, V):
            dist.broadcast(t, src=owners[name])
        out[name] = (U.cpu(), S.cpu(), V.cpu())
    return out
