"""Pairwise reward-model losses: pure functions of tensors (no I/O, no distributed calls).

All take chosen and rejected rewards [B] and return a scalar loss averaged over the pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """Bradley-Terry with an optional per-pair margin [B] (detached by the caller) and label smoothing:

    L = -mean[(1 - ls) * log σ(Δ - m) + ls * log σ(-(Δ - m))], Δ = r_c - r_r.
    """
    logits = chosen.float() - rejected.float()
    if margin is not None:
        logits = logits - margin.to(logits.dtype)
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss.mean()


def fixed_margin(strength: torch.Tensor, scale: float) -> torch.Tensor:
    """Margin from a data column: strength * scale, 0 where the pair has no strength (NaN)."""
    return torch.nan_to_num(strength.float(), nan=0.0) * scale


def gamma_at(step: int, gamma: float, warmup_steps: int) -> float:
    """APLOT's γ with an optional linear warm-up from 0 over `warmup_steps` optimizer steps."""
    if warmup_steps <= 0:
        return gamma
    return gamma * min(1.0, step / warmup_steps)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """TRL-style metric names for a batch of pairs (0-dim tensors on the rewards' device: no host sync)."""
    diff = (chosen - rejected).detach().float()
    return {
        "accuracy": (diff > 0).float().mean(),
        "rewards/chosen": chosen.detach().float().mean(),
        "rewards/rejected": rejected.detach().float().mean(),
        "rewards/margins": diff.mean(),
    }


def margin_diagnostics(margin: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                       hard_threshold: float, easy_threshold: float = 0.05) -> dict:
    """APLOT diagnostics: margin mean/std, its correlation with the reward gap, easy/hard shares.

    0-dim tensors (no host sync); the correlation is NaN where either side is constant."""
    m = margin.detach().float()
    gap = (chosen - rejected).detach().float()
    nan = torch.full((), float("nan"), device=m.device)
    if m.numel() > 1:
        corr = torch.corrcoef(torch.stack([m, gap]))[0, 1]  # NaN (0/0) for a constant side
        std = m.std()
    else:
        corr, std = nan, torch.zeros((), device=m.device)
    return {
        "aplot/margin_mean": m.mean(),
        "aplot/margin_std": std,
        "aplot/margin_gap_corr": corr,
        "aplot/easy_frac": (m < easy_threshold).float().mean(),
        "aplot/hard_frac": (m > hard_threshold).float().mean(),
    }
