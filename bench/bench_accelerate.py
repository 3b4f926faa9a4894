"""PEFT's own initializations with and without ``corda_kernels.peft.accelerate()``, side by side.

Each row is ``get_peft_model(copy, LoraConfig(init_lora_weights=…))`` — PEFT's code, unchanged —
timed without the switch (PEFT) and inside ``with accelerate():`` (ours), interleaved in one
process (PEFT, ours, PEFT, ours, …) on fresh copies of the same model after one untimed warm-up
round; medians are reported.

Models: the embedded SmolLM2-135M (all seven projections of its 30 layers) and LLaMA-shaped layers
at hidden 2048 (TinyLlama-1.1B's shapes: q/o 2048×2048, k/v 256×2048, gate/up 5632×2048, down
2048×5632; Gaussian weights, the flat-spectrum worst case), one model per shape plus a
``decoder layer`` row that adds them with their multiplicities.

Initializations: ``pissa`` (PEFT: full float32 ``torch.linalg.svd``), ``pissa_niter_4`` (PEFT:
``torch.svd_lowrank``, 4 iterations), ``olora`` (PEFT: full QR), LoftQ 4-bit with one round
(PEFT's ``loftq_init`` hard-codes a GPU, so its baseline is PEFT's own function compiled for the
CPU, ``tests/peft_reference.py``) and, on the embedded model, ``corda`` IPM through PEFT's own
``preprocess_corda`` (16 × 128 Lee tokens).

Agreement with float64, worst over the layers of a row and, where it has several, the median
(sign-free, from the adapters PEFT's model ends up with):

* pissa / pissa_niter_4: ``‖s·B·A − W₆₄,r‖_F / ‖W₆₄,r‖_F`` against the float64 rank-r truncation;
* olora: ``‖B·A − Q₆₄,r R₆₄,r‖_F / ‖Q₆₄,r R₆₄,r‖_F`` against the float64 QR's leading factors;
* loftq: ``‖s·B·A − E₆₄,r‖_F / ‖E₆₄,r‖_F`` with ``E = W − Q`` the error of the NF4 weight ``Q``
  the model ends up with; and whether PEFT's and our NF4 weights are equal;
* corda: worst relative error of the cropped singular values against a float64 CO-SVD.

    python bench/bench_accelerate.py                     # everything, 3 repetitions
    python bench/bench_accelerate.py --quick             # 1 repetition, smaller LLaMA shapes

Writes ``bench/results/bench_accelerate.json`` (``--json PATH``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import torch
from peft import LoftQConfig, LoraConfig, get_peft_model
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_dropin import _cpu_model, corda_lora_config, worst_sv_error, write_results  # noqa: E402
from corda_kernels.peft import accelerate  # noqa: E402
from tests.peft_reference import peft_loftq_init_cpu  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, out, in, copies in one decoder layer) for TinyLlama-1.1B (hidden 2048, 4 KV heads of 64)
LLAMA_2048 = [("q/o", 2048, 2048, 2), ("k/v", 256, 2048, 2), ("gate/up", 5632, 2048, 2), ("down", 2048, 5632, 1)]
METHODS = ["pissa", "pissa_niter_4", "olora", "loftq"]


class OneLinear(nn.Module):
    """A model holding one ``proj`` layer of the given shape, for per-shape rows."""

    def __init__(self, out_features: int, in_features: int, seed: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)


@contextlib.contextmanager
def peft_loftq_on_cpu() -> Iterator[None]:
    """PEFT's LoftQ with its device set to the CPU, where PEFT's model code looks it up."""
    from peft.tuners.lora import layer
    from peft.utils import loftq_utils

    fn = peft_loftq_init_cpu()
    saved = layer.loftq_init, loftq_utils.loftq_init
    layer.loftq_init = loftq_utils.loftq_init = fn
    try:
        yield
    finally:
        layer.loftq_init, loftq_utils.loftq_init = saved


def lora_config(method: str, rank: int, targets: list[str]) -> LoraConfig:
    # lora_alpha = r gives s = 1: PEFT's LoftQ fits W ≈ Q + B·A whatever the scaling
    kw = {"r": rank, "lora_alpha": rank, "target_modules": targets}
    if method == "loftq":
        return LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1), **kw)
    return LoraConfig(init_lora_weights=method, **kw)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class Reference:
    """Float64 factorizations of the original weights, computed once per (layer, rank)."""

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        self.W = {
            n: m.weight.detach().double().clone()
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] in targets
        }
        self._svd: dict[str, tuple] = {}
        self._qr: dict[str, tuple] = {}

    def truncation(self, name: str, r: int) -> torch.Tensor:
        if name not in self._svd:
            self._svd[name] = torch.linalg.svd(self.W[name], full_matrices=False)
        U, S, Vh = self._svd[name]
        return (U[:, :r] * S[:r]) @ Vh[:r]

    def qr_lead(self, name: str, r: int) -> torch.Tensor:
        if name not in self._qr:
            self._qr[name] = torch.linalg.qr(self.W[name])
        Q, R = self._qr[name]
        return Q[:, :r] @ R[:r]


def agreement(method: str, peft_model: nn.Module, ref: Reference) -> list[float]:
    """The row's metric (module docstring), one value per adapted layer."""
    errors = []
    for name, layer in lora_layers(peft_model).items():
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        s = float(layer.scaling["default"])
        r = A.shape[0]
        if method.startswith("pissa"):
            target = ref.truncation(name, r)
            err = (s * B @ A - target).norm() / target.norm()
        elif method == "olora":
            target = ref.qr_lead(name, r)
            err = (B @ A - target).norm() / target.norm()
        else:  # loftq: against the float64 rank-r truncation of the error of the same NF4 weight
            E = ref.W[name] - layer.get_base_layer().weight.detach().double()
            U, S, Vh = torch.linalg.svd(E, full_matrices=False)
            target = (U[:, :r] * S[:r]) @ Vh[:r]
            err = (s * B @ A - target).norm() / target.norm()
        errors.append(float(err))
    return errors


