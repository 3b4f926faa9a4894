"""CorDA++ (docs/design.md §5): compactness, dynamic covariance selection, dynamic rank allocation.

* **Compactness** ``π(C) = √(m·λ_max(C)) / λ_min(C)`` of a layer's damped covariance; truncating
  the bottom ``r`` CO-SVD components moves any output by at most ``σ_(r)·π`` with ``σ_(r)``
  the r-th singular value of ``W·C_fix`` from the end (:func:`truncation_bound`).
* **Selection**: each layer scores its K candidate covariances (one per calibration round)
  ``log π(C_i) · Σ_j σ_j(W·C_i) / σ_max(W·C_i)`` and takes the lowest. Only values are needed
  (:mod:`corda_kernels.ops.spectra`): no SVD with vectors per candidate.
* **Allocation** (progressive filtering): every layer starts with its ``k_l`` components;
  the candidate for filtering in layer ``l`` is its last remaining component ``j = k_l − p_l``
  with score ``a_l = log π_l · σ_{l,j} / Σ_{i<j} σ_{l,i}``; a heap filters one component at
  a time from the layer with the lowest ``a_l``. KPM: the filtered components are the
  adapters; stop as soon as ``Σ p_l·(m_l+n_l) ≥ budget`` (overshoot < one layer's width).
  IPM: the remaining ones are; stop as soon as ``Σ (k_l−p_l)·(m_l+n_l) ≤ budget``
  (undershoot < one layer's width). Budget for "rank r" = ``r·Σ_l (m_l+n_l)``.
  ``a_l`` of a layer's last component is ``+inf`` (``Σ_{i<1} = 0``): a layer goes to rank 0
  (IPM) or gives all it has (KPM) only after every finite candidate is used up.

Decisions:

* ``alpha_pattern``: PEFT scales an adapter by ``s_l = alpha_l / r_l`` (``/√r_l`` with rsLoRA).
  The user asked for ``s = alpha / r``; we keep ``s`` for every layer: ``alpha_l = alpha·r_l/r``
  (rsLoRA: ``alpha·√(r_l/r)``). For CorDA the product ``s·B·A`` does not depend on ``s`` (it is
  the kept part of the CO-SVD), but the training dynamics do, so they stay what was asked.
* Rank 0: PEFT rejects ``r = 0`` (``update_layer`` raises). A layer allocated rank 0 gets no
  adapter: it is left out of ``target_modules`` / ``rank_pattern`` / ``alpha_pattern`` and its
  weight stays ``W`` (IPM: its whole CO-SVD sits in the residual; KPM: nothing filtered).
* K = 1 (or ``select=False``): the only candidate is the all-rounds covariance, the very
  matrix plain CorDA uses, so with ``allocate=False`` the plan gives CorDA's adapters exactly.
* Memory: K candidates cost ``K·n²·4`` bytes per distinct layer input (the all-rounds
  covariance is their sum, no extra buffer): SmolLM2-135M (4 inputs per block, 30 blocks),
  K = 5: ≈2.0 GB; a 7B LLaMA (n = 4096 ×3, 11008 per block, 32 blocks), K = 5: ≈110 GB, so
  there pass ``CovarianceCollector(..., device="cpu")`` to keep them off the accelerator
  (each batch is accumulated on the activations' device and added in), or lower K. The plan
  itself keeps only the chosen candidates (≤ K per input, usually fewer).
* ``log π`` is assumed positive (``π > 1``), true for any realistic covariance (``λ_min`` is the
  damping floor, ``λ_max`` its ``≥ 1/damp`` multiple); it is not clamped, so a layer with
  ``π < 1`` would score negative and be filtered first, which is what "compact" means.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.cosvd import cosvd
from ..ops.damping import DampingError, damp_covariance
from ..ops.spectra import candidate_spectrum, compactness, eig_extremes_fast
from .calibration import CovarianceCollector
from .layers import linear_weight
from .pipeline import LayerResult, group_shared, which_for


# --------------------------------------------------------------------------------------------
# formulas
def truncation_bound(sigma: torch.Tensor, pi: float, r: int) -> float:
    """``σ_(r)·π``: the bound on the output shift from dropping the bottom ``r`` components.

    ``sigma`` is the descending ``(k,)`` spectrum of ``W·C_fix``; ``σ_(r) = sigma[k − r]`` (the
    largest discarded one). ``r = 0`` gives 0.
    """
    k = sigma.numel()
    if not 0 <= r <= k:
        raise ValueError(f"truncation_bound: r = {r} outside [0, {k}]")
    return 0.0 if r == 0 else float(sigma[k - r]) * pi


def selection_score(lam_min: float, lam_max: float, sigma_sum: float, sigma_max: float, m: int) -> float:
    """``log π(C) · Σσ / σ_max`` (lower is better)."""
    return math.log(compactness(lam_min, lam_max, m)) * sigma_sum / sigma_max


def filter_scores(sigma: torch.Tensor, log_pi: float) -> torch.Tensor:
    """Scores ``a`` ``(k,)`` float64 of the filtering candidates of one layer, by position.

    ``a[j−1] = log π · σ_j / Σ_{i<j} σ_i`` for ``j = 1..k`` (1-based, descending ``sigma``);
    ``a[0] = +inf``. Filtering visits ``j = k, k−1, …, 1``.
    """
    s = sigma.to(torch.float64).flatten()
    prefix = torch.cumsum(s, 0) - s  # Σ_{i<j} σ_i
    a = log_pi * s / prefix
    a[prefix <= 0] = math.inf
    return torch.nan_to_num(a, nan=math.inf, posinf=math.inf, neginf=-math.inf)


@dataclass
class LayerSpectrum:
    """What the allocation needs about one layer: descending ``sigma`` ``(k,)`` float64, ``log π``, width ``m+n``."""

    name: str
    sigma: torch.Tensor
    log_pi: float
    width: int


def progressive_filter(layers: Sequence[LayerSpectrum], budget: float, keep: str) -> dict[str, int]:
    """Progressive filtering (docs/design.md §5); returns the number ``p_l`` of filtered components per layer.

    ``keep="filtered"`` (KPM, truncation study): filter until ``Σ p_l·w_l ≥ budget``.
    ``keep="remaining"`` (IPM): filter until ``Σ (k_l − p_l)·w_l ≤ budget``.
    One heap operation per filtered component.
    """
    if keep not in ("filtered", "remaining"):
        raise ValueError(f"progressive_filter: keep must be 'filtered' or 'remaining', got {keep!r}")
    scores = [filter_scores(ly.sigma, ly.log_pi).tolist() for ly in layers]
    ks = [len(s) for s in scores]
    p = [0] * len(layers)
    heap = [(scores[i][ks[i] - 1], i) for i in range(len(layers)) if ks[i] > 0]
    heapq.heapify(heap)
    if keep == "filtered":
        total = 0.0

        def more() -> bool:
            return total < budget

        sign = 1
    else:
        total = float(sum(k * ly.width for k, ly in zip(ks, layers)))

        def more() -> bool:
            return total > budget

        sign = -1
    while heap and more():
        _, i = heapq.heappop(heap)
        p[i] += 1
        total += sign * layers[i].width
        j = ks[i] - p[i]  # 1-based position of the new last remaining component
        if j >= 1:
            heapq.heappush(heap, (scores[i][j - 1], i))
    return {ly.name: p[i] for i, ly in enumerate(layers)}


def allocate_ranks(layers: Sequence[LayerSpectrum], rank: int, corda_method: str) -> dict[str, int]:
    """Per-layer ranks for budget ``rank·Σ_l w_l``: KPM = filtered count, IPM = remaining count (may be 0)."""
    which = which_for(corda_method)
    budget = rank * sum(ly.width for ly in layers)
    if which == "bottom":
        return progressive_filter(layers, budget, "filtered")
    p = progressive_filter(layers, budget, "remaining")
    return {ly.name: ly.sigma.numel() - p[ly.name] for ly in layers}


def discard_pattern(layers: Sequence[LayerSpectrum], discard: int) -> dict[str, int]:
    """Components to discard per layer at the parameter budget of discarding ``discard`` everywhere.

    Budget ``Σ_l min(discard, k_l)·w_l`` (CO-SVD+ / CO-SVD++ in the truncation study).
    """
    budget = sum(min(discard, ly.sigma.numel()) * ly.width for ly in layers)
    if budget == 0:
        return {ly.name: 0 for ly in layers}
    return progressive_filter(layers, budget, "filtered")


def alpha_for(alpha: float, rank: int, r_l: int, use_rslora: bool = False) -> float:
    """``alpha_l`` that keeps PEFT's scaling of a rank-``r_l`` layer equal to that of rank ``rank``."""
    return alpha * math.sqrt(r_l / rank) if use_rslora else alpha * r_l / rank


