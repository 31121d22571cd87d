"""The run scaffold's pure parts: evaluation shards and the sampler's position -> batch mapping."""
from __future__ import annotations

import subprocess

import pytest

from aplot_rlhf.data.sampler import PairSampler
from aplot_rlhf.trainers.run import rank_shard
from helpers import PYTHON, REPO, python_env


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (1, 4), (7, 1)])
def test_rank_shards_are_equal_sized_and_gather_back_to_the_items_in_order(n, world):
    items = list(range(n))
    shards = [rank_shard(items, r, world) for r in range(world)]
    assert len({len(s) for s, _ in shards}) == 1  # collectives stay matched
    gathered = [x for s, _ in shards for x in s]
    assert gathered[:n] == items
    counted = [x for s, c in shards for x, keep in zip(s, c) if keep]
    assert counted == items  # every item counts exactly once


@pytest.mark.parametrize("lengths", [None, [i % 7 for i in range(40)]])
def test_sampler_batch_at_a_position_is_that_epoch_s_batch(lengths):
    for rank in range(2):
        sampler = PairSampler(40, 3, 2, rank, seed=5, lengths=lengths)
        per_epoch = sampler.batches_per_rank
        for position in [0, 1, per_epoch - 1, per_epoch, 2 * per_epoch + 2, 1]:  # back to epoch 0 at the end
            epoch, b = divmod(position, per_epoch)
            assert sampler.batch(position) == sampler.epoch_batches(epoch)[b]


def test_a_second_run_in_one_process_gets_fresh_deepspeed_groups():
    """Two runs one after the other in one process (a notebook, a sweep): the first destroys its process group
    at close, and DeepSpeed must not be handed the groups it cached from it ("Group ... is not registered")."""
    code = """
import torch
from aplot_rlhf.config import RMConfig
from aplot_rlhf.engine import deepspeed as ds_api
from aplot_rlhf.engine import distributed as comm
cfg = RMConfig(model_name_or_path="m", train_data="t.jsonl", zero_stage=0, micro_batch_size=1)
for run in range(2):
    ds_api.init_distributed("gloo", 60)
    engine, _ = ds_api.initialize(torch.nn.Linear(4, 2), ds_api.build_ds_config(cfg, 1), cfg, total_steps=2)
    comm.shutdown()
print("two runs ok")
"""
    proc = subprocess.run([PYTHON, "-c", code], env=python_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "two runs ok" in proc.stdout, proc.stderr[-3000:]
