"""Padding-free packed batches: several sequences share one row, positions restart per sequence, and
attention never crosses a sequence boundary.

Layouts are built on the host from token lists (no device sync) and moved to the device whole. Two
attention paths, chosen from the model's `config._attn_implementation`:

- flash attention (`flash_attention_2`, `flash_attention_3`, kernels-hub variants): every sequence in ONE
  row, no padding at all, and transformers' varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`) tell the
  kernel where sequences start;
- `sdpa` / `eager` (CPU, or GPUs without flash-attn): sequences are first-fit packed into rows of at most
  `capacity` tokens (dense attention costs rows x capacity^2, so one giant row would be slower than
  padding), and a 4D block-diagonal mask (causal too for decoders) is passed, which transformers uses
  as given for both decoders (create_causal_mask) and encoders (create_bidirectional_mask).
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

DENSE_IMPLEMENTATIONS = ("sdpa", "eager")


def is_varlen(config) -> bool:
    """True when the model runs a flash-attention kernel, whose varlen entry point packs without a mask."""
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def check_packing_support(config, requested: str = "") -> None:
    """ConfigError unless packed inputs are exact for this attention implementation; warns when a
    requested flash attention was replaced (flash_attn not installed) by the dense block mask."""
    impl = str(getattr(config, "_attn_implementation", "") or "")
    if not (is_varlen(config) or impl in DENSE_IMPLEMENTATIONS):
        raise ConfigError(f"--packing needs attn_implementation flash_attention_2, sdpa or eager; the model runs "
                          f"{impl!r}")
    if "flash" in requested and not is_varlen(config):
        log.warning("--packing: %s was requested but the model runs %s (is flash_attn installed?); packed rows use "
                    "a dense block-diagonal mask instead of the varlen kernel", requested, impl)


def first_fit_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Sequence indices grouped into rows of at most `capacity` tokens (first fit, longest first);
    capacity None: one row holding everything. Inside a row, sequences keep their batch order."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max(capacity, lengths[i]) - lengths[i])  # a sequence longer than capacity gets its own row
    return [sorted(r) for r in rows]


def pack(seqs: list[list[int]], pad_id: int, capacity: int | None) -> dict:
    """-> input_ids, position_ids, segment [R, L] (segment: the sequence's index, -1 on padding),
    start [S] (flat index of each sequence's first token in the R*L tokens), length [S], and for the
    varlen path (one row) cu_seq_lens [S+1] int32 and max_length. All CPU tensors."""
    lengths = [len(s) for s in seqs]
    if min(lengths, default=0) == 0:
        raise ValueError("packing: an empty sequence cannot be packed (it has no token to read)")
    rows = first_fit_rows(lengths, capacity)
    L = max(sum(lengths[i] for i in r) for r in rows)
    R = len(rows)
    flat_ids = [pad_id] * (R * L)
    flat_pos = [0] * (R * L)
    flat_seg = [-1] * (R * L)
    start = [0] * len(seqs)
    for r, members in enumerate(rows):
        at = r * L
        for i in members:
            n = lengths[i]
            flat_ids[at:at + n] = seqs[i]
            flat_pos[at:at + n] = range(n)
            flat_seg[at:at + n] = [i] * n
            start[i] = at
            at += n
    out = {"input_ids": torch.tensor(flat_ids, dtype=torch.long).view(R, L),
           "position_ids": torch.tensor(flat_pos, dtype=torch.long).view(R, L),
           "segment": torch.tensor(flat_seg, dtype=torch.long).view(R, L),
           "start": torch.tensor(start, dtype=torch.long), "length": torch.tensor(lengths, dtype=torch.long),
           "n_tokens": sum(lengths), "n_slots": R * L}
    if capacity is None:  # one row, no padding: the varlen kernel's sequence boundaries, in row order
        order = rows[0]
        out["cu_seq_lens"] = torch.tensor([0] + list(_cumsum(lengths[i] for i in order)), dtype=torch.int32)
        out["max_length"] = max(lengths)
    return out


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def to_device(layout: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in layout.items()}


def attention_kwargs(layout: dict, config, causal: bool, dtype: torch.dtype) -> dict:
    """The kwargs that make an HF model attend within sequences only: varlen kwargs for flash attention,
    else a 4D mask [R, 1, L, L] built on the layout's device (bool for sdpa, additive for eager)."""
    if is_varlen(config):
        if layout["input_ids"].shape[0] != 1:
            raise ValueError("packing: flash attention's varlen path needs a one-row layout (capacity None)")
        cu = layout["cu_seq_lens"]
        return {"attention_mask": None, "position_ids": layout["position_ids"], "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu, "max_length_q": layout["max_length"], "max_length_k": layout["max_length"]}
    seg = layout["segment"]
    allowed = seg[:, :, None] == seg[:, None, :]
    if causal:
        L = seg.shape[1]
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    allowed = allowed[:, None]
    if getattr(config, "_attn_implementation", "") == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        allowed = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": allowed, "position_ids": layout["position_ids"]}


def capacity_for(config, max_tokens: int) -> int | None:
    """Row capacity: None (one row) for flash attention's varlen path, else `max_tokens` per row."""
    return None if is_varlen(config) else max_tokens


# ------------------------------------------------------------------------------------ PPO layout

def pack_prompt_response(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                         capacity: int | None, width: int | None = None) -> dict:
    """prompt+response sequences packed, plus where the logits that predict each response token sit:
    resp_pos [B, T] (flat index into the R*L tokens; 0 where t >= len(response), masked later),
    T = `width` (the rollout's response width, so a micro-batch of short responses lines up with the
    rollout's [B, T] tensors) or this batch's longest response,
    keep_cols (the columns any row needs logits at: `logits_to_keep`) and resp_keep [B, T] (flat
    index into the R*len(keep_cols) kept logits)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("packing: an empty prompt leaves no position to predict the first response token")
    layout = pack([p + r for p, r in zip(prompts, responses)], pad_id, capacity)
    L = layout["input_ids"].shape[1]
    B, T = len(prompts), width or max(1, max(len(r) for r in responses))
    starts = layout["start"].tolist()  # a CPU tensor built above: no device sync
    pos = [[0] * T for _ in range(B)]
    cols = set()
    for b, (p, r) in enumerate(zip(prompts, responses)):
        for t in range(len(r)):
            flat = starts[b] + len(p) - 1 + t
            pos[b][t] = flat
            cols.add(flat % L)
    keep = sorted(cols) or [0]
    rank = {c: k for k, c in enumerate(keep)}
    K = len(keep)
    resp_keep = [[(f // L) * K + rank[f % L] if t < len(r) else 0 for t, f in enumerate(row)]
                 for row, r in zip(pos, responses)]
    layout.update(resp_pos=torch.tensor(pos, dtype=torch.long), keep_cols=torch.tensor(keep, dtype=torch.long),
                  resp_keep=torch.tensor(resp_keep, dtype=torch.long))
    return layout
