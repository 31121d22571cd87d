#!/usr/bin/env bash
# GRPO (critic-free), Llama-3-8B class actor + reference, 8B reward model, on ONE node: 8 GPUs x 80 GB,
# >= 256 GiB host RAM. No critic is built: each prompt is sampled 8 times and the group's mean and std are
# the baseline; the KL to the reference is a k3 loss term. Every rank runs its own vLLM engine (TP 1) on
# the same GPU; vLLM sleeps during training and the optimizer states leave the GPU during generation.
# Use:  ACTOR=/models/sft-8b RM=runs/rm-8b/model PROMPTS=/data/prompts.jsonl bash launchers/ppo_7b_grpo_single_node.sh
#       DRY_RUN=1 bash launchers/ppo_7b_grpo_single_node.sh   # checks flags, DeepSpeed JSON and memory; no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=1 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=256
run_job aplot_rlhf.cli.train_ppo \
  --actor_model "${ACTOR:-ds_configs/model_shapes/llama3-8b}" --reward_model "${RM:-ds_configs/model_shapes/llama3-8b}" \
  --prompt_data "${PROMPTS:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}" \
  --ds_config ds_configs/ppo_actor_zero3_bf16.json --reference_ds_config ds_configs/ppo_ref_zero3_bf16.json \
  --zero_stage 3 --precision bf16 --gradient_checkpointing \
  --advantage_estimator grpo --samples_per_prompt 8 --kl_mode loss --kl_loss_estimator k3 --loss_aggregation seq_mean \
  --rollout_backend vllm --vllm_tensor_parallel_size 1 --vllm_gpu_memory_utilization 0.35 --vllm_sleep \
  --rollout_batch_size 8 --ppo_mini_batch_size 16 --micro_batch_size 2 \
  --max_prompt_length 1024 --max_new_tokens 1024 --learning_rate 1e-6 \
  --kl_coef 0.001 --ppo_iterations 1000 --output_dir "${OUT:-runs/grpo-8b}" --save_steps 50
