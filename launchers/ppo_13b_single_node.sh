#!/usr/bin/env bash
# PPO, Llama-2-13B class actor + reference (critic from the actor), 8B reward model, on ONE node: 8 GPUs x 80 GB,
# >= 768 GiB host RAM (actor and critic optimizer states offloaded to CPU; the plan: ~710 GiB). vLLM TP 2 per engine.
# recipes/ppo_13b.yaml holds the hyper-parameters and, in its header, the memory plan for this hardware.
# Use:  ACTOR=/models/sft-13b RM=runs/rm-8b/model PROMPTS=/data/prompts.jsonl bash launchers/ppo_13b_single_node.sh
#       DRY_RUN=1 bash launchers/ppo_13b_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=1 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=768
run_job aplot_rlhf.cli.train_ppo --config recipes/ppo_13b.yaml \
  --actor_model "${ACTOR:-ds_configs/model_shapes/llama2-13b}" --reward_model "${RM:-ds_configs/model_shapes/llama3-8b}" \
  --prompt_data "${PROMPTS:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}" \
  --output_dir "${OUT:-runs/ppo-13b}"
