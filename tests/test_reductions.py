"""Statistics reduced over ranks as over one global batch: advantage whitening, reward std, and logged
means that one rank's NaN cannot poison. Two real gloo processes (no DeepSpeed needed)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port

pytestmark = pytest.mark.distributed


def _worker(rank, world, port, x_all, mask_all, results):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from aplot_rlhf.engine import distributed as comm
        from aplot_rlhf.trainers.ppo_math import masked_moments, moments_to_mean_var, whiten
        rows = slice(rank * 2, rank * 2 + 2)  # each rank holds 2 of the 4 sequences
        x, mask = x_all[rows], mask_all[rows]
        white = whiten(x, mask, moments=comm.all_reduce_sum(masked_moments(x, mask)))
        ones = torch.ones(2)
        scores = x[:, 0]
        _, var = moments_to_mean_var(comm.all_reduce_sum(masked_moments(scores, ones)))
        stat = torch.tensor([1.0 + rank, float("nan") if rank == 1 else 0.5, float("nan")])
        logged = comm.all_reduce_finite_mean(stat)
        results[rank] = (white, var.sqrt().item(), logged)
    finally:
        dist.destroy_process_group()


def test_whitening_and_statistics_over_two_ranks_equal_the_global_batch():
    from aplot_rlhf.trainers.ppo_math import whiten
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 1
    mask = (torch.rand(4, 6) > 0.3).float()
    mask[:2] *= 0.0
    mask[:2, :2] = 1.0  # rank 0's sequences are short, rank 1's long: per-rank means of means would be off
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), x, mask, results), nprocs=2, join=True)
    expected = whiten(x, mask)  # one process, the whole batch
    got = torch.cat([results[0][0], results[1][0]])
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    assert results[0][1] == pytest.approx(x[:, 0].std().item(), rel=1e-6)
    logged = results[0][2]
    assert logged[0].item() == pytest.approx(1.5)       # mean over ranks
    assert logged[1].item() == pytest.approx(0.5)       # rank 1's NaN left out, not propagated
    assert torch.isnan(logged[2])                       # NaN only where no rank had a value
