"""The PPO demo's verdict (issue 25 item 9): the printed change, its 95% interval, and the exit status that
`make demo-ppo` returns. A whole demo run (minutes) is not in the suite: `make demo-ppo` is that check."""
import torch

from aplot_rlhf.cli.demo_ppo import paired_change


def test_interval_is_paired_and_needs_its_lower_end_above_zero():
    before = torch.tensor([0.1, 0.5, -0.2, 0.3])
    after = before + torch.tensor([0.2, 0.1, 0.3, 0.2])
    out = paired_change(before, after)
    diff = torch.tensor([0.2, 0.1, 0.3, 0.2], dtype=torch.float64)
    assert abs(out["change"] - 0.2) < 1e-6
    assert abs(out["half_width"] - 1.96 * diff.std().item() / 2) < 1e-6  # the paired differences' spread only
    assert out["higher"] == 4 and out["n"] == 4 and out["significant"]


def test_a_change_whose_interval_reaches_zero_fails():
    # the demo on main before this change: +0.0596 +- 0.0762, higher for 17 of 32 (the interval includes 0)
    gen = torch.Generator().manual_seed(0)
    diff = torch.randn(32, generator=gen, dtype=torch.float64)
    diff = (diff - diff.mean()) / diff.std() * (0.0762 * 32 ** 0.5 / 1.96) + 0.0596
    out = paired_change(torch.zeros(32), diff.float())
    assert abs(out["change"] - 0.0596) < 1e-5 and abs(out["half_width"] - 0.0762) < 1e-5
    assert not out["significant"]
    assert not paired_change(torch.zeros(32), -diff.float())["significant"]  # a significant fall fails too
    assert not paired_change(torch.zeros(1), torch.ones(1))["significant"]  # one prompt: no interval
