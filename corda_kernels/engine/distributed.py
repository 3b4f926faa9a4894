"""Data-parallel calibration and cost-shared decomposition under ``torch.distributed``.

Nothing here starts a process group: under one (``torchrun``, or a user's own
``init_process_group``) with more than one rank,

* the covariance collector sums each accumulator's raw ``Σ xᵀx``, its sequence / token counts and
  the layers' call counts over the ranks once, at the end, in float64 and in buckets
  (:func:`reduce_collector`), after checking that every rank calibrated the same layers with the
  same input sharing — each rank having run its own shard of the calibration data, the result is
  a single process's over all shards, up to summation order. The sums reach every rank, or only
  the rank that decomposes the layer (then each rank holds about 1/world of the covariances);
* the decomposition is split into the units the single-process pipeline runs (a damping chunk's
  batch of same-shaped layers), assigned to ranks longest first by an estimated cost
  (:func:`assign_by_cost`), each computed exactly as one process computes it, and the cropped
  triplets broadcast from their owner (:func:`share_triplets`).

Collectives go through the CPU with ``gloo`` and through the current CUDA device with ``nccl``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..ops.linalg import all_finite

BUCKET_BYTES = 64 << 20  # float64 bytes summed per all-reduce


def active() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def group_from_env() -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) and no group yet: one for the block,
    ``nccl`` where CUDA is available (each rank on device ``LOCAL_RANK``), else ``gloo``."""
    if not launched_without_group():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach one
        raise
    # every rank leaves together: a rank tearing gloo down while another still holds its
    # connections was seen to abort that other rank ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def launched_without_group() -> int:
    """The ``WORLD_SIZE`` a launcher set (> 1) where no process group is initialized, else 0."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world if world > 1 and not (dist.is_available() and dist.is_initialized()) else 0


def broadcast_object(value: object, src: int = 0) -> object:
    """``value`` of rank ``src`` on every rank (small picklable objects)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(value: object) -> list[object]:
    """Every rank's ``value`` (small picklable objects), in rank order, on every rank."""
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same(value: object, what: str) -> None:
    """Raise ``ValueError`` unless every rank passes an equal ``value`` (``what`` names it)."""
    gathered = all_gather(value)
    for r, other in enumerate(gathered):
        if other != gathered[0]:
            raise ValueError(f"ranks 0 and {r} disagree on {what}: {_short(gathered[0])} against {_short(other)}")


def _short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


def _pieces(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor's flat view cut into pieces of at most a bucket (views: summing them sums the tensor)."""
    step = BUCKET_BYTES // 8
    return [piece for t in tensors for piece in t.detach().reshape(-1).split(step)]


def sum_over_ranks(tensors: list[torch.Tensor], dst: int | None = None) -> None:
    """Add each tensor up over the ranks in float64, in place (any dtype and device, contiguous).

    ``dst=None``: every rank receives the sums (all-reduce); else only rank ``dst`` does (reduce)
    and the others' tensors are left as they were. Consecutive tensors share a collective up to
    :data:`BUCKET_BYTES` of float64; a larger tensor goes in pieces, so the float64 copy in
    flight is at most a bucket.
    """
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("sum_over_ranks: tensors must be contiguous (they are summed in place)")
    dev = _comm_device()
    bucket: list[torch.Tensor] = []
    size = 0
    for piece in [*_pieces(tensors), None]:
        if piece is not None and size + piece.numel() * 8 <= BUCKET_BYTES:
            bucket.append(piece)
            size += piece.numel() * 8
            continue
        if bucket:
            flat = torch.cat([b.to(device=dev, dtype=torch.float64) for b in bucket])
            if dst is None:
                dist.all_reduce(flat)
            else:
                dist.reduce(flat, dst=dst)
            if dst is None or dist.get_rank() == dst:
                for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                    b.copy_(part.to(device=b.device, dtype=b.dtype))
        bucket, size = ([piece], piece.numel() * 8) if piece is not None else ([], 0)


def reduce_collector(collector, owners: dict[str, int] | None = None) -> list[int]:  # noqa: ANN001
    """Sum a :class:`~corda_kernels.engine.calibration.CovarianceCollector`'s flushed accumulators over the ranks.

    Checks first that every rank saw the same layers, grouped the same way by shared input, with
    the same widths and rounds; raises ``ValueError`` naming the difference otherwise. Counts and
    call counts reach every rank. The raw sums ``C`` reach every rank, or with ``owners`` (layer
    name → rank) only the owner of each accumulator's layers, the others dropping theirs
    (``C = None``). Returns the indices (in ``collector.accumulators()``) of the accumulators whose
    sums are not finite on their owner, the same list on every rank.
    """
    accs = collector.accumulators()
    layout = [(tuple(sorted(a.members)), a.n, a.rounds) for a in accs]
    check_same(
        sorted(layout),
        "the calibrated layers and which of them read one input (a rank whose run_model fed no sample has none)",
    )
    names = sorted(collector.calls)
    calls = torch.tensor([collector.calls[n] for n in names], dtype=torch.float64)
    sum_over_ranks([a.weight for a in accs] + [calls])
    collector.calls.update({n: int(c) for n, c in zip(names, calls.tolist())})
    by_name = sorted(range(len(accs)), key=lambda i: sorted(accs[i].members)[0])  # the same order on every rank
    if owners is None:
        sum_over_ranks([accs[i].C for i in by_name])
        return [i for i in range(len(accs)) if not all_finite(accs[i].C)]
    rank = dist.get_rank()
    dst = {i: owners[accs[i].members[0]] for i in by_name}
    for i in by_name:
        sum_over_ranks([accs[i].C], dst=dst[i])
        if dst[i] != rank:
            accs[i].C = None
    bad = torch.tensor([float(accs[i].C is not None and not all_finite(accs[i].C)) for i in by_name])
    sum_over_ranks([bad])
    return sorted(i for i, flag in zip(by_name, bad.tolist()) if flag)


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
