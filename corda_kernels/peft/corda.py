"""Drop-in replacement for PEFT's ``preprocess_corda``.

``preprocess_corda(model, lora_config, run_model, hooked_model)`` takes PEFT's arguments and
leaves every target module with the ``eigens`` PEFT's own function leaves (cropped ``U_WC``,
``S_WC``, ``V_WC``), so ``peft.get_peft_model(model, lora_config)`` works unchanged and gives
the same adapters (up to the sign of each singular pair). Differences from PEFT: any batch
size (announce padding with :func:`set_calibration_mask`), one covariance per distinct input
accumulated from buffered tokens (one GEMM per few hundred tokens, not one per call), the
certified fast CO-SVD (its singular values agree with a float64 SVD to ~1e-7 where PEFT's
float32 SVD is off by up to 48% at the bottom; ``method="exact"`` takes a full float64 SVD),
per-layer cropping (no full U/V for all layers), and caches that record and check their
settings and are written atomically. PEFT's observable behaviour is kept: its damping
decision, its sample counts (a layer called twice on one tensor counts two samples) and the
temporary fields it leaves with ``prune_temporary_fields=False``.

Under ``torch.distributed`` (``torchrun``) with several ranks, each rank's ``run_model`` feeds its
own shard of the calibration data; each covariance is summed over the ranks onto the rank that
decomposes its layers (the layers shared out by cost), so a rank holds about 1/world of them, and
every rank ends with every layer's ``eigens``, the same on all ranks. With a ``covariance_file``
to write or ``prune_temporary_fields=False`` every rank receives every covariance. Only rank 0
writes the caches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..engine import cache, distributed
from ..engine.calibration import CovarianceCollector
from ..engine.layers import in_features, linear_weight, target_modules
from ..engine.offload import Offload
from ..engine.pipeline import check_ranks, decompose_layers, layer_owners, share_results

weights_key = cache.fingerprint_model  # the content key of the weights the drop-in's caches record

_ACTIVE: list[CovarianceCollector] = []


def set_calibration_mask(mask: torch.Tensor | None) -> None:
    """Inside ``run_model``: the padding mask ``(B, L)`` of the next forward (True = real token)."""
    if not _ACTIVE:
        raise RuntimeError("set_calibration_mask is only meaningful inside preprocess_corda's run_model")
    _ACTIVE[-1].set_batch(mask)


def layer_ranks(lora_config, names: list[str]) -> dict[str, int]:  # noqa: ANN001
    """Each layer's rank: ``rank_pattern`` where a key matches, else ``r`` (PEFT's rule)."""
    from peft.utils.other import get_pattern_key

    pattern = lora_config.rank_pattern or {}
    return {name: pattern.get(get_pattern_key(pattern.keys(), name), lora_config.r) for name in names}


def _eigens_class():  # noqa: ANN202
    from peft.tuners.lora.corda import CordaEigens

    return CordaEigens


def collect_covariances(
    model: nn.Module,
    lora_config,  # noqa: ANN001
    run_model: Callable[[], None] | None,
    hooked_model: nn.Module | None,
    targets: dict[str, nn.Module],
    *,
    normalization: str = "peft",
    share_inputs: bool = True,
    counts: dict[str, int] | None = None,
    model_weights: str | None = None,
    owners: dict[str, int] | None = None,
    covariance_device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Covariances of the target layers: from ``covariance_file`` when it matches, else by calibration.

    ``counts``, when given, receives each target's number of calibration calls (PEFT's ``sample_count``);
    ``model_weights`` is the running model's :func:`weights_key` when the caller already has it.
    Under ``torch.distributed`` with several ranks the calibration is summed over the ranks; when
    ``owners`` is given (and no ``covariance_file`` is to be written) each rank keeps only the
    covariances of the layers it decomposes, and ``owners`` receives every layer's rank.
    ``covariance_device`` is where the sums accumulate (default: each layer's input device).
    """
    cov_file = lora_config.corda_config.covariance_file
    meta = {
        "normalization": normalization,
        "float16": bool(lora_config.corda_config.use_float16_for_covariance),
        "in_features": {name: in_features(m) for name, m in targets.items()},
        # the activations depend on every weight of the model that runs (the calibration data
        # behind run_model cannot be keyed: a covariance file stands for the data it was made from)
        "model_weights": model_weights or weights_key(model if hooked_model is None else hooked_model),
    }
    if cache.exists(cov_file):
        return cache.load_checked(cov_file, "covariance", meta)
    if run_model is None:
        raise ValueError("run_model must be given when neither cache_file nor covariance_file exists yet")
    hooked = model if hooked_model is None else hooked_model
    hooked_targets = targets if hooked_model is None else target_modules(hooked, lora_config)
    share_out = owners is not None and cov_file is None and distributed.active()
    collector = CovarianceCollector(
        hooked_targets,
        normalization=normalization,
        share_inputs=share_inputs,
        share_out=share_out,
        device=covariance_device,
    )
    was_training = hooked.training
    hooked.eval()
    _ACTIVE.append(collector)
    try:
        with collector.attached():
            run_model()
    finally:
        _ACTIVE.pop()
        hooked.train(was_training)
    found = collector.covariances()
    missing = [name for name in targets if name not in collector.acc_of]
    if missing:
        raise ValueError(f"calibration never reached target layer(s) {', '.join(missing[:5])}")
    if share_out:
        owners.update(collector.owners)
    covs = {name: found[name].cpu() for name in targets if name in found}
    if lora_config.corda_config.use_float16_for_covariance:
        covs = _as_float16(covs)
    if counts is not None:
        counts.update({name: collector.calls[name] for name in targets})
    if cov_file is not None:
        _save_on_rank0(cov_file, "covariance", meta, covs)
    return covs


