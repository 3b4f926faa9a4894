"""Markdown tables of the fine-tuning experiments, from their summary files.

    python bench/finetune_report.py bench/results/finetune/cpu

Reads ``<dir>/<experiment>/summary.json`` and ``runs/*.json`` (written by ``corda-kernels
finetune``) and prints one table per experiment: means ± standard deviations over the seeds, and
each method against the baseline (LoRA, or QLoRA for the quantized experiment): "better" or
"worse" only when the means differ by more than the two spreads, otherwise "no difference".
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _ms(values: list[float], digits: int = 3) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}g} ± {s:.2g}"


def _runs(folder: Path) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for p in sorted((folder / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        by.setdefault(r["method"], []).append(r)
    return by


def table(folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    settings, rows = summary["settings"], {r["method"]: r for r in summary["rows"]}
    by = _runs(folder)
    exp, base = settings["experiment"], summary["baseline"]
    sch, bud = settings["schedule"], settings["budget"]
    any_run = next(iter(by.values()))[0]
    lines = [
        f"**{exp}** — {settings['model']}, task `{settings['task']}`, knowledge `{settings['knowledge']}`, "
        f"{sch['steps']} steps × {sch['batch_size']} × {settings['seq_len']} tokens, rank {bud['rank']} on "
        f"{', '.join(bud['targets'])}, lr {sch['lr']} (full: {sch['full_lr']}), {sch['scheduler']}, "
        f"seeds {sorted({r['seed'] for rs in by.values() for r in rs})}, device {any_run['device']}. "
        f"Original model: task ppl {any_run['before']['task_ppl']:.3g}, knowledge ppl "
        f"{any_run['before']['knowledge_ppl']:.3g}.",
        "",
    ]
    if exp == "knowledge":
        lines += ["| method | trainable | task ppl after | knowledge ppl after | task vs LoRA | knowledge vs LoRA |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for m, rs in by.items():
            r = rows[m]
            lines.append(
                f"| {m} | {rs[0]['trainable_params']:,} | {r['task_ppl_after']} | {r['knowledge_ppl_after']} | "
                f"{r.get('task_vs_' + base, '—')} | {r.get('knowledge_vs_' + base, '—')} |"
            )
    elif exp == "convergence":
        head = "| method | final loss (last 10%) | steps to LoRA's final loss, per seed | task ppl after | vs LoRA |"
        lines += [head, "|---|---|---|---|---|"]
        for m in by:
            r = rows[m]
            steps = ", ".join(str(s) for s in r.get("steps_to_baseline_final_loss", []))
            lines.append(
                f"| {m} | {r['final_loss']} | {steps} | {r['task_ppl_after']} | {r.get('task_vs_' + base, '—')} |"
            )
    else:
        lines += ["| method | layer error ‖W − (deq(W_res) + s·BA)‖/‖W‖ | logits error | task ppl at init | "
                  "task ppl after | vs QLoRA |", "|---|---|---|---|---|---|"]  # fmt: skip
        for m, rs in by.items():
            r = rows[m]
            lines.append(
                f"| {m} | {_ms([x['init_error']['layer_rel_mean'] for x in rs])} | "
                f"{_ms([x['init_error']['logits_rel'] for x in rs])} | {_ms([x['at_init']['task_ppl'] for x in rs])} | "
                f"{r['task_ppl_after']} | {r.get('task_vs_' + base, '—')} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "bench/results/finetune/cpu")
    for exp in ("knowledge", "convergence", "quantized"):
        if (root / exp / "summary.json").exists():
            print(table(root / exp))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
