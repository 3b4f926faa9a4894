"""Per-layer decomposition: damped inverse, CO-SVD, crop — one layer at a time.

Layers that share an input covariance (the same tensor object) share its damped inverse;
same-width covariances are damped as one batch (a *unit*: up to ``_DAMP_BATCH`` covariances and
every layer that reads them). Only the cropped triplets of each layer are handed on, so the full
``U``/``V`` of one layer at most are alive at any moment. Under ``torch.distributed`` the units are
shared out by cost (:func:`layer_owners`); with ``N`` ranks a unit holds at most
``⌈_DAMP_BATCH / N⌉`` covariances, so that a model's few widest covariances (LLaMA's down_proj
inputs) spread over the ranks instead of a few whole batches of them setting the slowest rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.cosvd import cosvd
from ..ops.damping import DampingError, damp_covariance
from ..ops.linalg import all_finite
from ..ops.spectra import eig_extremes_fast
from . import distributed
from .layers import linear_weight
from .offload import Offload

CORDA_METHODS = ("ipm", "kpm")
_DAMP_BATCH = 8  # covariances damped together (bounded memory: 2 extra n×n per matrix)


@dataclass
class LayerResult:
    """The cropped CO-SVD of one layer: ``U`` ``(m, r)``, ``S`` ``(r,)``, ``V`` ``(n, r)`` float32."""

    name: str
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    damp: float
    info: dict = field(default_factory=dict)


def which_for(corda_method: str) -> str:
    if corda_method not in CORDA_METHODS:
        raise ValueError(f"corda_method must be 'ipm' or 'kpm', got {corda_method!r}")
    return "top" if corda_method == "ipm" else "bottom"


def check_ranks(modules: dict[str, nn.Module], ranks: dict[str, int]) -> None:
    """Every rank must be in ``[1, min(m, n)]`` of its layer."""
    for name, module in modules.items():
        m, n = linear_weight(module).shape
        r = ranks[name]
        if not 0 < r <= min(m, n):
            raise ValueError(f"layer {name}: rank {r} must be in [1, {min(m, n)}] for a {m}×{n} weight")


def group_shared(covariances: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, list[str]]]:
    """``[(C, layer names)]``: layers whose covariance is the same tensor object form one group."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, C in covariances.items():
        groups.setdefault(id(C), (C, []))[1].append(name)
    return list(groups.values())


@dataclass
class Unit:
    """One damping batch: same-width covariances ``(C (n, n), layer names)`` decomposed together."""

    chunk: list[tuple[torch.Tensor, list[str]]]

    @property
    def names(self) -> list[str]:
        return [name for _, names in self.chunk for name in names]

    def cost(self, modules: dict[str, nn.Module]) -> float:
        """Estimated flops: a damping factorization per covariance and a CO-SVD of ``m·n·min(m, n)`` per layer."""
        n = self.chunk[0][0].shape[-1]
        total = float(len(self.chunk) * n**3)
        for name in self.names:
            m, k = linear_weight(modules[name]).shape
            total += float(m * k * min(m, k))
        return total


