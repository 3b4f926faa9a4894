"""``corda-kernels finetune``: the fine-tuning experiments (corda_kernels.finetune.experiments).

    corda-kernels finetune knowledge   --out finetune-out/knowledge     # Table I analogue
    corda-kernels finetune convergence --out finetune-out/convergence   # Fig. 8 analogue
    corda-kernels finetune quantized   --out finetune-out/quantized     # Table VI analogue

Every flag scales the run (steps, sequence length, batch, rank, targets, seeds, methods). A run
repeated with the same flags resumes: finished (method, seed) runs are read back, not redone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..engine import data
from ..finetune.experiments import EXPERIMENTS, Settings, run_experiment
from ..finetune.methods import METHODS, Budget
from ..finetune.train import Schedule


def add_arguments(p: argparse.ArgumentParser) -> None:
    s, b = Schedule(), Budget()
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a transformers model directory")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=s.steps)
    p.add_argument("--batch-size", type=int, default=s.batch_size)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=s.lr, help="adapters' learning rate")
    p.add_argument("--full-lr", type=float, default=s.full_lr, help="full fine-tuning's learning rate")
    p.add_argument("--rank", type=int, default=b.rank)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank)")
    p.add_argument("--targets", default=",".join(b.targets), help="comma-separated module names")
    p.add_argument("--rounds", type=int, default=b.rounds, help="CorDA++ candidate covariances")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--task", default="pydoc", help="text fine-tuned on: lee, pydoc or a UTF-8 file")
    p.add_argument("--knowledge", default="lee", help="text whose knowledge should be kept")
    p.add_argument("--out", default=None, help="output directory (default: finetune-out/<experiment>)")
    p.add_argument("--no-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> Settings:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return Settings(
        experiment=args.experiment,
        model=args.model,
        task=args.task,
        knowledge=args.knowledge,
        seq_len=args.seq_len,
        calibration_samples=args.calibration_samples,
        eval_samples=args.eval_samples,
        budget=Budget(rank=args.rank, alpha=args.alpha, targets=targets, rounds=args.rounds),
        schedule=Schedule(steps=args.steps, batch_size=args.batch_size, lr=args.lr, full_lr=args.full_lr),
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(EXPERIMENTS[args.experiment])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    path = data.model_dir(args.model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    texts: dict[str, str] = {}

    def tokenize(name: str, n: int, offset: int) -> torch.Tensor:
        if name not in texts:
            texts[name] = data.load_text(name)
        return data.token_blocks(tokenizer, texts[name], n, settings.seq_len, offset=offset)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    out = Path(args.out or f"finetune-out/{args.experiment}")
    summary = run_experiment(settings, methods, args.seeds, load, tokenize, out, progress=not args.no_progress)
    print(json.dumps(summary["rows"], indent=1))
    return 0


def _register() -> None:
    from . import SUBCOMMANDS

    SUBCOMMANDS["finetune"] = (add_arguments, run)


_register()