def nf4_equal(a: nn.Module, b: nn.Module) -> tuple[int, int]:
    la, lb = lora_layers(a), lora_layers(b)
    same = sum(torch.equal(la[n].get_base_layer().weight, lb[n].get_base_layer().weight) for n in la)
    return same, len(la)


def run_row(
    label: str, model: nn.Module, targets: list[str], method: str, rank: int, reps: int, ref: Reference
) -> dict:
    baseline: Callable[[], contextlib.AbstractContextManager] = (
        peft_loftq_on_cpu if method == "loftq" else contextlib.nullcontext
    )
    times: dict[str, list[float]] = {"peft": [], "ours": []}
    last: dict[str, nn.Module] = {}
    accelerated = delegated = 0
    for rep in range(reps + 1):  # the first is a warm-up (imports, allocator, thread pools)
        for variant in ("peft", "ours"):
            last.pop(variant, None)
            m = copy.deepcopy(model)
            cfg = lora_config(method, rank, targets)
            ctx = baseline() if variant == "peft" else accelerate()
            with ctx as record:
                t0 = time.perf_counter()
                last[variant] = get_peft_model(m, cfg)
                if rep:
                    times[variant].append(time.perf_counter() - t0)
                if variant == "ours":
                    accelerated = sum(c.accelerated for c in record)
                    delegated = sum(not c.accelerated for c in record)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "model": label,
        "init": method,
        "rank": rank,
        "layers": len(lora_layers(last["ours"])),
        "accelerated_calls": accelerated,
        "delegated_calls": delegated,
        "median_s": med,
        "all_s": times,
        "speedup": med["peft"] / med["ours"],
    }
    for v in ("peft", "ours"):
        errors = agreement(method, last[v], ref)
        row.setdefault("err_vs_float64", {})[v] = max(errors)
        row.setdefault("err_vs_float64_median", {})[v] = statistics.median(errors)
    if method == "loftq":
        row["nf4_equal_layers"] = nf4_equal(last["peft"], last["ours"])
    return row


