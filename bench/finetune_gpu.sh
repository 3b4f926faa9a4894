#!/usr/bin/env bash
# The full fine-tuning experiments for a CUDA machine that holds the embedded model: every method,
# 3 seeds, 100 steps of 8 × 128 tokens, rank 16 on every projection; the three experiments run as
# three processes on one GPU. Resumable (a repeated command reads finished runs back).
# Results: bench/results/finetune/gpu/<experiment>/.
set -euo pipefail
cd "$(dirname "$0")/.."
for exp in convergence knowledge quantized; do
  python -m corda_kernels finetune "$exp" --steps 100 --batch-size 8 --seq-len 128 --lr 2e-4 --full-lr 2e-5 \
    --rank 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --calibration-samples 64 \
    --seeds 0 1 2 --no-progress --out "bench/results/finetune/gpu/$exp" &
done
wait
python bench/finetune_report.py bench/results/finetune/gpu
