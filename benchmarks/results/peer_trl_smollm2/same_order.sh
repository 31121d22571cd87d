#!/bin/sh
# issue 24: the goal's "same validation accuracy" with the sampling order taken out (--same_order): TRL reads the
# pairs in ours' order and both sides log every step's loss. Beside the quality study (load ~3): only the
# accuracies and loss curves count, not the speed.
cd /work/main
T=/work/wt-peer/.venv-trl/bin/python
echo "=== minilm epoch $(date -u +%T) $(cat /proc/loadavg)"
.venv/bin/python benchmarks/peer_trl.py --trl-python $T --same_order --chunk 20 --json benchmarks/results/peer_trl/minilm_same_order.json
echo "=== smollm2 lora 40 steps $(date -u +%T) $(cat /proc/loadavg)"
.venv/bin/python benchmarks/peer_trl.py --trl-python $T --backbone smollm2 --finetune lora --same_order --max_steps 40 --chunk 10 --json benchmarks/results/peer_trl_smollm2/lora_same_order.json
echo "=== smollm2 full 24 steps $(date -u +%T) $(cat /proc/loadavg)"
.venv/bin/python benchmarks/peer_trl.py --trl-python $T --backbone smollm2 --finetune full --same_order --max_steps 24 --chunk 8 --json benchmarks/results/peer_trl_smollm2/full_same_order.json
echo "=== done $(date -u +%T) $(cat /proc/loadavg)"
