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


# ---------------------------------------------------------------------- issue 25 item 4: estimators as published

def test_dr_grpo_by_hand():
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): advantage r - group mean (no std),
    and the loss sums each sequence's tokens and divides by a constant, (number of sequences) x (generation
    limit), not by each sequence's length. Two samples of one prompt, rewards 1 and 3, generation limit 4:
    advantages -1 and +1; at ratio 1 the token losses are -A, so the loss is (2 x 1 - 3 x 1) / (2 x 4)."""
    from aplot_rlhf.trainers.ppo_math import policy_loss
    scores = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # lengths 2 and 3 (the rollout's longest: 3)
    adv = critic_free_advantages("grpo", scores, torch.zeros(2, 3), mask, 2, beta=0.0, grpo_std_normalize=False)
    assert adv.tolist() == [[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _, _ = policy_loss(lp, lp.detach(), adv, mask, 0.2, "seq_mean_token_sum_norm", horizon=4)
    assert loss.item() == pytest.approx((2 * 1.0 - 3 * 1.0) / (2 * 4))
    loss.backward()  # d loss / d logprob = -A / (sequences x horizon) on every valid token, whatever its length
    assert lp.grad.flatten().tolist() == pytest.approx([1 / 8, 1 / 8, 0.0, -1 / 8, -1 / 8, -1 / 8])
    # seq_mean would divide each sequence by its own length: the published GRPO, not Dr. GRPO
    assert aggregate(-adv, mask, "seq_mean").item() == pytest.approx((1.0 - 1.0) / 2)


def test_micro_batch_parts_add_up_to_the_mini_batch_aggregate():
    """Each micro-batch's aggregate with the mini-batch's counts is its share: the shares add up to the
    mini-batch's aggregate, gradients included (micro-batches of different token counts)."""
    from aplot_rlhf.trainers.ppo_math import aggregation_counts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    for how in ("token_mean", "seq_mean", "seq_mean_token_sum_norm"):
        whole = aggregate(x, mask, how, horizon=8)
        (g_whole,) = torch.autograd.grad(whole, x)
        counts = aggregation_counts(mask[:2]) + aggregation_counts(mask[2:])
        parts = aggregate(x[:2], mask[:2], how, counts, horizon=8) + aggregate(x[2:], mask[2:], how, counts, horizon=8)
        (g_parts,) = torch.autograd.grad(parts, x)
        assert parts.item() == pytest.approx(whole.item(), abs=1e-12), how
        assert torch.allclose(g_parts, g_whole, atol=1e-12), how


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_config_refuses_a_discount_for_group_estimators(estimator):
    """GRPO and RLOO score whole sequences: their returns are undiscounted (gamma 1); --gamma is GAE's
    (and REINFORCE++'s) knob, refused rather than silently ignored."""
    from aplot_rlhf.config import PPOConfig, load_config
    from aplot_rlhf.errors import ConfigError
    base = ["--actor_model", "a", "--reward_model", "rule:neg_length", "--prompt_data", "p.jsonl",
            "--advantage_estimator", estimator, "--samples_per_prompt", "4", "--rollout_batch_size", "2",
            "--ppo_mini_batch_size", "4", "--micro_batch_size", "2"]
    with pytest.raises(ConfigError, match="--gamma 0.99"):
        load_config(PPOConfig, base + ["--gamma", "0.99"])
    assert load_config(PPOConfig, base).gamma == 1.0
    cfg = load_config(PPOConfig, base + ["--loss_aggregation", "seq_mean_token_sum_norm", "--no-grpo_std_normalize"])
    assert cfg.loss_aggregation == "seq_mean_token_sum_norm"
