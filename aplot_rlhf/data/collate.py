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


def shared_prefix_length(batch_item: dict) -> int:
    """The tokens a pair's chosen and rejected sequences share at their start, up to the earlier response start
    (a shared prefix holds prompt tokens only, so mean pooling over the responses never reads it) and short of
    either whole sequence (each keeps a token of its own to read its reward at)."""
    c, r = batch_item["chosen_ids"], batch_item["rejected_ids"]
    n = min(batch_item["chosen_start"], batch_item["rejected_start"], len(c) - 1, len(r) - 1)
    k = 0
    while k < n and c[k] == r[k]:
        k += 1
    return k


def collate_pairs_shared(batch: list[dict], pad_id: int, capacity: int | None) -> dict:
    """Pairs -> one prompt-shared batch of the same 2B sequences as collate_pairs (decoders only): each pair is
    its shared prefix (shared_prefix_length) once, then the rest of chosen, then the rest of rejected, each
    attending to the prefix and to itself (models.packing.pack_shared).

    Returns packed (pack_shared's layout plus reward_index [2B]: the flat index of each sequence's rightmost
    non-pad token, in the prefix or its own suffix; pool_weight [R*L], 1 on response tokens; pool_segment
    [R*L], the sequence each response token belongs to), response_start [2B], strength [B]: what
    RewardModel.forward_packed reads, rewards and embeddings in collate_pairs' order."""
    from ..models.packing import pack_shared
    B = len(batch)
    prefix = [shared_prefix_length(b) for b in batch]
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    starts = [b["chosen_start"] for b in batch] + [b["rejected_start"] for b in batch]
    layout = pack_shared([(b["chosen_ids"][:k], [b["chosen_ids"][k:], b["rejected_ids"][k:]])
                          for b, k in zip(batch, prefix)], pad_id, capacity)
    weight = torch.zeros(layout["n_slots"])
    pool_segment = torch.full((layout["n_slots"],), -1, dtype=torch.long)
    reward_index = []
    for i, (s, r) in enumerate(zip(seqs, starts)):
        g, k = i % B, prefix[i % B]
        at = layout["suffix_at"][g][i // B] - k  # where the sequence's offset o >= k sits: at + o
        o = last_non_pad(s, pad_id)
        reward_index.append(layout["prefix_at"][g] + o if o < k else at + o)
        weight[at + r:at + len(s)] = 1.0
        pool_segment[at + k:at + len(s)] = i
    layout["reward_index"] = torch.tensor(reward_index, dtype=torch.long)
    layout["pool_weight"], layout["pool_segment"] = weight, pool_segment
    strength = torch.tensor([float("nan") if b["strength"] is None else b["strength"] for b in batch])
    return {"packed": layout, "response_start": torch.tensor(starts), "strength": strength}
