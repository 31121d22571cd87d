"""Micro-batches of tokenized pairs: padded (2B rows, chosen then rejected), packed (sequences share rows) or
prompt-shared (each pair's prompt once, its two responses after it).

Every layout's batch carries `inputs` (RewardModel.forward's keyword arguments) and `n_tokens` (the tokens
its forward runs, counted on the host), so the trainer's forward is one call whatever the layout."""
from __future__ import annotations

import torch


def collate_pairs(batch: list[dict], pad_id: int) -> dict:
    """Pairs -> one padded batch of 2B sequences: rows [0, B) chosen, rows [B, 2B) rejected.

    Returns input_ids, attention_mask [2B, L] (L = longest in the batch), response_start [2B],
    strength [B] (NaN where absent), inputs, n_tokens.
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
            "strength": strength, "n_tokens": sum(len(s) for s in seqs),
            "inputs": {"input_ids": input_ids, "attention_mask": attention_mask, "response_start": response_start}}


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
    ([CLS]) for encoders; pool_weight [R*L], 1 on response tokens), response_start [2B], strength [B],
    inputs, n_tokens."""
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
    return {"packed": layout, "response_start": torch.tensor(starts), "strength": strength,
            "inputs": {"packed": layout}, "n_tokens": layout["n_tokens"]}


def collate_shared(seqs: list[list[int]], starts: list[int], pad_id: int, capacity: int | None,
                   split_wide: bool = False) -> dict:
    """Sequences (prompt + response, the response from starts[i]) -> one prompt-shared layout for a decoder
    reward model: the sequences whose prompt tokens are identical form a group, laid out as the prompt once,
    then each member's rest, each attending to the prompt and to itself (models.packing.pack_shared). The
    shared prefix stops short of every member's end, so each keeps a token of its own to be read at.

    Returns pack_shared's layout plus reward_index [S] (the flat index of each sequence's rightmost non-pad
    token, in the prefix or its own part), pool_weight [R*L] (1 on response tokens) and pool_segment [R*L]
    (the sequence each response token belongs to): what RewardModel.forward_packed reads, in `seqs`' order.
    split_wide: a batch of pairs, whose groups are cut into runs that fit a row (models.packing.
    split_wide_groups); groups of samples (a prompt's PPO responses, scored together) are kept whole."""
    from ..models.packing import pack_shared, split_wide_groups
    groups: dict[tuple, list[int]] = {}
    for i, (s, r) in enumerate(zip(seqs, starts)):
        groups.setdefault(tuple(s[:r]), []).append(i)

    def shared_prefix(m):  # stops short of every member's end
        return min(starts[m[0]], *(len(seqs[i]) - 1 for i in m))
    members = list(groups.values())
    prefix = [shared_prefix(m) for m in members]
    if split_wide:  # a run's own prefix is at least its group's: its width is at most what the split assumed
        members = split_wide_groups(members, prefix, [[len(seqs[i]) - k for i in m]
                                                      for m, k in zip(members, prefix)], capacity)
        prefix = [shared_prefix(m) for m in members]
    layout = pack_shared([(seqs[m[0]][:k], [seqs[i][k:] for i in m]) for m, k in zip(members, prefix)], pad_id,
                         capacity)
    weight = torch.zeros(layout["n_slots"])
    pool_segment = torch.full((layout["n_slots"],), -1, dtype=torch.long)
    reward_index = [0] * len(seqs)
    for g, (m, k) in enumerate(zip(members, prefix)):
        for i, suffix_at in zip(m, layout["suffix_at"][g]):
            s, at = seqs[i], suffix_at - k  # offset o >= k of sequence i sits at flat index at + o
            o = last_non_pad(s, pad_id)
            reward_index[i] = layout["prefix_at"][g] + o if o < k else at + o
            weight[at + starts[i]:at + len(s)] = 1.0  # starts[i] >= k: responses are never in the prefix
            pool_segment[at + k:at + len(s)] = i
    layout["reward_index"] = torch.tensor(reward_index, dtype=torch.long)
    layout["pool_weight"], layout["pool_segment"] = weight, pool_segment
    return layout


def collate_pairs_shared(batch: list[dict], pad_id: int, capacity: int | None) -> dict:
    """Pairs -> one prompt-shared batch of the same 2B sequences as collate_pairs (decoders only): a pair whose
    chosen and rejected carry the same prompt tokens is its prompt once, then chosen, then rejected
    (collate_shared; a prompt cut from the left differently for the two sides shares nothing).

    Returns packed (collate_shared's layout), response_start [2B], strength [B], inputs, n_tokens (the 2B
    sequences' tokens, as the other layouts count them, so tokens_per_s compares across layouts; the tokens
    the forward runs, each prompt once, are packed["n_tokens"])."""
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    starts = [b["chosen_start"] for b in batch] + [b["rejected_start"] for b in batch]
    layout = collate_shared(seqs, starts, pad_id, capacity, split_wide=True)
    strength = torch.tensor([float("nan") if b["strength"] is None else b["strength"] for b in batch])
    return {"packed": layout, "response_start": torch.tensor(starts), "strength": strength,
            "inputs": {"packed": layout}, "n_tokens": sum(len(s) for s in seqs)}
