"""The small interface every generation backend implements."""
from __future__ import annotations

from typing import Iterable, Protocol

import torch


class RolloutBackend(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seeds: list[int]) -> list[list[int]]:
        """Prompt token ids -> response token ids (ending at the first EOS, inclusive, or at the limit).

        seeds: one per prompt, from `sample_seeds` (distinct across ranks and iterations)."""

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the actor's current weights (HF names) into the backend."""

    def sleep(self) -> None:
        """Hand memory back to training."""

    def wake(self) -> None:
        """Take memory back for generation."""


# Sampling seeds: one per (run seed, iteration, rank, prompt), never repeated inside a run. A run seed owns
# SEED_STRIDE consecutive seeds, enough for 2**32 sampled sequences.
SEED_STRIDE = 2 ** 32


def sample_seeds(seed: int, iteration: int, rank: int, world: int, n: int) -> list[int]:
    """Distinct seeds for the n prompts rank `rank` samples in `iteration` (each iteration samples n per rank)."""
    first = seed * SEED_STRIDE + (iteration * world + rank) * n
    return [(first + i) % 2 ** 63 for i in range(n)]  # samplers take seeds below 2**63


def cut_at_eos(tokens: list[int], eos_ids: set[int], pad_id: int | None = None) -> list[int]:
    """Keep tokens up to and including the first EOS; drop padding."""
    out = []
    for t in tokens:
        if pad_id is not None and t == pad_id and t not in eos_ids:
            break
        out.append(t)
        if t in eos_ids:
            break
    return out
