"""The CorDA pipeline as its stages, top to bottom — the file to open first.

::

    model, calibration tokens
      │ collect      hooks on every target layer: one covariance per distinct input     (calibration.py)
      ▼
    covariances {layer: C (n, n)} (+ K candidates per layer for CorDA++)
      │ plan         CorDA++ only: per-layer covariance selection and rank allocation    (dynamic.py)
      ▼
    covariances, ranks, alphas
      │ decompose    damped inverse + CO-SVD, one damping chunk at a time (ops/damping, ops/cosvd)
      ▼
    triplets (U, S, V) per layer                                                        (pipeline.py)
      │ build        adapters A, B and the residual W − s·B·A written into the layer     (adapters.py)
      ▼
    adapted model (residual weights) + {layer: (A, B)}
      │ export       residual model (save_pretrained), PEFT adapter directory, NF4 residuals
      ▼
    files

Every stage is a function with typed inputs and outputs; the front ends (``corda-kernels init``
in :mod:`corda_kernels.cli.init`, the PEFT drop-in in :mod:`corda_kernels.peft`) add options,
caches, reports and resumption around them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.nf4 import nf4_quantize
from ..ops.spectra import compactness
from .adapters import build_adapter
from .cache import write_json_atomic
from .calibration import CovarianceCollector
from .dynamic import plan_from_covariances
from .layers import linear_weight
from .pipeline import LayerResult, decompose_layers


@dataclass
class Covariances:
    """What ``collect`` produces: ``{layer: (n, n)}`` (layers reading one input share one tensor)
    and, for CorDA++ (K rounds), ``{layer: (K, n, n)}`` candidates (empty when K = 1)."""

    covariances: dict[str, torch.Tensor]
    candidates: dict[str, torch.Tensor] = field(default_factory=dict)
    owners: dict[str, int] | None = None  # shared out over ranks: each layer's rank (the others hold none)


@dataclass
class Plan:
    """What the decomposition needs per layer: its covariance, rank and LoRA alpha."""

    covariances: dict[str, torch.Tensor]
    ranks: dict[str, int]
    alphas: dict[str, float]
    report: dict = field(default_factory=dict)  # CorDA++ rows and timings, empty for plain CorDA


def calibration_runner(model: nn.Module, targets: dict[str, nn.Module]) -> nn.Module:
    """The cheapest forward that reaches every target: the backbone alone when no target is outside it."""
    base = getattr(model, "base_model", model)
    if base is not model:
        inside = {id(m) for m in base.modules()}
        if all(id(m) in inside for m in targets.values()):
            return base
    return model


def collect(
    model: nn.Module,
    targets: dict[str, nn.Module],
    ids: torch.Tensor,
    *,
    normalization: str = "peft",
    rounds: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    share_out: bool = False,
) -> Covariances:
    """Run the calibration token ids ``(N, L)`` through ``model`` in batches with the hooks attached.

    ``shard=(rank, world)``: this rank runs sequences ``rank, rank + world, …`` (each in the round
    of its index among all ``N``) and the sums are added over the ranks of the current
    ``torch.distributed`` group, so every rank gets the covariances of all ``N`` sequences; with
    ``share_out`` each covariance reaches only the rank that will decompose its layers
    (:func:`~corda_kernels.engine.pipeline.layer_owners`, returned in ``owners``), and this rank's
    share is returned.
    """
    collector = CovarianceCollector(
        targets,
        normalization=normalization,
        rounds=rounds,
        sum_over_ranks=shard is not None,
        share_out=share_out and shard is not None,
    )
    runner = calibration_runner(model, targets)
    index = torch.arange(ids.shape[0])
    if shard is not None:
        index = index[shard[0] :: shard[1]]
    batches = list(torch.split(index, batch_size))
    with collector.attached(), torch.no_grad():  # accumulators must stay normal tensors
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            collector.set_batch(torch.ones(len(batch), ids.shape[1], dtype=torch.bool), rounds=batch % rounds)
            runner(input_ids=ids[batch], use_cache=False)
    candidates: dict[str, torch.Tensor] = {}
    if rounds > 1:
        collector.finalize()
        for acc in collector.accumulators():
            if acc.C is None:  # held by another rank
                continue
            candidates.update(dict.fromkeys(acc.members, collector.candidates(acc.members[0])))
    return Covariances(collector.covariances(), candidates, collector.owners)


def plan(
    targets: dict[str, nn.Module],
    calibration: Covariances,
    *,
    rank: int,
    alpha: float,
    mode: str,
    dynamic: bool = False,
    rslora: bool = False,
    progress: bool = True,
) -> Plan:
    """Every target at ``rank`` and ``alpha`` (CorDA), or CorDA++'s per-layer choice (``dynamic``).

    CorDA++ chooses one candidate covariance per layer and allocates ranks within the budget of
    ``rank`` for every layer; layers it leaves at rank 0 stay in the maps (the caller drops them).
    Its alphas keep every layer's scaling (``alpha·r_l/r``, rsLoRA ``alpha·√(r_l/r)``).
    """
    if not dynamic:
        return Plan(calibration.covariances, dict.fromkeys(targets, rank), dict.fromkeys(targets, float(alpha)))
    dyn = plan_from_covariances(
        targets, calibration.covariances, calibration.candidates or None, rank, alpha, mode, rslora, progress=progress
    )
    alphas = {n: dyn.alpha_pattern.get(n, float(alpha)) for n in dyn.ranks}
    report = {
        "rounds": dyn.rounds,
        "budget_params": rank * sum(sum(linear_weight(m).shape) for m in targets.values()),
        "used_params": sum(dyn.ranks[n] * sum(linear_weight(m).shape) for n, m in targets.items()),
        "layers_rank0": [n for n, r in dyn.ranks.items() if r == 0],
        "alpha_rule": "alpha_l = alpha*r_l/r (rsLoRA: alpha*sqrt(r_l/r)): every layer keeps the scaling asked for",
        "timings_s": dyn.timings,
        "layers": dyn.rows,
    }
    return Plan(dyn.covariances(), dict(dyn.ranks), alphas, report)


def decompose(
    targets: dict[str, nn.Module],
    covariances: dict[str, torch.Tensor],
    ranks: dict[str, int],
    mode: str,
    *,
    method: str = "fast",
    screen: bool = True,
    progress: bool = True,
    world: int = 1,
) -> Iterator[LayerResult]:
    """Each layer's cropped CO-SVD (IPM: top ``r``, KPM: bottom ``r``) with its λ extremes, as it is done
    (``targets``: this rank's share of ``world``, :func:`~corda_kernels.engine.pipeline.layer_owners`)."""
    yield from decompose_layers(
        targets,
        covariances,
        ranks,
        mode,
        method=method,
        progress=progress,
        extremes=True,
        screen=screen,
        world=world,
    )


def build(module: nn.Module, result: LayerResult, scaling: float, mode: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Adapters ``(A (r, n), B (m, r))`` of one layer; its weight becomes the residual ``W − s·B·A``.

    Returns them with the layer's report row: the decomposition's info, the compactness
    ``π(C_fix)`` and, for KPM, the truncation bound ``σ_(r)·π`` of the frozen bottom ``r``.
    """
    A, B, W_res = build_adapter(linear_weight(module).detach(), result.U, result.S, result.V, scaling)
    set_residual(module, W_res)
    lo, hi = result.info["lambda_min"], result.info["lambda_max"]
    row = {**result.info, "scaling": scaling, "compactness": compactness(lo, hi, result.U.shape[0])}
    if mode == "kpm":  # the adapters are the bottom r: σ_(r) is the largest of them
        row["truncation_bound"] = float(result.S.max()) * row["compactness"]
    return A, B, row


def set_residual(module: nn.Module, W_res: torch.Tensor) -> None:
    """Write ``W_res`` ``(out, in)`` into the layer (a view: Conv1D's ``(in, out)`` storage is written transposed)."""
    linear_weight(module).data.copy_(W_res)


def attach_adapters(
    model: nn.Module,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    lora_config,  # noqa: ANN001  (peft.LoraConfig naming the adapted layers exactly)
) -> nn.Module:
    """A PEFT model around ``model`` (its weights already the residuals) whose LoRA weights are
    ``adapters`` ``{layer: (A (r, n), B (m, r))}``: the adapted model computes the original's function."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    layers = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, (A, B) in adapters.items():
            layer = layers[f"base_model.model.{name}"]
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    return peft_model


def export(
    model: nn.Module,
    tokenizer,  # noqa: ANN001
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    lora_config,  # noqa: ANN001  (peft.LoraConfig naming the adapted layers exactly)
    out: Path,
    base_model: Path | None = None,
) -> nn.Module:
    """``out/residual`` (the model, its weights now residuals, with the tokenizer) and ``out/adapter``
    (a PEFT adapter directory naming the residual as its base model: ``base_model``, where the
    residual will finally live, by default ``out/residual``). Returns the PEFT model."""
    residual_dir, adapter_dir = out / "residual", out / "adapter"
    model.save_pretrained(residual_dir)
    tokenizer.save_pretrained(residual_dir)
    # get_peft_model names the model's own name_or_path as the adapter's base model: the residual
    # directory, which is what the adapter must be loaded onto (PEFT reads its config while saving)
    model.name_or_path = str(residual_dir.resolve())
    peft_model = attach_adapters(model, adapters, lora_config)
    peft_model.save_pretrained(adapter_dir)
    if base_model is not None:  # where the residual will finally live
        config_path = adapter_dir / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(base_model)
        write_json_atomic(config_path, config, indent=2, sort_keys=True)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_model)
    return peft_model


def save_nf4_residual(targets: dict[str, nn.Module], path: Path) -> Path:
    """QCorDA: every target's residual in bitsandbytes NF4 (packed bytes + QuantState) as safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, module in targets.items():
        W_res = linear_weight(module).detach().contiguous()  # (out, in), as Linear4bit stores it
        packed, state = nf4_quantize(W_res, blocksize=64, compress_statistics=False)
        tensors[f"{name}.weight"] = packed
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{name}.weight.{key}"] = value
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path
