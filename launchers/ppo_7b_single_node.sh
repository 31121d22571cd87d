#!/usr/bin/env bash
# PPO, Llama-3-8B class actor + reference, 8B reward model (critic from it), on ONE node: 8 GPUs x 80 GB,
# >= 256 GiB host RAM. Every rank trains the ZeRO-3 actor and critic and runs its own vLLM engine (TP 1)
# on the same GPU. recipes/ppo_8b.yaml holds the hyper-parameters (batch sizes, lengths, lr, KL, vLLM
# share, DeepSpeed JSONs) and, in its header, the memory plan for this hardware.
# Use:  ACTOR=/models/sft-8b RM=runs/rm-8b/model PROMPTS=/data/prompts.jsonl bash launchers/ppo_7b_single_node.sh
#       DRY_RUN=1 bash launchers/ppo_7b_single_node.sh   # checks flags, recipe, DeepSpeed JSON and memory; no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=1 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=256
run_job aplot_rlhf.cli.train_ppo --config recipes/ppo_8b.yaml \
  --actor_model "${ACTOR:-ds_configs/model_shapes/llama3-8b}" --reward_model "${RM:-ds_configs/model_shapes/llama3-8b}" \
  --prompt_data "${PROMPTS:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}" \
  --output_dir "${OUT:-runs/ppo-8b}"