def _save_on_rank0(path: str, kind: str, meta: dict, data: dict) -> None:
    """Write a cache from rank 0 only (every rank holds the same data), the others waiting for it."""
    rank, _ = distributed.rank_and_world()
    if rank == 0:
        cache.save_atomic(path, kind, meta, data)
    if distributed.active():
        torch.distributed.barrier()


def _as_float16(covs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``use_float16_for_covariance``: the finished covariances held (and cached) in float16,
    shared tensors staying shared. Accumulation stays float32: a float16 running sum of PEFT's
    normalized products overflows past ~65k tokens."""
    half: dict[int, torch.Tensor] = {}
    return {name: half.setdefault(id(C), C.half()) for name, C in covs.items()}


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config,  # noqa: ANN001
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
    *,
    normalization: str = "peft",
    method: str = "fast",
    share_inputs: bool = True,
    damping_screen: bool = True,
    covariance_device: str | torch.device | None = None,
) -> None:
    """Build the CorDA ``eigens`` of every target module (PEFT's ``preprocess_corda`` arguments).

    Keyword-only extras: ``normalization`` (``peft`` = PEFT's per-sequence max, or ``mean``),
    ``method`` of the CO-SVD (``fast``: certified top/bottom-r triplets, falling back to the
    exact SVD where a layer cannot be certified; ``exact``: a full float64 SVD per layer, the
    reference), ``share_inputs`` (one covariance per distinct input tensor), ``damping_screen``
    (``False``: the literal damping check at every step; the damp is the same,
    :mod:`corda_kernels.ops.damping`), ``covariance_device`` (where the covariances accumulate
    during calibration; default each layer's input device, ``"cpu"`` keeps them off the GPUs at
    one device-to-host copy of an ``n×n`` sum per 512 buffered tokens). Each damping unit is
    decomposed on the device its first layer runs on. ``CordaConfig``'s fields are honoured: ``cache_file`` and
    ``covariance_file`` (our own format, which records and checks the settings),
    ``corda_method``, ``verbose`` (progress bars), ``prune_temporary_fields`` (``False`` leaves
    ``sample_count``, ``covariance_matrix``, ``corda_method`` and ``rank`` on each target, as
    PEFT does) and ``use_float16_for_covariance`` (covariances held and cached in float16 once
    accumulated).
    """
    cfg = lora_config.corda_config
    if cfg is None:
        raise ValueError(
            "lora_config.corda_config must be set (LoraConfig(init_lora_weights='corda', corda_config=...))"
        )
    targets = target_modules(model, lora_config)
    if not targets:
        raise ValueError(
            f"no target module matched target_modules={lora_config.target_modules!r} (CorDA needs nn.Linear or Conv1D)"
        )
    if cfg.corda_method not in ("ipm", "kpm"):
        raise ValueError(f"corda_method must be 'ipm' or 'kpm', got {cfg.corda_method!r}")
    ranks = layer_ranks(lora_config, list(targets))
    check_ranks(targets, ranks)
    meta = {
        "corda_method": cfg.corda_method,
        "ranks": ranks,
        "normalization": normalization,
        "method": method,
        "shapes": {name: list(linear_weight(m).shape) for name, m in targets.items()},
        "model_weights": weights_key(model if hooked_model is None else hooked_model),  # once per call
    }
    CordaEigens = _eigens_class()
    offload = Offload(model)

    def attach(name: str, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        dev = offload.device(name, targets[name])
        targets[name].eigens = CordaEigens(S_WC=S.to(dev), U_WC=U.to(dev), V_WC=V.to(dev))

    launched = distributed.launched_without_group()
    if launched:
        warnings.warn(
            f"WORLD_SIZE={launched} but no torch.distributed process group is "
            "initialized: this process calibrates and decomposes alone, on what its run_model feeds "
            "(call torch.distributed.init_process_group() first to sum the ranks' shards)",
            stacklevel=2,
        )
    if distributed.active():  # a rank that skips calibration while others run it would wait forever
        distributed.check_same(
            {"cache_file": cache.exists(cfg.cache_file), "covariance_file": cache.exists(cfg.covariance_file)},
            "which of the caches exist (every rank must see the same files)",
        )
    if cache.exists(cfg.cache_file):
        data = cache.load_checked(cfg.cache_file, "eigens", meta)
        for name in targets:
            attach(name, *data[name])
        return

    rank, world = distributed.rank_and_world()
    counts: dict[str, int] = {}
    # several ranks: each keeps only the covariances it decomposes, unless PEFT's fields need them all
    owners: dict[str, int] | None = {} if world > 1 and cfg.prune_temporary_fields else None
    covs = collect_covariances(
        model,
        lora_config,
        run_model,
        hooked_model,
        targets,
        normalization=normalization,
        share_inputs=share_inputs,
        counts=counts,
        model_weights=meta["model_weights"],
        owners=owners,
        covariance_device=covariance_device,
    )
    if world > 1 and not owners:  # every covariance here (from a file, or for PEFT's fields)
        owners = layer_owners(targets, covs, world)
    mine = targets if world == 1 else {name: m for name, m in targets.items() if owners[name] == rank}
    layers = decompose_layers(
        mine,
        covs,
        ranks,
        cfg.corda_method,
        method=method,
        progress=bool(cfg.verbose) and rank == 0,
        screen=damping_screen,
        offload=offload,
        world=world,
    )
    if world > 1:  # each rank decomposed its share: every layer's triplets from its owner
        layers = share_results(layers, targets, ranks, owners)
    stored: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for res in layers:
        attach(res.name, res.U, res.S, res.V)
        if cfg.cache_file is not None:
            stored[res.name] = (res.U, res.S, res.V)
    if not cfg.prune_temporary_fields:  # what PEFT leaves behind when asked not to prune
        for name, module in targets.items():
            if name in counts:  # PEFT sets it only when it calibrated (not from a covariance file)
                module.sample_count = counts[name]
            module.covariance_matrix = covs[name].to(offload.device(name, module))
            module.corda_method = cfg.corda_method
            module.rank = ranks[name]
    if cfg.cache_file is not None:
        _save_on_rank0(cfg.cache_file, "eigens", meta, stored)
