"""The small interface every generation backend implements."""
from __future__ import annotations

from typing import Iterable, Protocol

import torch


class RolloutBackend(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        """Prompt token ids -> response token ids (ending at the first EOS, inclusive, or at the limit)."""

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the actor's current weights (HF names) into the backend."""

    def sleep(self) -> None:
        """Hand memory back to training."""

    def wake(self) -> None:
        """Take memory back for generation."""


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
