#!/usr/bin/env bash
# APLOT reward model, Llama-3-70B class, on several nodes listed in a DeepSpeed hostfile.
#   assumes:  4 nodes x 8 GPUs x 80 GB (A100/H100 80GB), >= 512 GiB host RAM per node, passwordless ssh
#             from the first node to the others, the same repo path and .venv on every node
#   model:    MODEL=/path/to/Meta-Llama-3-70B (a local folder, visible at the same path on every node)
#   data:     DATA=/path/to/pairs.jsonl
#   recipe:   recipes/rm_70b.yaml (shared with rm_70b_slurm.sbatch): the hyper-parameters (ZeRO-3 bf16,
#             optimizer and parameters offloaded to CPU, 1 pair x 2048 tokens per GPU, ...) and, in its
#             header, the memory plan for this hardware and the faster no-offload alternative.
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
run_job aplot_rlhf.cli.train_rm --config recipes/rm_70b.yaml \
  --model_name_or_path "$MODEL" --train_data "$DATA" --output_dir "${OUT:-runs/rm-70b}"
