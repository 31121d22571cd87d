"""The PPO math in one place: pure tensor functions, each unit-tested against a hand-computed case.

Shapes: B sequences, T response tokens. `mask` [B, T] is 1 on response tokens up to and including
EOS, 0 on padding and on everything after EOS.
"""
from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum().clamp_min(2.0)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)  # unbiased, as advantage whitening usually is


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of x over the valid tokens (fp64): summed over ranks, they give the
    global mean and variance with one all-reduce."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64) * m
    return torch.stack([m.sum(), x.sum(), (x * x).sum()])


def moments_to_mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) from summed `masked_moments`."""
    n, s, ss = moments[0].clamp_min(1.0), moments[1], moments[2]
    mean = s / n
    var = (ss - n * mean * mean).clamp_min(0.0) / (n - 1.0).clamp_min(1.0)
    return mean, var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           moments: torch.Tensor | None = None) -> torch.Tensor:
    """Advantage whitening over the valid tokens only.

    moments: `masked_moments` summed over every rank's batch, to whiten over the global batch
    (default: this tensor's own tokens)."""
    if moments is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mean, var = (t.to(x.dtype) for t in moments_to_mean_var(moments))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def response_mask(tokens: torch.Tensor, eos_id: int | None, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (and where pad_mask is 0). tokens [B, T] -> [B, T]."""
    valid = torch.ones_like(tokens, dtype=torch.long) if pad_mask is None else pad_mask.long()
    if eos_id is not None:
        is_eos = (tokens == eos_id).long()
        after_eos = (torch.cumsum(is_eos, dim=1) - is_eos) > 0  # strictly after the first EOS
        valid = valid * (~after_eos).long()
    return valid


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Estimators of KL(π || π_ref) per sampled token (Schulman's k1/k2/k3). Inputs [B, T] log-probs."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r with r = π_ref / π, always >= 0
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {kind!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token reward: -β·KL on every response token, plus the sequence score at the last valid one.

    scores [B], kl [B, T], mask [B, T] -> rewards [B, T] (0 on masked tokens).
    """
    rewards = -beta * kl * mask
    last = (mask.long().sum(1) - 1).clamp_min(0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over masked responses, value 0 after the last valid token.

    rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]), both 0 where masked.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages * mask, returns


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float, aggregation: str = "token_mean",
                counts: torch.Tensor | None = None, horizon: int | None = None,
                is_weights: torch.Tensor | None = None):
    """Clipped surrogate. -> (loss, clip fraction, approx KL old||new), all scalars.

    aggregation, counts, horizon: how token losses become the loss (`aggregate`); the diagnostics are
    this batch's token means. is_weights [B, T]: rollout importance weights (`rollout_is_weights`,
    constants) multiplying each token's clipped loss; None = 1."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    token_loss = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        token_loss = token_loss * is_weights
    loss = aggregate(token_loss, mask, aggregation, counts, horizon)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


ROLLOUT_IS_MODES = ("off", "truncate", "mask")


def rollout_is_weights(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Rollout importance weights for the sampler/trainer mismatch: ratio = exp(old train log-prob - rollout
    log-prob) per token, both of the sampled token under the policy of this rollout (the trainer's forward
    vs the generation engine's, which differ in kernels, precision and, with LoRA, merged bf16 weights).

    'truncate': w = min(ratio, cap) (truncated IS, Yao et al. 2025; OpenRLHF's vllm_is correction, verl's
    rollout_is truncate); 'mask': tokens with ratio outside [1/cap, cap] leave the loss (and its token counts),
    the others keep w = ratio (verl's token-level mask mode, bounds 1/cap and cap); 'off': no weights.
    Inputs [B, T] -> (weights [B, T], detached, 0 on masked tokens; or None for 'off', the loss mask [B, T])."""
    if mode == "off":
        return None, mask
    log_ratio = (train_logprobs - rollout_logprobs).detach().float()
    valid = mask > 0
    if mode == "truncate":
        weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
        return torch.where(valid, weights, torch.zeros_like(weights)), mask
    if mode == "mask":
        keep = valid & (log_ratio.abs() <= math.log(cap))
        weights = torch.where(keep, torch.exp(log_ratio.clamp(-math.log(cap), math.log(cap))),
                              torch.zeros_like(log_ratio))
        return weights, mask * keep.to(mask.dtype)
    raise ValueError(f"rollout_is must be one of {ROLLOUT_IS_MODES}, got {mode!r}")


