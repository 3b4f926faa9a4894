"""The PEFT drop-in against PEFT itself, as a PEFT user calls it: default arguments, batch 1.

For each model and CorDA mode, in one process and interleaved (PEFT, ours, PEFT, ours, …), the
same ``run_model`` — one sequence per forward through the whole model, as PEFT's docs do it —
is timed with PEFT's ``preprocess_corda`` and with ``corda_kernels.peft.preprocess_corda`` (no
extra argument), each on a fresh copy of the model. The bare forward passes (no hooks) are the
floor. Reported: medians over the repetitions, the speed-up, and the hook overhead (calibration
time over the bare forward). The adapters of the last repetition are compared with a float64
CO-SVD of the same covariance (ours) and of PEFT's (theirs): worst relative error of the cropped
singular values.

    python bench/bench_dropin.py                       # tiny LLaMA / GPT-2 built from configs
    python bench/bench_dropin.py --smollm2 --reps 1    # + SmolLM2-135M, 64 × 256 Lee tokens

Writes ``bench/results/bench_dropin.json`` (``--json PATH`` to change) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.config import CordaConfig

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_models(seq: int, samples: int):  # noqa: ANN201
    """LLaMA-shaped (hidden 384, intermediate 1024, 2 layers) and GPT-2 (384 wide, 2 layers) from configs."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=6,
        )
    ).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=384, n_layer=2, n_head=6, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 1000, (samples, seq))
    return [("tiny-llama", llama, LLAMA_TARGETS, ids), ("tiny-gpt2", gpt2.eval(), GPT2_TARGETS, ids)]


def smollm2(seq: int, samples: int):  # noqa: ANN201
    from corda_kernels.engine import data

    model, tok = data.load_model()
    return [("smollm2", model, LLAMA_TARGETS, data.token_blocks(tok, data.load_text("lee"), samples, seq))]


@torch.no_grad()
def worst_sv_error(model, cfg: LoraConfig) -> float:  # noqa: ANN001
    """Worst relative error of the cropped singular values against a float64 CO-SVD (PEFT's damping rule)."""
    from corda_kernels.engine.layers import linear_weight
    from corda_kernels.ops.damping import damp_covariance
    from corda_kernels.peft import target_modules

    worst = 0.0
    for _, module in target_modules(model, cfg).items():
        C_fix = damp_covariance(module.covariance_matrix.float(), screen=False)[0].double()
        S = torch.linalg.svdvals(linear_weight(module).double() @ C_fix)
        r = module.rank
        ref = S[:r] if module.corda_method == "ipm" else S[-r:]
        got = module.eigens.S_WC.double().cpu()
        worst = max(worst, float(((got - ref).abs() / ref).max()))
    return worst


def corda_lora_config(targets: list[str], mode: str, rank: int) -> LoraConfig:
    """CorDA with ``lora_alpha = r``; the covariances kept (``prune_temporary_fields=False``) for the σ check."""
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode, prune_temporary_fields=False),
    )


def run_case(name: str, model, targets: list[str], ids: torch.Tensor, mode: str, reps: int, rank: int) -> dict:  # noqa: ANN001
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    from corda_kernels.peft import preprocess_corda as ours_preprocess

    def config() -> LoraConfig:
        return corda_lora_config(targets, mode, rank)

    def forward(m) -> None:  # noqa: ANN001
        with torch.no_grad():
            for i in range(ids.shape[0]):
                m(ids[i : i + 1])

    forward(model)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "peft": [], "ours": [], "ours_calibrate": []}
    errors: dict[str, float] = {}
    for _ in range(reps):
        t0 = time.perf_counter()
        forward(model)
        times["bare"].append(time.perf_counter() - t0)
        for variant, fn in (("peft", peft_preprocess), ("ours", ours_preprocess)):
            m, cfg = copy.deepcopy(model), config()
            calib = [0.0]

            def run(m=m, calib=calib) -> None:  # noqa: ANN001
                t = time.perf_counter()
                forward(m)
                calib[0] += time.perf_counter() - t

            t0 = time.perf_counter()
            fn(m, cfg, run_model=run)
            times[variant].append(time.perf_counter() - t0)
            if variant == "ours":
                times["ours_calibrate"].append(calib[0])
            errors[variant] = worst_sv_error(m, cfg)
            del m
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "mode": mode,
        "tokens": int(ids.numel()),
        "batch": 1,
        "reps": reps,
        "median_s": med,
        "all_s": times,
        "speedup": med["peft"] / med["ours"],
        "hook_overhead": med["ours_calibrate"] / med["bare"] - 1,
        "sv_rel_err_worst": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--modes", default="ipm,kpm")
    ap.add_argument("--tiny-samples", type=int, default=12)
    ap.add_argument("--tiny-seq", type=int, default=96)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (64 × 256 Lee tokens by default)")
    ap.add_argument("--smollm2-only", action="store_true")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default="bench/results/bench_dropin.json")
    args = ap.parse_args()
    cases = [] if args.smollm2_only else tiny_models(args.tiny_seq, args.tiny_samples)
    if args.smollm2 or args.smollm2_only:
        cases += smollm2(args.seq_len, args.samples)
    rows = []
    for name, model, targets, ids in cases:
        for mode in args.modes.split(","):
            row = run_case(name, model, targets, ids, mode, args.reps, args.rank)
            rows.append(row)
            m = row["median_s"]
            print(
                f"{name:10s} {mode}  bare {m['bare']:.3f}s  peft {m['peft']:.3f}s  ours {m['ours']:.3f}s  "
                f"{row['speedup']:.2f}x  hooks +{100 * row['hook_overhead']:.0f}%  "
                f"sv err ours {row['sv_rel_err_worst']['ours']:.1e} peft {row['sv_rel_err_worst']['peft']:.1e}",
                flush=True,
            )
    out = {
        "date": date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python bench/bench_dropin.py " + " ".join(_argv()),
        "rows": rows,
    }
    write_results(args.json, out)


def write_results(path: str, out: dict) -> None:
    """Write a benchmark's result dict as JSON (folders made as needed) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
