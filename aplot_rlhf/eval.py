"""Pairwise evaluation of reward models: scores, accuracy, reward statistics, plots."""
from __future__ import annotations

import math

import torch

from .data.collate import collate_pairs
from .models.packing import to_device


@torch.no_grad()
def score_pairs(forward, encoded: list[dict], batch_size: int, pad_id: int, device,
                pack=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every pair's chosen and rejected response.

    forward(input_ids, attention_mask, response_start) -> rewards [2b]; with `pack` (pairs -> a
    collate_pairs_packed batch), forward(packed=layout on `device`) instead. Returns (chosen [n], rejected [n])
    fp32 CPU.
    """
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        if pack is not None:
            rewards = forward(packed=to_device(pack(chunk)["packed"], device)).float().cpu()
        else:
            batch = collate_pairs(chunk, pad_id)
            rewards = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              batch["response_start"].to(device)).float().cpu()
        chosen.append(rewards[:len(chunk)])
        rejected.append(rewards[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


def summarize(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Accuracy (ties count as wrong), mean rewards, and the distribution of chosen - rejected."""
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        bad = int((~torch.isfinite(chosen)).sum() + (~torch.isfinite(rejected)).sum())
        raise FloatingPointError(f"{bad} reward(s) are NaN or inf: the model or its weights are broken")
    diff = chosen - rejected
    n = int(chosen.numel())
    acc = (diff > 0).float().mean().item()
    return {
        "accuracy": acc,
        "n": n,
        "accuracy_ci95": 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1)),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": diff.mean().item(),
        "rewards/margins_std": diff.std().item() if n > 1 else 0.0,
        "rewards/margins_median": diff.median().item(),
    }


def plot_reward_distributions(results: dict, path: str, title: str = "") -> None:
    """results: name -> (chosen [n], rejected [n]). One panel per set: chosen vs rejected histograms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        c, r = (t.float().numpy() for t in results[name])
        lo, hi = float(min(c.min(), r.min())), float(max(c.max(), r.max()))
        bins = 30 if hi > lo else 1
        ax.hist(c, bins=bins, range=(lo, hi + 1e-6), alpha=0.55, label="chosen", color="tab:green")
        ax.hist(r, bins=bins, range=(lo, hi + 1e-6), alpha=0.55, label="rejected", color="tab:red")
        ax.set_title(f"{name}: acc {(c > r).mean():.3f} (n={len(c)})", fontsize=9)
        ax.set_xlabel("reward")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
