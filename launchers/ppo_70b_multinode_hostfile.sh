#!/usr/bin/env bash
# PPO, Llama-3-70B class actor, reference and critic (from the actor), 8B reward model, on 8 nodes x 8 GPUs x 80 GB,
# >= 640 GiB host RAM per node (actor optimizer states offloaded; the plan: ~600 GiB). vLLM TP 8 (one engine per node), sleeping in training.
# recipes/ppo_70b.yaml (shared with ppo_70b_slurm.sbatch) holds the hyper-parameters and, in its header, the memory plan.
# Use:  HOSTFILE=launchers/hostfile ACTOR=/models/sft-70b RM=runs/rm-8b/model PROMPTS=/data/prompts.jsonl \
#         bash launchers/ppo_70b_multinode_hostfile.sh
#       DRY_RUN=1 bash launchers/ppo_70b_multinode_hostfile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=8 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=640
export HOSTFILE=${HOSTFILE:-launchers/hostfile.example}
run_job aplot_rlhf.cli.train_ppo --config recipes/ppo_70b.yaml \
  --actor_model "${ACTOR:-ds_configs/model_shapes/llama3-70b}" --reward_model "${RM:-ds_configs/model_shapes/llama3-8b}" \
  --prompt_data "${PROMPTS:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}" \
  --output_dir "${OUT:-runs/ppo-70b}"