def rollout_mismatch(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float) -> torch.Tensor:
    """[valid tokens, sum of |train - rollout| log-prob, tokens whose ratio is outside [1/cap, cap], max |train -
    rollout|] over the valid tokens of [B, T] inputs, fp32 on their device: the first three add up over ranks
    (`mismatch_metrics`), the last is a max."""
    diff = (train_logprobs - rollout_logprobs).detach().float().abs()
    valid = mask > 0
    diff = torch.where(valid, diff, torch.zeros_like(diff))
    return torch.stack([valid.sum().float(), diff.sum(), (diff > math.log(cap)).sum().float(),
                        diff.max() if diff.numel() else diff.sum()])


def mismatch_metrics(summed: torch.Tensor, max_diff: torch.Tensor) -> dict:
    """`rollout_mismatch`'s first three entries summed over ranks, and its max over ranks -> the logged
    rollout/logprob_abs_diff_mean, rollout/logprob_abs_diff_max and rollout/logprob_mismatch_frac (tensors)."""
    n = summed[0].clamp_min(1.0)
    return {"rollout/logprob_abs_diff_mean": summed[1] / n, "rollout/logprob_abs_diff_max": max_diff,
            "rollout/logprob_mismatch_frac": summed[2] / n}


def value_loss(values, old_values, returns, mask, clip: float, counts: torch.Tensor | None = None):
    """Clipped value loss: 0.5 · max((v - R)², (clip(v, v_old ± c) - R)²), a token mean (`aggregate`,
    with `counts` of the whole mini-batch when this is one micro-batch of it). -> (loss, clip fraction)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(loss_unclipped, loss_clipped), mask, "token_mean", counts)
    clip_frac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clip_frac.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical over the last dim. [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) from logits that predict it. logits [B, T, V], tokens [B, T] -> [B, T] fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the policy that sampling at `temperature` draws from (0 = greedy: left as they are)."""
    if temperature <= 0 or temperature == 1.0:
        return logits
    return logits.float() / temperature


class FixedKLController:
    """β stays constant."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, observed_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


class AdaptiveKLController(FixedKLController):
    """Proportional controller toward a target KL (Ziegler et al. 2019):

    β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n_steps / horizon).
    """

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, observed_kl: float, n_steps: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon


# ------------------------------------------------------------------------------ critic-free estimators
# Sequences of one prompt are contiguous: a rollout of N = P * K sequences holds P groups of K samples.

def group_view(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N] -> [N / k, k] (groups of one prompt's k samples)."""
    if scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {k}")
    return scores.reshape(-1, k)


