#!/bin/sh
# issue 24: two more GRPO runs against TRL (runs 3 and 4 after the shared prefill), the study paused
cd /work/main
for RUN in 3 4; do
  echo "=== run $RUN start $(date -u +%T) $(cat /proc/loadavg)"
  .venv/bin/python benchmarks/peer_grpo.py --trl-python /work/wt-peer/.venv-trl/bin/python --steps 10 --chunk 2 --json benchmarks/results/peer_grpo/run_shared_prefill_$RUN.json > runs/grpo_run_$RUN.log 2>&1
  echo "=== run $RUN done $(date -u +%T) $(cat /proc/loadavg)"
done