def run_corda(model: nn.Module, ids: torch.Tensor, rank: int, reps: int) -> dict:
    from peft.tuners.lora.corda import preprocess_corda

    def config() -> LoraConfig:
        return corda_lora_config(LLAMA_TARGETS, "ipm", rank)

    def run_model(m: nn.Module) -> None:
        with torch.no_grad():
            for i in range(ids.shape[0]):
                m(ids[i : i + 1])

    times: dict[str, list[float]] = {"peft": [], "ours": []}
    errors: dict[str, float] = {}
    for _ in range(reps):
        for variant in ("peft", "ours"):
            m, cfg = copy.deepcopy(model), config()
            ctx = accelerate() if variant == "ours" else contextlib.nullcontext()
            with ctx:
                t0 = time.perf_counter()
                preprocess_corda(m, cfg, run_model=lambda m=m: run_model(m))
                times[variant].append(time.perf_counter() - t0)
            errors[variant] = worst_sv_error(m, cfg)
            del m
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": "smollm2",
        "init": "corda (ipm, preprocess_corda)",
        "rank": rank,
        "tokens": int(ids.numel()),
        "median_s": med,
        "all_s": times,
        "speedup": med["peft"] / med["ours"],
        "err_vs_float64": errors,
    }


def decoder_total(rows: list[dict], method: str, label: str, counts: dict[str, int]) -> dict:
    """One decoder layer: the per-shape medians times each shape's multiplicity."""
    parts = [r for r in rows if r["init"] == method and r["model"] in counts]
    med = {v: sum(r["median_s"][v] * counts[r["model"]] for r in parts) for v in ("peft", "ours")}
    return {
        "model": label,
        "init": method,
        "rank": parts[0]["rank"],
        "layers": sum(counts.values()),
        "median_s": med,
        "speedup": med["peft"] / med["ours"],
        "err_vs_float64": {v: max(r["err_vs_float64"][v] for r in parts) for v in ("peft", "ours")},
        **(
            {"nf4_equal_layers": [sum(r["nf4_equal_layers"][i] for r in parts) for i in (0, 1)]}
            if method == "loftq"
            else {}
        ),
        "derived": True,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | init | r | PEFT s | ours s | speed-up | PEFT err vs f64, worst (median) | ours | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median_s"]
        several = r.get("layers", 1) > 1 and "err_vs_float64_median" in r
        e = {
            v: f"{r['err_vs_float64'][v]:.1e}" + (f" ({r['err_vs_float64_median'][v]:.1e})" if several else "")
            for v in ("peft", "ours")
        }
        note = []
        if "nf4_equal_layers" in r:
            note.append(f"same NF4 {r['nf4_equal_layers'][0]}/{r['nf4_equal_layers'][1]}")
        if r.get("delegated_calls"):
            note.append(f"{r['delegated_calls']} delegated")
        if r.get("derived"):
            note.append("sum of the rows above")
        lines.append(
            f"| {r['model']} | {r['init']} | {r['rank']} | {m['peft']:.3f} | {m['ours']:.3f} | "
            f"{r['speedup']:.2f}× | {e['peft']} | {e['ours']} | {', '.join(note)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-corda", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 repetition; LLaMA shapes divided by 4")
    ap.add_argument("--json", default="bench/results/bench_accelerate.json")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    methods = args.methods.split(",")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)

    print(markdown([]), flush=True)
    if not args.no_llama:
        div = 4 if args.quick else 1
        shapes = [(n, o // div, i // div, c) for n, o, i, c in LLAMA_2048]
        hidden = 2048 // div
        counts = {f"llama{hidden} {n} {o}×{i}": c for n, o, i, c in shapes}
        for method in methods:
            for seed, (n, o, i, _) in enumerate(shapes):
                model = OneLinear(o, i, seed).eval()
                emit(
                    run_row(
                        f"llama{hidden} {n} {o}×{i}",
                        model,
                        ["proj"],
                        method,
                        args.rank,
                        reps,
                        Reference(model, ["proj"]),
                    )
                )
            emit(decoder_total(rows, method, f"llama{hidden} decoder layer", counts))
    if not args.no_smollm2:
        from corda_kernels.engine import data

        model, tok = data.load_model()
        model.eval()
        ref = Reference(model, LLAMA_TARGETS)
        for method in methods:
            emit(run_row("smollm2", model, LLAMA_TARGETS, method, args.rank, reps, ref))
        if not args.no_corda:
            ids = data.token_blocks(tok, data.load_text("lee"), 16, 128)
            emit(run_corda(model, ids, args.rank, reps))
    out = {
        "date": date.today().isoformat(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "command": "python bench/bench_accelerate.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    write_results(args.json, out)


if __name__ == "__main__":
    main()
