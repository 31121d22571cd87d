#!/usr/bin/env bash
# APLOT reward model, Llama-3-8B class, on ONE node: 8 GPUs x 80 GB (A100/H100), >= 128 GB host RAM.
# Memory plan (python -m aplot_rlhf.cli.plan prints it): ZeRO-3 bf16 shards weights, gradients and Adam
# states over the 8 GPUs; with gradient checkpointing and 4 pairs x 2048 tokens the plan peaks at ~29 GiB per GPU.
# Use:  MODEL=/models/Meta-Llama-3-8B DATA=/data/pairs.jsonl bash launchers/rm_7b_single_node.sh
#       DRY_RUN=1 bash launchers/rm_7b_single_node.sh     # checks flags, DeepSpeed JSON and memory; no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=1 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80
MODEL=${MODEL:-ds_configs/model_shapes/llama3-8b}
DATA=${DATA:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}
run_job aplot_rlhf.cli.train_rm \
  --model_name_or_path "$MODEL" --train_data "$DATA" --eval_split_fraction 0.02 \
  --ds_config ds_configs/rm_zero3_bf16.json --zero_stage 3 --precision bf16 \
  --micro_batch_size 4 --gradient_accumulation_steps 4 --max_length 2048 --gradient_checkpointing \
  --learning_rate 9e-6 --loss aplot --aplot_ot_batch global \
  --output_dir "${OUT:-runs/rm-8b}" --save_steps 500 --eval_steps 500
