import math

import torch

from aplot_rlhf.losses import bt_loss, fixed_margin, gamma_at, margin_diagnostics, pair_metrics


def test_bt_loss_hand_computed():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert abs(bt_loss(c, r).item() - expected) < 1e-6


def test_margin_shifts_the_logit():
    c, r, m = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5])
    assert abs(bt_loss(c, r, m).item() - (-math.log(1 / (1 + math.exp(-0.5))))) < 1e-6


def test_label_smoothing_hand_computed():
    c, r = torch.tensor([3.0]), torch.tensor([1.0])
    ls = 0.1
    p = 1 / (1 + math.exp(-2.0))
    expected = -(1 - ls) * math.log(p) - ls * math.log(1 - p)
    assert abs(bt_loss(c, r, label_smoothing=ls).item() - expected) < 1e-6


def test_gradient_flows_only_through_reward_difference():
    c = torch.tensor([1.0, 0.5], requires_grad=True)
    r = torch.tensor([0.2, 0.7], requires_grad=True)
    m = (c * 2).detach()
    bt_loss(c, r, m).backward()
    assert torch.allclose(c.grad, -r.grad)


def test_fixed_margin_and_missing_strength():
    assert fixed_margin(torch.tensor([2.0, float("nan")]), 0.5).tolist() == [1.0, 0.0]


def test_gamma_warmup():
    assert gamma_at(0, 2.0, 10) == 0.0 and gamma_at(5, 2.0, 10) == 1.0 and gamma_at(50, 2.0, 10) == 2.0
    assert gamma_at(0, 2.0, 0) == 2.0


def test_metrics_names_and_values():
    m = pair_metrics(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert m["accuracy"] == 0.5 and m["rewards/margins"] == 0.0
    d = margin_diagnostics(torch.tensor([0.0, 0.5, 0.6]), torch.tensor([1.0, 0.0, 0.1]), torch.zeros(3), 0.3)
    assert abs(d["aplot/easy_frac"] - 1 / 3) < 1e-6 and abs(d["aplot/hard_frac"] - 2 / 3) < 1e-6
    assert d["aplot/margin_gap_corr"] < 0
