#!/usr/bin/env bash
# APLOT reward model, Llama-3-70B class, on several nodes listed in a DeepSpeed hostfile.
#   assumes:  4 nodes x 8 GPUs x 80 GB (A100/H100 80GB), >= 512 GiB host RAM per node, passwordless ssh
#             from the first node to the others, the same repo path and .venv on every node
#   model:    MODEL=/path/to/Meta-Llama-3-70B (a local folder, visible at the same path on every node)
#   data:     DATA=/path/to/pairs.jsonl
#   plan:     ZeRO-3 bf16 with optimizer states AND parameters offloaded to CPU: peak ~14 GiB per GPU,
#             ~440 GiB host RAM per node, leaving GPU memory for longer sequences or bigger micro-batches.
#             Without offload the same run plans ~50 GiB per GPU and steps faster (use rm_zero3_bf16.json
#             and drop --offload_*); on 2 nodes only the offloaded setup fits (see docs/scaling.md).
# Use (on the first node):
#       HOSTFILE=launchers/hostfile MODEL=/models/Meta-Llama-3-70B DATA=/data/pairs.jsonl \
#         bash launchers/rm_70b_multinode_hostfile.sh
#       DRY_RUN=1 bash launchers/rm_70b_multinode_hostfile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_common.sh
export APLOT_PLAN_NODES=4 APLOT_PLAN_GPUS_PER_NODE=8 APLOT_PLAN_GPU_MEM_GIB=80 APLOT_PLAN_CPU_MEM_GIB=512
export HOSTFILE=${HOSTFILE:-launchers/hostfile.example}
MODEL=${MODEL:-ds_configs/model_shapes/llama3-70b}  # the default is a shape only: enough for DRY_RUN
DATA=${DATA:-aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl}
run_job aplot_rlhf.cli.train_rm \
  --model_name_or_path "$MODEL" --train_data "$DATA" --eval_split_fraction 0.02 \
  --ds_config ds_configs/rm_zero3_offload_bf16.json --zero_stage 3 --precision bf16 \
  --offload_optimizer --offload_param \
  --micro_batch_size 1 --gradient_accumulation_steps 8 --max_length 2048 --gradient_checkpointing \
  --learning_rate 2e-6 --loss aplot --aplot_ot_batch global --timeout_s 1800 \
  --output_dir "${OUT:-runs/rm-70b}" --save_steps 200 --eval_steps 200
