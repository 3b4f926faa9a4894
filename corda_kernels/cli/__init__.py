"""The ``corda-kernels`` command: ``init`` (the main job), ``study``, ``finetune``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..engine import distributed
from .init import DEFAULT_TARGETS, InitOptions, first_line, run_init

# Subcommands registered by other modules: name -> (add_arguments, run)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _add_init(p: argparse.ArgumentParser) -> None:
    d = InitOptions()
    p.add_argument("--model", default=d.model, help="'smollm2' (embedded, default) or a transformers model directory")
    p.add_argument("--data", default=d.data, help="'lee' (default), 'pydoc' or a UTF-8 text file")
    p.add_argument(
        "--mode",
        choices=["ipm", "kpm"],
        default=d.mode,
        help="ipm: train the principal components; kpm: keep them frozen, train the smallest",
    )
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank, i.e. scaling 1)")
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated module names, or all-linear (default: every Linear / Conv1D but the output head)",
    )
    p.add_argument("--samples", type=int, default=d.samples, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--normalization", choices=["peft", "mean"], default=d.normalization)
    p.add_argument("--method", choices=["exact", "fast"], default=d.method, help="CO-SVD method")
    p.add_argument(
        "--literal-damping",
        action="store_true",
        help="run CorDA's damping check (inverse + n³ product) at every step instead of the screen",
    )
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.add_argument("--dynamic", action="store_true", help="CorDA++: covariance selection and rank allocation")
    p.add_argument("--rounds", type=int, default=d.rounds, help="CorDA++ candidate covariances (K)")
    p.add_argument("--quantize", choices=["none", "nf4"], default=d.quantize, help="nf4: QCorDA residual")
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _run_init(args: argparse.Namespace) -> int:
    opts = InitOptions(
        model=args.model,
        data=args.data,
        mode=args.mode,
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        samples=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        normalization=args.normalization,
        method=args.method,
        damping_screen=not args.literal_damping,
        rslora=args.rslora,
        dynamic=args.dynamic,
        rounds=args.rounds,
        quantize=args.quantize,
        out=args.out,
        progress=not args.no_progress,
    )
    with distributed.group_from_env():  # under torchrun: one process group for the run
        report = run_init(opts)
        if distributed.rank_and_world()[0] != 0:
            return 0
    summary = {
        "out": opts.out,
        "stages_s": report.stages,
        "peak_rss_mib": report.peak_rss_mib,
        "layers": len(report.layers),
        "logits_rel_err_after_init": report.verify.get("logits_rel_err"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("what", nargs="?", default="init", choices=["init"], help="init: PEFT vs ours end to end")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main  # noqa: PLC0415

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corda-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_init(sub.add_parser("init", help="build CorDA adapters (default: embedded SmolLM2 on the Lee corpus)"))
    _add_bench(sub.add_parser("bench", help="benchmarks: PEFT vs corda_kernels"))
    for name, (add, _) in SUBCOMMANDS.items():
        sp = sub.add_parser(name)
        add(sp)
        sp.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    _load_plugins()
    args = build_parser().parse_args(argv)
    runners = {"init": _run_init, "bench": _run_bench, **{k: v[1] for k, v in SUBCOMMANDS.items()}}
    try:
        return runners[args.command](args)
    except Exception as err:  # one line, exit 2; the traceback only when asked
        if getattr(args, "debug", False):
            raise
        known = isinstance(err, (ValueError, FileNotFoundError, RuntimeError, OSError))
        message = first_line(err, with_type=not known) + ("" if known else " (--debug shows where)")
        print(f"corda-kernels {args.command}: error: {message}", file=sys.stderr)
        return 2


def _load_plugins() -> None:
    """Subcommands living in their own modules register themselves in SUBCOMMANDS on import."""
    from . import finetune, study  # noqa: F401, PLC0415


if __name__ == "__main__":
    raise SystemExit(main())
