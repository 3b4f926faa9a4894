#!/usr/bin/env bash
# The CPU's reduced fine-tuning experiments (2 cores): 40 steps of 4 × 64 tokens, rank 8 on the
# attention projections, 3 seeds. Resumable: run it again to finish what an interrupted run left.
# Results: bench/results/finetune/cpu/<experiment>/ (summary.json, <experiment>.png, runs/*.json).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
for exp in convergence knowledge quantized; do
  corda-kernels finetune "$exp" --steps 40 --batch-size 4 --seq-len 64 --lr 5e-4 --full-lr 5e-5 --rank 8 \
    --targets q_proj,k_proj,v_proj,o_proj --seeds 0 1 2 --no-progress --out "bench/results/finetune/cpu/$exp"
done
