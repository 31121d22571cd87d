"""Micro-batches of tokenized pairs: padded (2B rows, chosen then rejected) or packed (sequences share rows)."""
from __future__ import annotations

import torch


def collate_pairs(batch: list[dict], pad_id: int) -> dict:
    """Pairs -> one padded batch of 2B sequences: rows [0, B) chosen, rows [B, 2B) rejected.

    Returns input_ids, attention_mask [2B, L] (L = longest in the batch), response_start [2B],
    strength [B] (NaN where absent).
    """
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    response_start = torch.tensor([b["chosen_start"] for b in batch] + [b["rejected_start"] for b in batch])
    strength = torch.tensor([float("nan") if b["strength"] is None else b["strength"] for b in batch])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_start": response_start,
            "strength": strength}


def last_non_pad(seq: list[int], pad_id: int) -> int:
    """Offset of the rightmost non-pad token (0 if none): the token transformers' decoder heads read."""
    for k in range(len(seq) - 1, -1, -1):
        if seq[k] != pad_id:
            return k
    return 0


def collate_pairs_packed(batch: list[dict], pad_id: int, capacity: int | None, reads_last_token: bool) -> dict:
    """Pairs -> one packed batch of the same 2B sequences as collate_pairs (chosen, then rejected).

    Returns packed (models.packing.pack's layout plus reward_index [2B], the flat index of each
    sequence's reward token: the rightmost non-pad token for decoders, as with padding, or the first
    ([CLS]) for encoders; pool_weight [R*L], 1 on response tokens), response_start [2B], strength [B]."""
    from ..models.packing import pack
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    starts = [b["chosen_start"] for b in batch] + [b["rejected_start"] for b in batch]
    layout = pack(seqs, pad_id, capacity)
    at = layout["start"].tolist()
    offset = [last_non_pad(s, pad_id) for s in seqs] if reads_last_token else [0] * len(seqs)
    weight = torch.zeros(layout["n_slots"])
    for a, s, r in zip(at, seqs, starts):
        weight[a + r:a + len(s)] = 1.0
    layout["reward_index"] = torch.tensor([a + o for a, o in zip(at, offset)], dtype=torch.long)
    layout["pool_weight"] = weight
    strength = torch.tensor([float("nan") if b["strength"] is None else b["strength"] for b in batch])
    return {"packed": layout, "response_start": torch.tensor(starts), "strength": strength}
