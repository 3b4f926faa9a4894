"""The three fine-tuning experiments, over methods × seeds, resumable, with tables and plots.

* ``knowledge`` (the paper's Table I): calibrate KPM on the knowledge text (Lee), fine-tune on the
  task (pydoc); held-out perplexity on both before and after, for LoRA, PiSSA, CorDA-KPM,
  CorDA++-KPM and full fine-tuning.
* ``convergence`` (Fig. 8): calibrate IPM on the task and fine-tune on it; loss curves of LoRA,
  PiSSA, CorDA-IPM, CorDA++-IPM, steps to reach a loss level, final held-out perplexity.
* ``quantized`` (Table VI): QLoRA, LoftQ, QPiSSA, QCorDA: the initial error of the quantized
  adapted model against the original (per layer ‖W − (deq(W_res) + s·B·A)‖ / ‖W‖, and the logits),
  then the same fine-tuning.

Splits (token windows of ``seq_len``, never overlapping): the task's training windows come first
(IPM calibrates on the first of them, as the paper calibrates on task samples), its held-out
windows after them; the knowledge text's first windows calibrate KPM and the held-out knowledge
windows come after those. Training never sees the knowledge text. Each run is one JSON file under
``out/runs/``, written atomically; a finished run is skipped when the command is repeated.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine.cache import write_json_atomic
from ..engine.layers import linear_weight
from .methods import QUANTIZED, Budget, adapt, trainable_parameters
from .train import Schedule, perplexity, steps_to_reach, train

EXPERIMENTS = {
    "knowledge": ("lora", "pissa", "corda-kpm", "corda++-kpm", "full"),
    "convergence": ("lora", "pissa", "corda-ipm", "corda++-ipm"),
    "quantized": ("qlora", "loftq", "qpissa", "qcorda"),
}
BASELINE = {"knowledge": "lora", "convergence": "lora", "quantized": "qlora"}


@dataclass
class Settings:
    experiment: str
    model: str = "smollm2"
    task: str = "pydoc"
    knowledge: str = "lee"
    seq_len: int = 64
    calibration_samples: int = 32
    eval_samples: int = 16
    budget: Budget = field(default_factory=Budget)
    schedule: Schedule = field(default_factory=Schedule)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Data:
    train: torch.Tensor
    calibration: dict[str, torch.Tensor]
    eval_task: torch.Tensor
    eval_knowledge: torch.Tensor


def split(settings: Settings, tokenize: Callable[[str, int, int], torch.Tensor]) -> Data:
    """The token windows of every split; ``tokenize(text_name, n, offset)`` gives ``(n, seq_len)`` ids."""
    n_train = settings.schedule.steps * settings.schedule.batch_size
    n_cal, n_eval = settings.calibration_samples, settings.eval_samples
    train_ids = tokenize(settings.task, n_train, 0)
    return Data(
        train=train_ids,
        calibration={"task": train_ids[:n_cal], "knowledge": tokenize(settings.knowledge, n_cal, 0)},
        eval_task=tokenize(settings.task, n_eval, n_train),
        eval_knowledge=tokenize(settings.knowledge, n_eval, n_cal),
    )


def _target_weights(model: nn.Module, budget: Budget) -> dict[str, torch.Tensor]:
    from ..engine.layers import target_modules

    return {
        n: linear_weight(m).detach().float().clone() for n, m in target_modules(model, budget.lora_config()).items()
    }


def initial_error(model: nn.Module, original: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per adapted layer ‖W − (W_base + ΔW_lora)‖ / ‖W‖ of the (PEFT) model against the original weights."""
    errs = []
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        key = name.removeprefix("base_model.model.")
        with torch.no_grad():
            effective = linear_weight(base).float() + module.get_delta_weight("default").float().reshape(
                linear_weight(base).shape
            )
        W = original[key].to(effective.device)
        errs.append(float((effective - W).norm() / W.norm()))
    if not errs:
        return {}
    return {"layer_rel_mean": statistics.fmean(errs), "layer_rel_max": max(errs), "layers": len(errs)}


@torch.no_grad()
def logits_error(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor) -> float:
    model.eval()
    out = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
    return float((out - reference).norm() / reference.norm())


def run_one(settings: Settings, method: str, seed: int, load: Callable[[], nn.Module], data: Data,
            out: Path, progress: bool = True) -> dict:  # fmt: skip
    """One (method, seed) run: adapt, measure, train, measure; the record, also written to ``out/runs``."""
    from transformers import set_seed

    path = out / "runs" / f"{method}-seed{seed}.json"
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("settings_key") == settings.key():
            return rec
        raise ValueError(f"{path} was written with other settings; use another --out or delete it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load().to(device)
    original = _target_weights(model, settings.budget)
    probe = data.eval_task[: min(4, len(data.eval_task))]
    with torch.no_grad():
        ref_logits = model(input_ids=probe.to(device)).logits.float().cpu()
    before = {"task_ppl": perplexity(model, data.eval_task), "knowledge_ppl": perplexity(model, data.eval_knowledge)}
    set_seed(seed)
    t = time.perf_counter()
    model = adapt(model, method, settings.budget, {k: v.to(device) for k, v in data.calibration.items()})
    init_s = time.perf_counter() - t
    init = {"logits_rel": logits_error(model, probe, ref_logits), **initial_error(model, original)}
    at_init = {"task_ppl": perplexity(model, data.eval_task), "knowledge_ppl": perplexity(model, data.eval_knowledge)}
    model.train()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        losses = train(
            model, data.train, settings.schedule, seed, full=method == "full", out_dir=tmp, progress=progress
        )
    train_s = time.perf_counter() - t
    after = {"task_ppl": perplexity(model, data.eval_task), "knowledge_ppl": perplexity(model, data.eval_knowledge)}
    rec = {
        "method": method,
        "seed": seed,
        "settings_key": settings.key(),
        "settings": asdict(settings),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "trainable_params": trainable_parameters(model),
        "init_s": init_s,
        "train_s": train_s,
        "losses": losses,
        "before": before,
        "at_init": at_init,
        "after": after,
        "init_error": init,
        "quantized_forward": "dequantized NF4 weights (float32)" if method in QUANTIZED else None,
    }
    write_json_atomic(path, rec, indent=1)
    return rec


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 3) -> str:
    m, s = _mean_std(values)
    return f"{m:.{digits}g} ± {s:.2g}"


