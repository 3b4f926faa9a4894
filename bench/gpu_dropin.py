"""GPU suite module: the PEFT drop-in on a model that lives on the GPU.

``run(device)`` returns rows ``{kernel, shape, ours_ms, ref_ms, ratio, max_err, note}``:

* correctness: ``preprocess_corda`` on a tiny LLaMA on ``device`` against the same model on the
  CPU (cropped singular values, eigens on the layer's device, logits after ``get_peft_model``),
  and with ``covariance_device="cpu"`` (accumulators off the GPU) against the default;
* timing: PEFT's own ``preprocess_corda`` against the drop-in on ``device``, PEFT's usage
  (batch 1, whole-model forwards), the 384-wide LLaMA and GPT-2 of ``bench_dropin.py``, ipm and kpm.

Skipped (a SKIPPED row, not a failure) where transformers or PEFT are not installed.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _gpu_util import SMALL, guarded, rel_err, row, sync  # noqa: E402

# float32 sums in another order (GPU against CPU): the covariances differ by ~√T·u₃₂, the cropped
# values of these well-separated random spectra by the same order; 1e-4 leaves a margin of ~100
SV_TOL = 1e-4


def _correctness(device: str) -> list[dict[str, Any]]:
    from bench_dropin import corda_lora_config  # PEFT is imported only where it is installed
    from peft import get_peft_model

    from corda_kernels.peft import preprocess_corda, target_modules
    from tests.tiny_models import LLAMA_TARGETS, tiny_llama

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (1, int(torch.randint(8, 40, (1,), generator=g))), generator=g) for _ in range(12)]
    rows = []
    for mode in ("ipm", "kpm"):
        base = tiny_llama(seed=1)
        cpu_model, gpu_model = copy.deepcopy(base), copy.deepcopy(base).to(device)
        cfg_cpu = corda_lora_config(LLAMA_TARGETS, mode, 8)
        preprocess_corda(cpu_model, cfg_cpu, run_model=lambda m=cpu_model: [m(s) for s in seqs])
        cfg = corda_lora_config(LLAMA_TARGETS, mode, 8)
        preprocess_corda(gpu_model, cfg, run_model=lambda m=gpu_model: [m(s.to(device)) for s in seqs])
        off = copy.deepcopy(base).to(device)
        cfg_off = corda_lora_config(LLAMA_TARGETS, mode, 8)
        preprocess_corda(off, cfg_off, run_model=lambda m=off: [m(s.to(device)) for s in seqs], covariance_device="cpu")
        ref_mods, off_mods = target_modules(cpu_model, cfg_cpu), target_modules(off, cfg_off)
        sv_err = cov_err = off_err = 0.0
        placed = True
        for name, module in target_modules(gpu_model, cfg).items():
            S, S_ref = module.eigens.S_WC, ref_mods[name].eigens.S_WC
            placed &= S.device == module.weight.device and off_mods[name].eigens.S_WC.device == module.weight.device
            sv_err = max(sv_err, float(((S.double().cpu() - S_ref.double()).abs() / S_ref.double()).max()))
            cov_err = max(cov_err, rel_err(module.covariance_matrix.cpu(), ref_mods[name].covariance_matrix))
            off_err = max(off_err, rel_err(off_mods[name].covariance_matrix.cpu(), module.covariance_matrix.cpu()))
        probe = seqs[0].to(device)
        with torch.no_grad():
            before = base.to(device)(probe).logits
            logits_err = rel_err(get_peft_model(gpu_model, cfg)(probe).logits, before)
            base.cpu()
        ok = sv_err <= SV_TOL and cov_err <= SV_TOL and off_err <= SV_TOL and logits_err <= 1e-4 and placed
        note = (
            f"{'ok' if ok else 'FAIL'}: σ vs CPU {sv_err:.1e}, covariance vs CPU {cov_err:.1e}, "
            f"covariance_device='cpu' vs on-device {off_err:.1e}, logits after init {logits_err:.1e}, "
            f"eigens on the layer's device {placed}"
        )
        rows.append(row(f"drop-in on {device} ({mode})", "tiny LLaMA 64, 2 layers", max_err=sv_err, note=note))
    return rows


def _timing(device: str) -> list[dict[str, Any]]:
    from bench_dropin import corda_lora_config, tiny_models
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    from corda_kernels.peft import preprocess_corda

    rows = []
    samples, seq = (4, 32) if SMALL else (12, 96)
    for name, model, targets, ids in tiny_models(seq, samples):
        model = model.to(device)
        ids = ids.to(device)

        def forward(m, ids=ids) -> None:  # noqa: ANN001
            with torch.no_grad():
                for i in range(ids.shape[0]):
                    m(ids[i : i + 1])

        forward(model)
        reps = 1 if SMALL else 3
        for mode in ("ipm", "kpm"):
            best: dict[str, float] = {}
            for _ in range(reps):
                for label, fn in (("peft", peft_preprocess), ("ours", preprocess_corda)):
                    m = copy.deepcopy(model)
                    sync(device)
                    t0 = time.perf_counter()
                    fn(m, corda_lora_config(targets, mode, 16), run_model=lambda m=m: forward(m))
                    sync(device)
                    best[label] = min(best.get(label, float("inf")), (time.perf_counter() - t0) * 1e3)
                    del m
            rows.append(
                row(
                    f"drop-in vs PEFT preprocess_corda ({mode})",
                    f"{name}, {samples}×{seq} tokens batch 1",
                    ours_ms=best["ours"],
                    ref_ms=best["peft"],
                    note=f"min of {reps}, whole call (calibration + decomposition)",
                )
            )
    return rows


def run(device: str) -> list[dict[str, Any]]:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return [row("drop-in on the GPU", "-", note=f"SKIPPED: {err}")]
    rows: list[dict[str, Any]] = []
    guarded(rows, "drop-in correctness", lambda: _correctness(device))
    guarded(rows, "drop-in timing", lambda: _timing(device))
    return rows