# --------------------------------------------------------------------------------------------
# the plan
@dataclass
class DynamicPlan:
    """CorDA++ decisions for a set of layers.

    ``choice[name]``: index of the chosen candidate (``-1`` = the all-rounds covariance, used
    when ``select`` is off or K = 1). ``ranks[name]``: every layer's rank (0 allowed);
    ``rank_pattern`` / ``alpha_pattern`` hold only layers with rank > 0 (PEFT module names).
    ``rows``: one dict per layer for ``report.json``. ``timings``: seconds per stage.
    :meth:`c_fix` / :meth:`covariance`: a layer's chosen damped / raw covariance ``(n, n)`` float32.
    """

    corda_method: str
    rank: int
    alpha: float
    use_rslora: bool
    rounds: int
    choice: dict[str, int]
    ranks: dict[str, int]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rows: list[dict]
    timings: dict[str, float]
    damp: dict[str, float]
    _c_fix: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _cov: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _key: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    @property
    def target_modules(self) -> list[str]:
        """Layers that get an adapter (rank > 0), in calibration order."""
        return [n for n, r in self.ranks.items() if r > 0]

    def c_fix(self, name: str) -> torch.Tensor:
        """The chosen damped covariance of layer ``name``, ``(n, n)`` float32."""
        return self._c_fix[self._key[name]]

    def covariance(self, name: str) -> torch.Tensor:
        """The chosen covariance (before damping) of layer ``name``, ``(n, n)`` float32.

        Layers that chose the same candidate of the same input get the same tensor object, so
        :func:`corda_kernels.engine.pipeline.decompose_layers` damps it once.
        """
        return self._cov[self._key[name]]

    def covariances(self) -> dict[str, torch.Tensor]:
        """``{name: chosen covariance}`` for every layer (see :meth:`covariance`)."""
        return {n: self.covariance(n) for n in self.ranks}

    def lora_config_kwargs(self) -> dict:
        """``LoraConfig`` keyword arguments: ``r``, ``lora_alpha``, ``target_modules``, patterns, rsLoRA."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": self.target_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
        }

    def scaling(self, name: str) -> float:
        """PEFT's scaling of layer ``name`` with its pattern (equal to the user's ``alpha/r`` by design)."""
        r_l = self.ranks[name]
        a_l = self.alpha_pattern.get(name, self.alpha)
        return a_l / math.sqrt(r_l) if self.use_rslora else a_l / r_l


def plan_dynamic(
    modules: dict[str, nn.Module],
    collector: CovarianceCollector,
    rank: int,
    alpha: float,
    corda_method: str,
    use_rslora: bool = False,
    *,
    select: bool = True,
    allocate: bool = True,
    spectrum_method: str = "gram",
    progress: bool = True,
) -> DynamicPlan:
    """CorDA++ for ``modules`` (name → ``nn.Linear``/``Conv1D``) after calibration with ``collector``.

    ``select``: pick each layer's best of the collector's K round covariances (``K = 1`` or
    ``select=False``: the all-rounds covariance). ``allocate``: dynamic ranks at the budget of
    ``rank`` everywhere (else ``rank`` everywhere). See :func:`plan_from_covariances`.
    """
    collector.finalize()
    missing = [n for n in modules if n not in collector.acc_of]
    if missing:
        raise ValueError(f"plan_dynamic: layer(s) {', '.join(missing[:5])} are not calibrated by this collector")
    covs: dict[str, torch.Tensor] = {}
    cands: dict[str, torch.Tensor] = {}
    for acc in collector.accumulators():
        members = [m for m in acc.members if m in modules]
        if not members:
            continue
        covs.update(dict.fromkeys(members, collector.covariance(members[0])))
        if select and collector.rounds > 1:
            cands.update(dict.fromkeys(members, collector.candidates(members[0])))
    return plan_from_covariances(
        modules,
        covs,
        cands or None,
        rank,
        alpha,
        corda_method,
        use_rslora,
        allocate=allocate,
        spectrum_method=spectrum_method,
        progress=progress,
    )


def plan_from_covariances(
    modules: dict[str, nn.Module],
    covariances: dict[str, torch.Tensor],
    candidates: dict[str, torch.Tensor] | None,
    rank: int,
    alpha: float,
    corda_method: str,
    use_rslora: bool = False,
    *,
    allocate: bool = True,
    spectrum_method: str = "gram",
    progress: bool = True,
) -> DynamicPlan:
    """CorDA++ from covariance maps: ``covariances[name]`` ``(n, n)`` (the all-rounds one) and,
    for selection, ``candidates[name]`` ``(K, n, n)`` float32. Layers sharing an input share the
    *same tensor objects* (as :meth:`CovarianceCollector.covariances` gives them), so each input
    is damped and its ``λ``'s computed once per candidate. ``candidates=None`` (or K = 1): no
    selection, the all-rounds covariance for every layer.

    Cost per layer and candidate: one float64 product ``W·C_fix`` and one ``eigvalsh`` of the
    smaller Gram; per input and candidate: one damping search and one ``eigvalsh`` of ``C_fix``.
    """
    which_for(corda_method)
    if rank < 1:
        raise ValueError(f"plan_dynamic: rank must be >= 1, got {rank}")
    missing = [n for n in modules if n not in covariances or (candidates is not None and n not in candidates)]
    if missing:
        raise ValueError(f"plan_dynamic: no covariance for layer(s) {', '.join(missing[:5])}")
    t_start = time.perf_counter()
    timings = {"damping_s": 0.0, "spectra_s": 0.0, "selection_s": 0.0, "allocation_s": 0.0}
    groups = group_shared({n: covariances[n] for n in modules})
    K = 1 if candidates is None else int(candidates[groups[0][1][0]].shape[0])
    choice: dict[str, int] = {}
    damp: dict[str, float] = {}
    spectra = {}
    all_scores: dict[str, list[float]] = {}
    c_fix: dict[tuple[int, int], torch.Tensor] = {}
    chosen_cov: dict[tuple[int, int], torch.Tensor] = {}
    key: dict[str, tuple[int, int]] = {}
    bar = tqdm(total=len(modules), desc="CorDA++ spectra", unit="layer", disable=not progress)
    for g_idx, (C_all, members) in enumerate(groups):
        t0 = time.perf_counter()
        covs = C_all.unsqueeze(0) if K == 1 else candidates[members[0]]
        if any(candidates is not None and candidates[m] is not candidates[members[0]] for m in members):
            raise ValueError(f"layers {', '.join(members)} share a covariance but not their candidates")
        try:
            C_fix, damps, _ = damp_covariance(covs.float())
        except DampingError as err:
            raise DampingError(err.index, f"layer(s) {', '.join(members)}, candidate {err.index}: {err}") from err
        t1 = time.perf_counter()
        lo, hi, _ = eig_extremes_fast(C_fix)  # Lanczos: ≤ 3e-5 relative on real covariances
        timings["damping_s"] += t1 - t0
        timings["spectra_s"] += time.perf_counter() - t1
        for name in members:
            t2 = time.perf_counter()
            W = linear_weight(modules[name]).detach()
            specs = [
                candidate_spectrum(W, C_fix[i], extremes=(float(lo[i]), float(hi[i])), method=spectrum_method)
                for i in range(C_fix.shape[0])
            ]
            t3 = time.perf_counter()
            scores = [s.score for s in specs]
            best = min(range(len(scores)), key=scores.__getitem__)
            timings["spectra_s"] += t3 - t2
            timings["selection_s"] += time.perf_counter() - t3
            choice[name] = best if K > 1 else -1
            all_scores[name] = scores
            spectra[name] = specs[best]
            damp[name] = float(damps[best])
            key[name] = (g_idx, best)
            if key[name] not in c_fix:
                c_fix[key[name]] = C_fix[best].clone()
                chosen_cov[key[name]] = covs[best]
            bar.update(1)
        del C_fix
    bar.close()
    names = list(modules)
    t4 = time.perf_counter()
    shapes = {n: tuple(linear_weight(modules[n]).shape) for n in names}
    if allocate:
        layers = [LayerSpectrum(n, spectra[n].sigma, math.log(spectra[n].compactness), sum(shapes[n])) for n in names]
        ranks = allocate_ranks(layers, rank, corda_method)
    else:
        ranks = {n: rank for n in names}
        for n in names:
            if rank > min(shapes[n]):
                raise ValueError(f"layer {n}: rank {rank} exceeds min(m, n) = {min(shapes[n])}")
    timings["allocation_s"] = time.perf_counter() - t4
    rank_pattern = {n: r for n, r in ranks.items() if r > 0}
    alpha_pattern = {n: alpha_for(alpha, rank, r, use_rslora) for n, r in rank_pattern.items()}
    rows = []
    for n in names:
        sp = spectra[n]
        pi = sp.compactness
        rows.append(
            {
                "name": n,
                "shape": list(shapes[n]),
                "candidate": choice[n],
                "scores": all_scores[n],
                "rank": ranks[n],
                "alpha": alpha_pattern.get(n, 0.0),
                "damp": damp[n],
                "lambda_min": sp.lam_min,
                "lambda_max": sp.lam_max,
                "compactness": pi,
                "log_compactness": math.log(pi),
                "sigma_max": sp.sigma_max,
                "sigma_sum": sp.sigma_sum,
                # bound on the output shift of dropping the bottom r_l components (KPM: the adapters)
                "bound_bottom_r": truncation_bound(sp.sigma, pi, ranks[n]),
            }
        )
    timings["total_s"] = time.perf_counter() - t_start
    return DynamicPlan(
        corda_method=corda_method,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        rounds=K,
        choice=choice,
        ranks={n: ranks[n] for n in names},
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        rows=rows,
        timings=timings,
        damp=damp,
        _c_fix=c_fix,
        _cov=chosen_cov,
        _key=key,
    )


def decompose_plan(
    modules: dict[str, nn.Module], plan: DynamicPlan, *, method: str = "exact", progress: bool = True
) -> Iterator[LayerResult]:
    """Yield the cropped CO-SVD of every layer with rank > 0 under its chosen covariance.

    IPM: top ``r_l``, KPM: bottom ``r_l`` triplets (``LayerResult`` as in :mod:`pipeline`).
    Build each adapter with scaling :meth:`DynamicPlan.scaling` (the user's ``alpha/r``).
    """
    which = which_for(plan.corda_method)
    targets = plan.target_modules
    for name in tqdm(targets, desc="CO-SVD", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        W = linear_weight(modules[name]).detach()
        C = plan.c_fix(name)
        r = plan.ranks[name]
        U, S, V = cosvd(W, C, rank=r, which=which, C_fix=C, method=method)
        info = {
            "shape": list(W.shape),
            "rank": r,
            "damp": plan.damp[name],
            "candidate": plan.choice[name],
            "method": method,
            "time_s": time.perf_counter() - t0,
        }
        yield LayerResult(name, U, S, V, plan.damp[name], info)