def unit_size(world: int) -> int:
    """Covariances per unit when ``world`` ranks share the units: ``⌈_DAMP_BATCH / world⌉``.

    Longest-first assignment ends no later than the mean load plus the largest unit; a unit of
    ``_DAMP_BATCH`` of LLaMA-2 7B's 11008-wide covariances is 1.3× the mean load of 8 ranks.
    """
    if world < 1:
        raise ValueError(f"world must be ≥ 1, got {world}")
    return -(-_DAMP_BATCH // world)


def plan_units(modules: dict[str, nn.Module], covariances: dict[str, torch.Tensor], world: int = 1) -> list[Unit]:
    """The units :func:`decompose_layers` runs, in its order (deterministic given ``modules``' order):
    consecutive same-width chunks of :func:`unit_size` ``(world)`` covariances."""
    missing = [name for name in modules if name not in covariances]
    if missing:
        raise ValueError(f"no covariance for layer(s) {', '.join(missing[:5])}")
    groups = group_shared({name: covariances[name] for name in modules})
    by_width: dict[int, list[tuple[torch.Tensor, list[str]]]] = {}
    for C, names in groups:
        by_width.setdefault(C.shape[-1], []).append((C, names))
    size = unit_size(world)
    return [Unit(group[start : start + size]) for group in by_width.values() for start in range(0, len(group), size)]


def layer_owners(modules: dict[str, nn.Module], covariances: dict[str, torch.Tensor], world: int) -> dict[str, int]:
    """The rank that decomposes each layer when ``world`` ranks share the units (longest first).

    Only the covariances' widths and which layers share one (the same object) matter. The layers
    of one rank, in ``modules``' order, are planned by :func:`plan_units` into exactly the units
    it was given when :func:`decompose_layers` is told the same ``world`` (same-width units are
    consecutive chunks of :func:`unit_size` and only the last of a width is short).
    """
    units = plan_units(modules, covariances, world)
    owners = distributed.assign_by_cost([u.cost(modules) for u in units], world)
    return {name: owner for unit, owner in zip(units, owners) for name in unit.names}


def decompose_layers(
    modules: dict[str, nn.Module],
    covariances: dict[str, torch.Tensor],
    ranks: dict[str, int],
    corda_method: str,
    *,
    method: str = "fast",
    progress: bool = True,
    extremes: bool = False,
    screen: bool = True,
    offload: Offload | None = None,
    world: int = 1,
) -> Iterator[LayerResult]:
    """Yield each layer's cropped CO-SVD (IPM: top ``r``, KPM: bottom ``r``), grouped by covariance.

    ``covariances`` maps layer name → ``(n, n)`` covariance (shared tensors are damped once).
    Same-shaped layers of a damping chunk go through :func:`cosvd` as one batch.
    ``info["method"]`` is the method actually used (``fast-ipm``, ``fast-kpm-lu``, ``fast-kpm-gram``,
    ``fast-kpm-qr``, ``exact-fallback`` or ``exact``), ``info["accuracy"]`` its estimates.
    With ``extremes``, ``info`` also gets ``lambda_min`` / ``lambda_max`` of the damped covariance
    (Lanczos, :func:`~corda_kernels.ops.spectra.eig_extremes_fast`) and their ``lambda_rel_bound``.
    ``info["damp_check"]`` says whether the damp was accepted by the screen or by the literal
    check (:mod:`corda_kernels.ops.damping`); ``screen=False`` runs the literal rule for every layer.
    Given the layers :func:`layer_owners` gives one rank of ``world``, it runs exactly that rank's units.
    ``offload`` (the model's :class:`~corda_kernels.engine.offload.Offload`) reads weights that
    accelerate keeps offloaded, one batch of layers at a time.
    """
    which = which_for(corda_method)
    check_ranks(modules, ranks)
    units = plan_units(modules, covariances, world)
    bar = tqdm(total=sum(len(u.names) for u in units), desc="CO-SVD", unit="layer", disable=not progress)
    for unit in units:
        chunk = unit.chunk
        t0 = time.perf_counter()
        # computed where the unit's first layer runs (covariances may be kept on the CPU, layers
        # of one unit may sit on several devices)
        first = chunk[0][1][0]
        dev = offload.device(first, modules[first]) if offload else linear_weight(modules[first]).device
        try:
            Cs = torch.stack([C.to(device=dev, dtype=torch.float32) for C, _ in chunk])  # a copy: ours to shift
            C_fix, damps, checked = damp_covariance(Cs, screen=screen, overwrite=True)
        except DampingError as err:
            raise DampingError(err.index, f"layer(s) {', '.join(chunk[err.index][1])}: {err}") from err
        except ValueError as err:
            bad = [names for C, names in chunk if not all_finite(C)]
            raise ValueError(f"layer(s) {', '.join(bad[0]) if bad else '?'}: {err}") from err
        spectrum: list[dict] = [{} for _ in chunk]
        if extremes:
            lo, hi, bound = eig_extremes_fast(C_fix)
            spectrum = [
                {"lambda_min": float(lo[i]), "lambda_max": float(hi[i]), "lambda_rel_bound": float(bound[i].max())}
                for i in range(len(chunk))
            ]
        damp_time = (time.perf_counter() - t0) / len(chunk)
        # same-shaped layers of the chunk (same rank) go through cosvd as one batch
        batches: dict[tuple, list[tuple[str, int]]] = {}
        for i, (_, names) in enumerate(chunk):
            for name in names:
                key = (tuple(linear_weight(modules[name]).shape), ranks[name])
                batches.setdefault(key, []).append((name, i))
        for (shape, r), members in batches.items():
            t1 = time.perf_counter()
            with offload.onloaded([name for name, _ in members]) if offload else contextlib.nullcontext():
                W = torch.stack([linear_weight(modules[name]).detach().to(dev) for name, _ in members])
            idx = [i for _, i in members]
            # a view where the batch is a run of the chunk (a gather copies n² per layer)
            run = idx == list(range(idx[0], idx[0] + len(idx)))
            Cb = C_fix[idx[0] : idx[0] + len(idx)] if run else C_fix[idx]
            meta: dict = {}
            U, S, V = cosvd(W, Cb, rank=r, which=which, C_fix=Cb, method=method, info=meta)
            per_layer = (time.perf_counter() - t1) / len(members)
            del W, Cb
            for j, (name, i) in enumerate(members):
                acc_info = dict(meta["batch"][j] if "batch" in meta else meta)
                info = {
                    "shape": list(shape),
                    "rank": r,
                    "damp": float(damps[i]),
                    "damp_check": "literal" if bool(checked[i]) else "screen",
                    "method": acc_info.pop("method", method),
                    "accuracy": acc_info,
                    "batch": len(members),
                    "time_s": per_layer + damp_time / len(chunk[i][1]),
                    **spectrum[i],
                }
                yield LayerResult(name, U[j].clone(), S[j].clone(), V[j].clone(), float(damps[i]), info)
                bar.update(1)
            del U, S, V
        del C_fix
    bar.close()


def share_results(
    own: Iterable[LayerResult], modules: dict[str, nn.Module], ranks: dict[str, int], owners: dict[str, int]
) -> list[LayerResult]:
    """Every layer of ``modules`` (in its order) on every rank, each from the rank that decomposed it.

    ``own`` is this rank's results, ``owners`` each layer's rank (:func:`layer_owners`); a collective.
    """
    own = list(own)
    shapes = {name: (*linear_weight(m).shape, ranks[name]) for name, m in modules.items()}
    triplets = distributed.share_triplets({r.name: (r.U, r.S, r.V) for r in own}, owners, shapes)
    infos = distributed.all_gather({r.name: (r.damp, r.info) for r in own})
    found = {name: item for part in infos for name, item in part.items()}
    return [LayerResult(name, *triplets[name], *found[name]) for name in modules]
