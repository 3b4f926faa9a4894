"""``corda-kernels init``: CorDA adapters for a model, end to end.

Stages (each timed in ``report.json``): load the model and text, calibrate (covariances of
every target layer, cached atomically in ``OUT/covariance.pt`` so a rerun resumes), decompose
(damped inverse + CO-SVD + adapters, one layer at a time, progress saved in
``OUT/.partial.pt``), export (the residual model with ``save_pretrained`` and a PEFT adapter
directory that ``PeftModel.from_pretrained`` loads onto it), verify (logits after init equal
the original's).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import cache, data, stages
from ..engine.adapters import lora_scaling
from ..engine.layers import in_features, linear_weight, target_modules
from ..engine.pipeline import check_ranks

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class InitOptions:
    """Options of ``corda-kernels init`` (the CLI's flags, one to one)."""

    model: str = data.DEFAULT_MODEL
    data: str = "lee"
    mode: str = "ipm"
    rank: int = 16
    alpha: float | None = None  # default: the rank (scaling 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    normalization: str = "peft"
    method: str = "fast"
    damping_screen: bool = True
    rslora: bool = False
    dynamic: bool = False
    rounds: int = 5
    quantize: str = "none"
    out: str = "corda-out"
    progress: bool = True
    verify_tokens: int = 64

    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class Report:
    options: dict
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(report: Report, name: str):  # noqa: ANN201
    t0 = time.perf_counter()
    yield
    report.stages[name] = round(time.perf_counter() - t0, 3)


def lora_config(
    opts: InitOptions,
    *,
    corda: bool = True,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    targets: list[str] | None = None,
):  # noqa: ANN201
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    kw: dict[str, Any] = {}
    if corda:
        kw = {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method=opts.mode)}
    return LoraConfig(
        r=opts.rank,
        lora_alpha=opts.lora_alpha(),
        target_modules=list(targets or opts.targets),
        use_rslora=opts.rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        **kw,
    )


def covariance_meta(
    opts: InitOptions, model: nn.Module, targets: dict[str, nn.Module], ids: torch.Tensor, rounds: int
) -> dict[str, Any]:
    """What the covariances depend on, by content: the model's weights (every parameter, sampled:
    :func:`~corda_kernels.engine.cache.fingerprint_tensors`), the calibration tokens, and the settings
    that change the sums. Paths are no part of it: the same model or text under another path is the
    same input, and new weights or text under the same path are not."""
    return {
        "model_weights": cache.fingerprint_tensors(dict(model.named_parameters())),
        "tokens": cache.fingerprint_ids(ids),
        "normalization": opts.normalization,
        "rounds": rounds,
        "in_features": {name: in_features(m) for name, m in targets.items()},
    }


