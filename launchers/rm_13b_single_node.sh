#!/usr/bin/env bash
# APLOT reward model, Llama-2-13B class, on ONE node.
#   assumes:  1 node x 8 GPUs x 80 GB (A100/H100 80GB), >= 256 GiB host RAM
#   model:    MODEL=/path/to/Llama-2-13b-hf (a local Hugging Face folder: config.json, weights, tokenizer)
#   data:     DATA=/path/to/pairs.jsonl
#   recipe:   recipes/rm_13b.yaml: the hyper-parameters (ZeRO-3 bf16, 2 pairs x 2048 tokens per GPU, ...)
#             and, in its header, the memory plan for this hardware.
# Use:  MODEL=/models/Llama-2-13b-hf DATA=/data/pairs.jsonl bash launchers/rm_13b_single_node.sh
#       DRY_RUN=1 bash launchers/rm_13b_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=1 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=256
MODEL=${MODEL:-ds_configs/model_shapes/llama2-13b}  # the default is a shape only: enough for DRY_RUN
DATA=${DATA:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}
run_job aplot_rlhf.cli.train_rm --config recipes/rm_13b.yaml \
  --model_name_or_path "$MODEL" --train_data "$DATA" --output_dir "${OUT:-runs/rm-13b}"