def grpo_scores(scores: torch.Tensor, k: int, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - mean of the prompt's k rewards) / (std + eps); without std_normalize only the mean is
    removed (Dr. GRPO's advantage; Dr. GRPO also drops the per-sequence length normalization, which is
    the loss aggregation's business: 'seq_mean_token_sum_norm'). std is the unbiased sample std. [N] -> [N]."""
    g = group_view(scores, k)
    centred = g - g.mean(1, keepdim=True)
    if std_normalize:
        centred = centred / (g.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO: r - mean of the other k - 1 rewards of the same prompt. [N] -> [N]."""
    if k < 2:
        raise ValueError("rloo needs at least 2 samples per prompt")
    g = group_view(scores, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)


def group_statistics(scores: torch.Tensor, k: int, atol: float = 1e-6):
    """(mean over groups of the reward std, share of groups whose k rewards are all equal, per-sequence
    mask [N] of the sequences in such groups). A group of equal rewards carries no signal for a
    group-relative baseline."""
    g = group_view(scores, k)
    uniform = (g.max(1).values - g.min(1).values) <= atol
    std = g.std(1) if k > 1 else torch.zeros(g.shape[0], device=g.device)
    return std.mean(), uniform.float().mean(), uniform.repeat_interleave(k)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go G_t = sum_{t' >= t} gamma^(t'-t) r_t' over the valid tokens. [B, T] -> [B, T]."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


AGGREGATIONS = ("token_mean", "seq_mean", "seq_mean_token_sum_norm")


def aggregation_counts(mask: torch.Tensor) -> torch.Tensor:
    """What `aggregate` divides by, for a batch: [valid tokens, sequences with valid tokens, sequences],
    fp32. Summed over the micro-batches of a mini-batch and over ranks, they make the mini-batch's."""
    m = mask.float()
    return torch.stack([m.sum(), (m.sum(1) > 0).float().sum(), torch.tensor(float(m.shape[0]), device=m.device)])


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", counts: torch.Tensor | None = None,
              horizon: int | None = None) -> torch.Tensor:
    """Loss over tokens, x and mask [B, T] -> scalar:

    'token_mean': sum of x over the valid tokens / number of valid tokens (every token weighs the same);
    'seq_mean': sum over sequences of each sequence's token mean / number of sequences with tokens;
    'seq_mean_token_sum_norm': sum of x over the valid tokens / (number of sequences x horizon), horizon a
    constant (the generation limit): no per-sequence length normalization (Dr. GRPO, Liu et al. 2025).

    counts: `aggregation_counts` of the whole batch this one is a part of (all micro-batches of a
    mini-batch, all ranks): the result is then this part's share of the whole batch's aggregate, and the
    parts' results add up to it. Default: this batch's own counts (a plain mean).
    horizon: default T."""
    if counts is None:
        counts = aggregation_counts(mask)
    m = mask.to(x.dtype)
    if how == "token_mean":
        return (x * m).sum() / counts[0].clamp_min(1.0)
    if how == "seq_mean":
        return masked_mean(x, mask, dim=1).sum() / counts[1].clamp_min(1.0)  # 0 for a sequence without tokens
    if how == "seq_mean_token_sum_norm":
        return (x * m).sum() / (counts[2].clamp_min(1.0) * (x.shape[1] if horizon is None else horizon))
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {how!r}")


def critic_free_advantages(estimator: str, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, k: int,
                           beta: float, gamma: float = 1.0, grpo_std_normalize: bool = True,
                           reduce_sum=lambda t: t) -> torch.Tensor:
    """Token advantages [B, T] of the critic-free estimators.

    grpo / rloo: the group-baselined score sits at the response's last token, -beta * KL on every token
    (beta = 0 when the KL is a loss term instead), and each token's advantage is its return-to-go.
    reinforce_pp: the same returns-to-go from the raw score, whitened over the global batch
    (`reduce_sum` sums `masked_moments` over ranks; the identity for one process).
    scores [B] (normalized RM scores), kl [B, T] per-token KL estimates, mask [B, T]."""
    if estimator == "grpo":
        baselined = grpo_scores(scores, k, grpo_std_normalize)
    elif estimator == "rloo":
        baselined = rloo_scores(scores, k)
    elif estimator == "reinforce_pp":
        baselined = scores
    else:
        raise ValueError(f"not a critic-free estimator: {estimator!r}")
    adv = discounted_returns(token_rewards(baselined, kl, mask, beta), mask, gamma)
    if estimator == "reinforce_pp":
        adv = whiten(adv, mask, moments=reduce_sum(masked_moments(adv, mask)))
    return adv
