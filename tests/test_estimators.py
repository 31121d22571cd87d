"""The critic-free estimators against hand-computed cases: K = 4 samples per prompt, one group of
distinct rewards and one whose four rewards are equal, and one response cut at EOS after 2 of 3 tokens."""
import math

import pytest
import torch

from aplot_rlhf.trainers.ppo_math import (
    aggregate,
    critic_free_advantages,
    discounted_returns,
    group_statistics,
    grpo_scores,
    rloo_scores,
)

K = 4
# group A: rewards 1, 2, 3, 6; group B: four equal rewards (no signal)
SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
MASK = torch.ones(8, 3)
MASK[1, 2] = 0.0  # sequence 1 ended at EOS after 2 tokens


def test_grpo_by_hand():
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased std of 1, 2, 3, 6 around their mean 3
    expected = [-2 / std, -1 / std, 0.0, 3 / std] + [0.0] * 4
    assert grpo_scores(SCORES, K).tolist() == pytest.approx(expected, abs=1e-5)
    assert grpo_scores(SCORES, K, std_normalize=False).tolist() == pytest.approx([-2, -1, 0, 3, 0, 0, 0, 0])


def test_rloo_by_hand():
    # r_i minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0] + [0.0] * 4
    assert rloo_scores(SCORES, K).tolist() == pytest.approx(expected, abs=1e-6)


def test_group_statistics_count_the_uniform_group():
    std, uniform_frac, uniform = group_statistics(SCORES, K)
    assert std.item() == pytest.approx(math.sqrt(14 / 3) / 2)  # mean of (std A, std B = 0)
    assert uniform_frac.item() == 0.5
    assert uniform.tolist() == [False] * 4 + [True] * 4


def test_grpo_advantage_is_the_same_on_every_token_and_zero_after_eos():
    kl = torch.zeros(8, 3)
    adv = critic_free_advantages("grpo", SCORES, kl, MASK, K, beta=0.0)
    std = math.sqrt(14 / 3)
    assert adv[0].tolist() == pytest.approx([-2 / std] * 3, abs=1e-5)
    assert adv[1].tolist() == pytest.approx([-1 / std, -1 / std, 0.0], abs=1e-5)  # cut at EOS: no token after it
    assert adv[4:].abs().max().item() < 1e-6  # the uniform group carries nothing


def test_kl_in_the_reward_enters_as_returns_to_go():
    kl = torch.tensor([[0.1, 0.2, 0.3]] * 8)
    adv = critic_free_advantages("rloo", SCORES, kl, MASK, K, beta=0.5)
    # token t: -0.5 * (kl_t + ... + kl_last) plus the baselined score, which sits at the last valid token
    base0 = 1 - 11 / 3
    assert adv[0].tolist() == pytest.approx([base0 - 0.5 * 0.6, base0 - 0.5 * 0.5, base0 - 0.5 * 0.3], abs=1e-6)
    base1 = 2 - 10 / 3  # ends after token 2: its penalty sums only the two valid tokens
    assert adv[1].tolist() == pytest.approx([base1 - 0.5 * 0.3, base1 - 0.5 * 0.2, 0.0], abs=1e-6)


def test_reinforce_pp_whitens_returns_over_the_batch():
    kl = torch.tensor([[0.1, 0.2, 0.3]] * 8)
    adv = critic_free_advantages("reinforce_pp", SCORES, kl, MASK, K, beta=0.5)
    returns = []  # by hand: return-to-go of the raw score with the KL penalty
    for i, r in enumerate(SCORES.tolist()):
        n = 2 if i == 1 else 3
        returns.append([r - 0.5 * sum([0.1, 0.2, 0.3][t:n]) for t in range(n)])
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    for i, row in enumerate(returns):
        assert adv[i, :len(row)].tolist() == pytest.approx([(x - mean) / std for x in row], abs=1e-5)
    assert adv[1, 2].item() == 0.0


def test_returns_to_go_and_loss_aggregation():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert discounted_returns(r, m, gamma=0.5).tolist() == [[1 + 0.5 * (2 + 0.5 * 3), 2 + 1.5, 3.0], [6.5, 5.0, 0.0]]
    x = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 9.0]])
    assert aggregate(x, m, "token_mean").item() == pytest.approx((3 + 4) / 5)
    assert aggregate(x, m, "seq_mean").item() == pytest.approx((1 + 2) / 2)


def test_config_refuses_group_estimators_without_groups():
    from aplot_rlhf.config import PPOConfig, load_config
    base = ["--actor_model", "a", "--reward_model", "rule:neg_length", "--prompt_data", "p.jsonl"]
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        load_config(PPOConfig, base + ["--advantage_estimator", "grpo"])
    with pytest.raises(ValueError, match="multiple of ppo_mini_batch_size"):
        load_config(PPOConfig, base + ["--advantage_estimator", "rloo", "--samples_per_prompt", "3",
                                       "--rollout_batch_size", "2", "--ppo_mini_batch_size", "4",
                                       "--micro_batch_size", "2"])
    cfg = load_config(PPOConfig, base + ["--advantage_estimator", "grpo", "--samples_per_prompt", "4",
                                         "--rollout_batch_size", "2", "--ppo_mini_batch_size", "4",
                                         "--micro_batch_size", "2"])
    assert cfg.samples_per_prompt == 4


def test_plan_without_a_critic_drops_its_states():
    from aplot_rlhf.plan import PlanInput, estimate, resolve_model
    model = resolve_model("llama3-8b")
    with_critic = estimate(PlanInput(model=model, job="ppo"))
    without = estimate(PlanInput(model=model, job="ppo", critic=False))
    assert "critic" in with_critic.roles and "critic" not in without.roles
    gib = lambda est: max(p.total_bytes for p in est.phases)  # noqa: E731
    assert gib(without) < gib(with_critic)
