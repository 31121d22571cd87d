"""Each piece of the PPO math against a case computed by hand."""
import math

import pytest
import torch

from aplot_rlhf.rewards import normalize_scores
from aplot_rlhf.trainers.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_per_token,
    logprobs_of,
    masked_mean,
    policy_loss,
    response_mask,
    token_rewards,
    value_loss,
    whiten,
)


def test_response_mask_stops_after_first_eos_and_respects_padding():
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 2, 9, 9, 9], [5, 6, 7, 8, 9]])
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    assert response_mask(tokens, 2, pad).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]


def test_kl_estimators():
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_per_token(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_per_token(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # r - 1 - log r, r = 0.5
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k4")


def test_token_rewards_put_score_on_last_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([1.0, -1.0]), kl, mask, beta=0.5)
    assert torch.allclose(r, torch.tensor([[-0.05, 1.0 - 0.1, 0.0], [-0.25, -0.25, -1.0 - 0.25]]))


def test_normalize_scores_uses_rm_statistics():
    assert normalize_scores(torch.tensor([3.0]), 1.0, 2.0).item() == 1.0
    assert normalize_scores(torch.tensor([3.0]), None, None).item() == 3.0


def test_gae_hand_computed():
    # one sequence, 2 valid tokens then padding; gamma 0.9, lambda 0.8
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d1 = 1.0 + 0.9 * 0.0 - 0.2            # value after the last valid token is 0
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a1, a0 = d1, d0 + 0.9 * 0.8 * d1
    assert torch.allclose(adv, torch.tensor([[a0, a1, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, 0.0]]))


def test_whiten_ignores_masked_tokens():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-1.0 / math.sqrt(2), 1.0 / math.sqrt(2), 0.0]]), atol=1e-6)


def test_policy_loss_clipping():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clip_frac, _ = policy_loss(new, old, adv, mask, clip=0.2)
    # token 1: ratio 1.5, A>0 -> clipped to 1.2 -> -1.2; token 2: ratio 0.5, A<0 -> clipped to 0.8 -> +0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clip_frac.item() == 1.0


def test_value_loss_clipping():
    v, old, ret = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]])
    loss, frac = value_loss(v, old, ret, torch.ones(1, 1), clip=0.5)
    assert loss.item() == pytest.approx(0.5 * (0.5 - 3.0) ** 2) and frac.item() == 1.0


def test_entropy_and_logprobs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert entropy_from_logits(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert logprobs_of(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(10.0, 100)
    assert fixed.beta == 0.1
    ada = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ada.update(12.0, 10)  # error clipped to +0.2 -> beta * (1 + 0.2 * 10 / 100)
    assert ada.beta == pytest.approx(0.1 * 1.02)
    state = ada.state_dict()
    other = AdaptiveKLController(1.0, 6.0, 100)
    other.load_state_dict(state)
    assert other.beta == ada.beta


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([1, 1, 0])).item() == 2.0