def _versus(a: list[float], b: list[float], lower_is_better: bool = True) -> str:
    """'better' / 'worse' than the baseline when the means differ by more than the two spreads, else 'no difference'."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    if abs(ma - mb) <= sa + sb:
        return "no difference"
    return "better" if (ma < mb) == lower_is_better else "worse"


def summarize(settings: Settings, records: list[dict], out: Path) -> dict:
    """Tables (mean ± std over seeds; differences within the spread reported as none) and plots."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    base = BASELINE[settings.experiment]
    tail = max(1, settings.schedule.steps // 10)
    finals = {m: [statistics.fmean(r["losses"][-tail:]) for r in rs] for m, rs in by.items()}
    level = statistics.fmean(finals[base]) if base in finals else None
    rows = []
    for m, rs in by.items():
        row = {
            "method": m,
            "seeds": [r["seed"] for r in rs],
            "trainable_params": rs[0]["trainable_params"],
            "task_ppl_before": _fmt([r["at_init"]["task_ppl"] for r in rs]),
            "task_ppl_after": _fmt([r["after"]["task_ppl"] for r in rs]),
            "knowledge_ppl_before": _fmt([r["at_init"]["knowledge_ppl"] for r in rs]),
            "knowledge_ppl_after": _fmt([r["after"]["knowledge_ppl"] for r in rs]),
            "final_loss": _fmt(finals[m]),
            "init_logits_rel": _fmt([r["init_error"]["logits_rel"] for r in rs], 2),
            "init_s": _fmt([r["init_s"] for r in rs], 2),
        }
        if "layer_rel_mean" in rs[0]["init_error"]:
            row["init_layer_rel_mean"] = _fmt([r["init_error"]["layer_rel_mean"] for r in rs], 3)
        if level is not None:
            reached = [steps_to_reach(r["losses"], level) for r in rs]
            row["steps_to_baseline_final_loss"] = [s if s is not None else "never" for s in reached]
        if base in by and m != base:
            row["task_vs_" + base] = _versus(
                [r["after"]["task_ppl"] for r in rs], [r["after"]["task_ppl"] for r in by[base]]
            )
            row["knowledge_vs_" + base] = _versus(
                [r["after"]["knowledge_ppl"] for r in rs], [r["after"]["knowledge_ppl"] for r in by[base]]
            )
        rows.append(row)
    summary = {"settings": asdict(settings), "baseline": base, "loss_level": level, "rows": rows}
    write_json_atomic(out / "summary.json", summary, indent=1)
    _plot(settings, by, out)
    return summary


def _plot(settings: Settings, by: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for m, rs in by.items():
        n = min(len(r["losses"]) for r in rs)
        curves = torch.tensor([r["losses"][:n] for r in rs])
        mean, std = curves.mean(0), curves.std(0) if len(rs) > 1 else torch.zeros(n)
        steps = range(1, n + 1)
        ax.plot(steps, mean, label=f"{m} (n={len(rs)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{settings.experiment}: loss, mean ± std over seeds")
    ax.legend(fontsize=8)
    ax = axes[1]
    methods = list(by)
    for i, key in enumerate(("task_ppl", "knowledge_ppl")):
        vals = [[r["after"][key] for r in by[m]] for m in methods]
        means = [statistics.fmean(v) for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in vals]
        ax.bar([j + 0.4 * i for j in range(len(methods))], means, 0.4, yerr=errs, label=f"{key} after", capsize=3)
    ax.set_xticks([j + 0.2 for j in range(len(methods))], methods, rotation=20, fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{settings.task} (task) and {settings.knowledge} (knowledge)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{settings.experiment}.png", dpi=120)
    plt.close(fig)


def run_experiment(
    settings: Settings,
    methods: list[str],
    seeds: list[int],
    load: Callable[[], nn.Module],
    tokenize: Callable[[str, int, int], torch.Tensor],
    out: Path,
    progress: bool = True,
) -> dict:
    """Every (method, seed) run not yet on disk, then the summary and plots."""
    from tqdm import tqdm

    data = split(settings, tokenize)
    write_json_atomic(out / "settings.json", {"key": settings.key(), **asdict(settings)}, indent=1)
    records = []
    todo = [(m, s) for m in methods for s in seeds]
    for m, s in tqdm(todo, desc=settings.experiment, unit="run", disable=not progress):
        records.append(run_one(settings, m, s, load, data, out, progress=False))
    return summarize(settings, records, out)
