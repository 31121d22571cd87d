#!/usr/bin/env bash
# APLOT reward model, Llama-3-8B class, on ONE node.
#   assumes:  1 node x 8 GPUs x 80 GB (A100/H100 80GB), >= 128 GiB host RAM
#   model:    MODEL=/path/to/Meta-Llama-3-8B (a local Hugging Face folder: config.json, weights, tokenizer)
#   data:     DATA=/path/to/pairs.jsonl (prompt/chosen/rejected; see README)
#   recipe:   recipes/rm_8b.yaml: the hyper-parameters (ZeRO-3 bf16, 4 pairs x 2048 tokens per GPU, lr,
#             APLOT loss, save/eval steps) and, in its header, the memory plan for this hardware.
# Use:  MODEL=/models/Meta-Llama-3-8B DATA=/data/pairs.jsonl bash launchers/rm_7b_single_node.sh
#       DRY_RUN=1 bash launchers/rm_7b_single_node.sh   # flags, recipe, DeepSpeed JSON, data, memory plan; no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=1 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=128
MODEL=${MODEL:-ds_configs/model_shapes/llama3-8b}  # the default is a shape only: enough for DRY_RUN
DATA=${DATA:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}
run_job aplot_rlhf.cli.train_rm --config recipes/rm_8b.yaml \
  --model_name_or_path "$MODEL" --train_data "$DATA" --output_dir "${OUT:-runs/rm-8b}"