def load_or_calibrate(model, targets, ids, opts: InitOptions, out: Path, meta: dict, rounds: int = 1):  # noqa: ANN001, ANN201
    """``{name: C}`` (shared tensors for shared inputs) and, with rounds > 1, ``{name: (K, n, n)}``."""
    path = out / "covariance.pt"
    if cache.exists(path):
        try:
            stored = cache.load_checked(path, "covariance", meta)
            return stored["covariances"], stored["candidates"]
        except cache.CacheMismatchError as err:  # other weights, tokens or settings: calibrate anew
            if opts.progress:
                print(f"corda-kernels init: recalibrating: {err}", file=sys.stderr)
    got = stages.collect(
        model,
        targets,
        ids,
        normalization=opts.normalization,
        rounds=rounds,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    cache.save_atomic(path, "covariance", meta, {"covariances": got.covariances, "candidates": got.candidates})
    return got.covariances, got.candidates


def run_init(opts: InitOptions) -> Report:
    """The whole job; returns (and writes) the report."""
    if opts.mode not in ("ipm", "kpm"):
        raise ValueError(f"--mode must be ipm or kpm, got {opts.mode!r}")
    if opts.quantize not in ("none", "nf4"):
        raise ValueError(f"--quantize must be none or nf4, got {opts.quantize!r}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(options=asdict(opts))

    with stage(report, "load"):
        model, tokenizer = data.load_model(opts.model)
        ids = data.token_blocks(tokenizer, data.load_text(opts.data), opts.samples, opts.seq_len)
        targets = target_modules(model, lora_config(opts))
        if not targets:
            raise ValueError(f"--targets {','.join(opts.targets)} matched no nn.Linear / Conv1D of the model")
        probe = ids[:1, : opts.verify_tokens]
        with torch.inference_mode():
            logits_before = model(probe).logits.float()

    rounds = opts.rounds if opts.dynamic else 1
    with stage(report, "calibrate"):
        key = covariance_meta(opts, model, targets, ids, rounds)
        covs, cands = load_or_calibrate(model, targets, ids, opts, out, key, rounds)

    with stage(report, "corda++") if opts.dynamic else contextlib.nullcontext():
        chosen = stages.plan(
            targets,
            stages.Covariances(covs, cands),
            rank=opts.rank,
            alpha=opts.lora_alpha(),
            mode=opts.mode,
            dynamic=opts.dynamic,
            rslora=opts.rslora,
            progress=opts.progress,
        )
    covs, ranks, alphas = chosen.covariances, chosen.ranks, chosen.alphas
    if opts.dynamic:
        report.extra["corda++"] = chosen.report
    targets = {name: m for name, m in targets.items() if ranks[name] > 0}
    check_ranks(targets, ranks)

    with stage(report, "decompose"):
        adapters = decompose_into(model, targets, covs, ranks, alphas, opts, out, report, key)

    with stage(report, "export"):
        peft_model = export(model, tokenizer, targets, adapters, ranks, alphas, opts, out, report)

    with stage(report, "verify"), torch.inference_mode():
        logits_after = peft_model(probe).logits.float()
        err = float((logits_after - logits_before).norm() / logits_before.norm())
        report.verify = {"tokens": int(probe.numel()), "logits_rel_err": err}
    report.peak_rss_mib = round(peak_rss_mib(), 1)
    write_report(report, out)
    (out / ".partial.pt").unlink(missing_ok=True)
    return report


def decompose_into(model, targets, covs, ranks, alphas, opts: InitOptions, out: Path, report: Report, key: dict):  # noqa: ANN001, ANN201
    """Per layer: CO-SVD, adapters, residual written into the model in place. Resumable."""
    partial = out / ".partial.pt"
    meta = {
        "mode": opts.mode,
        "ranks": ranks,
        "alphas": alphas,
        "method": opts.method,
        "rslora": opts.rslora,
        "covariance": key,
    }
    done: dict[str, dict] = {}
    if cache.exists(partial):
        try:
            done = cache.load_checked(partial, "partial-adapters", meta)
        except cache.CacheMismatchError:
            done = {}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, item in done.items():
        W = linear_weight(targets[name])
        stages.set_residual(targets[name], (W.float() - item["scaling"] * (item["B"] @ item["A"])).to(W.dtype))
        adapters[name] = (item["A"], item["B"])
        report.layers[name] = item["info"]
    todo = {name: m for name, m in targets.items() if name not in done}
    last_save = time.perf_counter()
    layers = stages.decompose(
        todo, covs, ranks, opts.mode, method=opts.method, screen=opts.damping_screen, progress=opts.progress
    )
    for res in layers:
        s = lora_scaling(alphas[res.name], ranks[res.name], opts.rslora)
        A, B, row = stages.build(targets[res.name], res, s, opts.mode)
        adapters[res.name] = (A, B)
        report.layers[res.name] = {**row, "alpha": alphas[res.name]}
        done[res.name] = {"A": A, "B": B, "scaling": s, "info": report.layers[res.name]}
        if time.perf_counter() - last_save > 20:
            cache.save_atomic(partial, "partial-adapters", meta, done)
            last_save = time.perf_counter()
    return adapters


def export(model, tokenizer, targets, adapters, ranks, alphas, opts: InitOptions, out: Path, report: Report):  # noqa: ANN001, ANN201
    """Residual model, PEFT adapter directory (and NF4 residuals); returns the PEFT model (for verification)."""
    if opts.quantize == "nf4":
        report.outputs["residual_nf4"] = str(stages.save_nf4_residual(targets, out / "residual_nf4.safetensors"))
    rank_pattern = {name: r for name, r in ranks.items() if name in targets and r != opts.rank}
    alpha_pattern = {name: a for name, a in alphas.items() if name in targets and a != opts.lora_alpha()}
    # Exact module names as targets: layers that CorDA++ left at rank 0 get no adapter.
    cfg = lora_config(
        opts, corda=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, targets=sorted(targets)
    )
    peft_model = stages.export(model, tokenizer, adapters, cfg, out)
    report.outputs.update({"residual": str(out / "residual"), "adapter": str(out / "adapter")})
    return peft_model


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an estimate that had no history yet) as ``None``:
    strict JSON has no ``Infinity``/``NaN``, which Python's ``json`` would otherwise write."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: Report, out: Path) -> Path:
    path = out / "report.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_json_safe(asdict(report)), indent=2, default=str, allow_nan=False))
    os.replace(tmp, path)
    return path
