#!/usr/bin/env bash
# PPO, Llama-3-70B class actor, reference and critic (from the actor), 8B reward model, on 8 nodes x 8 GPUs x 80 GB,
# >= 640 GiB host RAM per node (actor optimizer states offloaded; the plan: ~600 GiB). vLLM TP 8 (one engine per node), sleeping in training.
# Use:  HOSTFILE=launchers/hostfile ACTOR=/models/sft-70b RM=runs/rm-8b/model PROMPTS=/data/prompts.jsonl \
#         bash launchers/ppo_70b_multinode_hostfile.sh
#       DRY_RUN=1 bash launchers/ppo_70b_multinode_hostfile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=8 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=640
export HOSTFILE=${HOSTFILE:-launchers/hostfile.example}
run_job aplot_rlhf.cli.train_ppo \
  --actor_model "${ACTOR:-ds_configs/model_shapes/llama3-70b}" --reward_model "${RM:-ds_configs/model_shapes/llama3-8b}" \
  --critic_init actor \
  --prompt_data "${PROMPTS:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}" \
  --ds_config ds_configs/ppo_actor_zero3_offload_bf16.json --reference_ds_config ds_configs/ppo_ref_zero3_bf16.json \
  --zero_stage 3 --precision bf16 --offload_optimizer \
  --gradient_checkpointing --timeout_s 3600 \
  --rollout_backend vllm --vllm_tensor_parallel_size 8 --vllm_gpu_memory_utilization 0.5 --vllm_sleep \
  --rollout_batch_size 16 --ppo_mini_batch_size 8 --micro_batch_size 1 \
  --max_prompt_length 1024 --max_new_tokens 1024 --learning_rate 3e-7 --critic_learning_rate 5e-6 \
  --kl_coef 0.01 --ppo_iterations 500 --output_dir "${OUT:-runs/ppo-70b}" --save_steps 20
