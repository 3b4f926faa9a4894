#!/usr/bin/env bash
# The CPU's reduced fine-tuning experiments (2 cores): 4 × 64-token batches, rank 8 on the
# attention projections, 3 seeds; 40 steps (30 for the knowledge experiment, whose full
# fine-tuning runs are the slowest). Resumable: run it again to finish what an interrupted run left.
# Results: bench/results/finetune/cpu/<experiment>/ (summary.json, <experiment>.png, runs/*.json).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
common=(--batch-size 4 --seq-len 64 --lr 5e-4 --full-lr 5e-5 --rank 8 --targets q_proj,k_proj,v_proj,o_proj
  --seeds 0 1 2 --no-progress)
corda-kernels finetune convergence --steps 40 "${common[@]}" --out bench/results/finetune/cpu/convergence
corda-kernels finetune knowledge --steps 30 "${common[@]}" --out bench/results/finetune/cpu/knowledge
corda-kernels finetune quantized --steps 40 "${common[@]}" --out bench/results/finetune/cpu/quantized
python bench/finetune_report.py bench/results/finetune/cpu
