#!/bin/sh
# issue 24: ours-only MiniLM step time at 6ffe05c (issue 14's 1.41x) and at HEAD, alternated, same machine
# /work/wt-old: `git worktree add /work/wt-old 6ffe05c` with main's .venv linked in; the ours-only worker
# imports the package from the tree on PYTHONPATH
set -e
for i in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then d=/work/wt-old; else d=/work/main; fi
    echo "=== $side round $i start $(date -u +%T) $(cat /proc/loadavg)"
    (cd $d && PYTHONPATH=$d /work/main/.venv/bin/python benchmarks/peer_trl.py --no_trl --max_steps 60 --chunk 60 --json /work/main/runs/minilm_ab/${side}_$i.json) > /work/main/runs/minilm_ab/${side}_$i.log 2>&1
    echo "=== $side round $i end $(date -u +%T) $(cat /proc/loadavg)"
  done
done
