"""Padding-free packed batches: several sequences share one row, positions restart per sequence, and
attention never crosses a sequence boundary.

Layouts are built on the host from token lists (no device sync) and moved to the device whole. Three
attention paths, chosen from the model's `config._attn_implementation`:

- flash attention (`flash_attention_2`, `flash_attention_3`, kernels-hub variants): every sequence in ONE
  row, no padding at all, and transformers' varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`) tell the
  kernel where sequences start;
- `aplot_varlen_sdpa` (ours, registered with transformers by our model loaders when asked for by name,
  see `ensure_registered`; `train_rm --packing` with `sdpa` switches to it, see `use_varlen_sdpa`): the same
  one-row layout and kwargs, so embeddings, linear layers, norms and activations run on the real tokens
  only; only the attention op pads, per sequence, to the longest sequence of its length bucket
  ([n_b, heads, L_b, d], a key-padding mask for encoders, `is_causal` for decoders) and gathers its output
  back. Exact: the same sdpa kernel on the same tokens. Without varlen kwargs it is transformers' `sdpa`;
- `sdpa` / `eager` with a dense mask (eager, or code that asked for `sdpa` and did not switch): sequences
  are first-fit packed into rows of at most `capacity` tokens (dense attention costs rows x capacity^2,
  so one giant row would be slower than padding), and a 4D block-diagonal mask (causal too for decoders)
  is passed, which transformers uses as given for both decoders (create_causal_mask) and encoders
  (create_bidirectional_mask).

Host syncs: transformers (5.x) searches `position_ids` for sequence starts (`find_packed_sequence_indices`,
whose `.all()` waits for the device) on every decoder forward that has position ids but no attention
mask, cu_seq_lens or not. The varlen paths therefore pass a marked all-ones 2D mask (`packed_row_mask`),
which skips that search, and their mask functions return None for it (no mask, no `.all()`): a packed
decoder forward makes no host sync in mask creation.
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

DENSE_IMPLEMENTATIONS = ("sdpa", "eager")
VARLEN_SDPA = "aplot_varlen_sdpa"  # ours, namespaced; it contains "sdpa", so transformers checks sdpa support
SLOTS_KWARG = "aplot_attention_slots"  # the layout's length buckets, which transformers passes on to attention
PACKED_ROW_ATTR = "_aplot_packed_row"  # marks packed_row_mask's tensor: the varlen kwargs carry the real layout


def is_varlen(config) -> bool:
    """True when the model's attention takes one packed row and the varlen kwargs, without a mask: a
    flash-attention kernel, or varlen_sdpa."""
    impl = str(getattr(config, "_attn_implementation", "") or "")
    return "flash" in impl or impl == VARLEN_SDPA


def check_packing_support(config, requested: str = "") -> None:
    """ConfigError unless packed inputs are exact for this attention implementation; warns when a
    requested flash attention was replaced (flash_attn not installed) by the dense block mask."""
    impl = str(getattr(config, "_attn_implementation", "") or "")
    if not (is_varlen(config) or impl in DENSE_IMPLEMENTATIONS):
        raise ConfigError(f"--packing needs attn_implementation flash_attention_2, {VARLEN_SDPA}, sdpa or eager; the "
                          f"model runs {impl!r}")
    if "flash" in requested and "flash" not in impl:
        how = ("one row, attention padded per sequence" if impl == VARLEN_SDPA
               else "a dense block-diagonal mask")
        log.warning("--packing: %s was requested but the model runs %s (is flash_attn installed?); packed batches "
                    "use %s instead of the flash varlen kernel", requested, impl, how)


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
        out.update(attention_slots([start[i] for i in order], [lengths[i] for i in order]))
    return out


ATTENTION_BUCKETS = 4  # varlen_sdpa's attention calls per layer: 4 take ~71% of one call's work on hh-rlhf at 128


def length_buckets(lengths: list[int], groups: int = ATTENTION_BUCKETS) -> list[list[int]]:
    """Indices into `lengths` cut, longest first, into at most `groups` buckets that minimize the attention
    work sum(n_b * L_b^2) (n_b sequences padded to the bucket's longest, L_b); exact dynamic programme."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n, inf = len(order), float("inf")
    cost = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    cost[0][0] = 0
    for g in range(1, groups + 1):
        for j in range(1, n + 1):
            for i in range(j):  # bucket = order[i:j], padded to its first (longest) sequence
                c = cost[g - 1][i] + (j - i) * lengths[order[i]] ** 2
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    g = min(range(1, groups + 1), key=lambda k: (cost[k][n], k)) if n else 0
    buckets, j = [], n
    while g > 0 and j > 0:
        i = cut[g][j]
        buckets.append(order[i:j])
        j, g = i, g - 1
    return buckets[::-1]


def attention_slots(starts: list[int], lengths: list[int], groups: int = ATTENTION_BUCKETS) -> dict:
    """The padded per-bucket layout varlen_sdpa's attention uses, built on the host: attn_slot_token [N]
    (the token each slot reads; padded slots read their sequence's last token), attn_slot_valid [N],
    attn_token_slot [T] (each token's slot) and attn_buckets ((n_b, L_b), ...), N = sum(n_b * L_b)."""
    slot_token, valid, buckets = [], [], []
    token_slot = [0] * sum(lengths)
    for members in length_buckets(lengths, groups):
        width = lengths[members[0]]
        buckets.append((len(members), width))
        for i in members:
            a, n = starts[i], lengths[i]
            token_slot[a:a + n] = range(len(slot_token), len(slot_token) + n)
            slot_token += [a + min(j, n - 1) for j in range(width)]
            valid += [j < n for j in range(width)]
    return {"attn_slot_token": torch.tensor(slot_token, dtype=torch.long),
            "attn_slot_valid": torch.tensor(valid, dtype=torch.bool),
            "attn_token_slot": torch.tensor(token_slot, dtype=torch.long), "attn_buckets": tuple(buckets)}


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def to_device(layout: dict, device) -> dict:
    """Every tensor of `layout` (and of the dicts in it) on `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict)
            else v for k, v in layout.items()}


def packed_row_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """An all-True [1, T] mask on input_ids' device, marked (PACKED_ROW_ATTR) as standing for a varlen layout.

    Given instead of None, it stops transformers' create_causal_mask from searching position_ids for
    sequence starts (a host sync per forward); the varlen mask functions turn it into no mask at all."""
    mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    setattr(mask, PACKED_ROW_ATTR, True)
    return mask


def is_packed_row_mask(mask) -> bool:
    return bool(getattr(mask, PACKED_ROW_ATTR, False))


def _register_flash_packed_mask(impl: str) -> None:
    """Wrap transformers' mask function for a flash implementation (once): None for a `packed_row_mask`
    (its own `attention_mask.all()` would wait for the device), else the original's answer."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    original = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
    if original is None or getattr(original, PACKED_ROW_ATTR, False):
        return

    def flash_mask(*args, attention_mask=None, **kwargs):
        if is_packed_row_mask(attention_mask):
            return None
        return original(*args, attention_mask=attention_mask, **kwargs)
    setattr(flash_mask, PACKED_ROW_ATTR, True)
    ALL_MASK_ATTENTION_FUNCTIONS.register(impl, flash_mask)


def attention_kwargs(layout: dict, config, causal: bool, dtype: torch.dtype) -> dict:
    """The kwargs that make an HF model attend within sequences only: varlen kwargs for flash attention
    and varlen_sdpa (decoders: with a `packed_row_mask`, so transformers does not search the position ids
    for sequence starts), else a 4D mask [R, 1, L, L] built on the layout's device (bool for sdpa,
    additive for eager). A prompt-shared layout (pack_shared) gets shared_attention_kwargs."""
    if "branch" in layout:
        return shared_attention_kwargs(layout, config, dtype)
    if is_varlen(config):
        if layout["input_ids"].shape[0] != 1:
            raise ValueError(f"packing: the varlen path ({config._attn_implementation}) needs a one-row layout "
                             "(capacity None)")
        cu = layout["cu_seq_lens"]
        mask = None
        if causal:  # create_bidirectional_mask (encoders) never reads position_ids: nothing to skip there
            mask = packed_row_mask(layout["input_ids"])
            if config._attn_implementation != VARLEN_SDPA:
                _register_flash_packed_mask(config._attn_implementation)
        kwargs = {"attention_mask": mask, "position_ids": layout["position_ids"], "cu_seq_lens_q": cu,
                  "cu_seq_lens_k": cu, "max_length_q": layout["max_length"], "max_length_k": layout["max_length"]}
        if config._attn_implementation == VARLEN_SDPA and "attn_buckets" in layout:
            kwargs[SLOTS_KWARG] = tuple(layout[k] for k in ("attn_slot_token", "attn_slot_valid", "attn_token_slot",
                                                            "attn_buckets"))
        return kwargs
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
    """Row capacity: None (one row) for the varlen paths (flash attention, varlen_sdpa), else `max_tokens` per row."""
    return None if is_varlen(config) else max_tokens


# ------------------------------------------------------------------------------- varlen sdpa

class _GatherRows(torch.autograd.Function):
    """x[index] along dim 0, whose backward is a gather too: g[inverse], zeroed where `keep` is False.

    Exact when `index` reads every row of x once at the slots `inverse` names, and the other slots'
    gradients are zero (varlen_sdpa's padded slots: masked keys, dropped queries) or are dropped by
    `keep`. A gather instead of index_select's scatter-add backward: several times faster on CPU."""

    @staticmethod
    def forward(ctx, x, index, inverse, keep):
        ctx.save_for_backward(inverse, keep)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, keep = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        if keep is not None:
            g = g.masked_fill(~keep.view(-1, *([1] * (g.dim() - 1))), 0)
        return g, None, None, None


_LAST_SLOTS: list = []  # [cu_seq_lens, key, slots] of the last layout: every layer of a forward shares it


def _varlen_slots(cu_seq_lens: torch.Tensor, T: int, Lmax: int, device):
    """-> slot_token [S*Lmax] (the token each padded slot reads), valid [S, Lmax], token_slot [T]; built
    once per layout (kept while the same cu_seq_lens tensor comes back, unchanged, for the next layer)."""
    key = (cu_seq_lens._version, T, Lmax, str(device))
    if _LAST_SLOTS and _LAST_SLOTS[0] is cu_seq_lens and _LAST_SLOTS[1] == key:
        return _LAST_SLOTS[2]
    cu = cu_seq_lens.to(device, torch.long)
    S = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    offset = torch.arange(Lmax, device=device)
    valid = offset < lengths[:, None]
    slot_token = (cu[:-1, None] + offset).clamp_max(T - 1).reshape(-1)  # padded slots read some real token
    seq = torch.repeat_interleave(torch.arange(S, device=device), lengths, output_size=T)  # no sync
    token_slot = seq * Lmax + torch.arange(T, device=device) - cu[:-1][seq]
    _LAST_SLOTS[:] = [cu_seq_lens, key, (slot_token, valid, token_slot)]
    return _LAST_SLOTS[2]


def varlen_sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: with `cu_seq_lens_q` and `max_length_q` (one packed row, as for
    flash attention's varlen path) attention runs per sequence; otherwise transformers' `sdpa`.

    query/key/value [1, heads, T, d] (T real tokens, sequences back to back) are gathered into length
    buckets [n_b, heads, L_b, d] (the layout's `aplot_attention_slots`, built on the host by pack(): at
    most ATTENTION_BUCKETS sdpa calls, each bucket padded to its longest sequence; without them one bucket
    padded to max_length_q, indexed on the device from cu_seq_lens, no host sync either way). torch's sdpa
    runs on each with a key-padding mask (encoders) or `is_causal` (decoders: a real query at offset i sees
    keys 0..i, all real, so right padding needs no mask), and the real rows are gathered back ->
    [1, T, heads, d]. Padded slots read some real token: their keys are masked, their queries' outputs
    dropped, so their gradients are exactly zero."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("cu_seq_lens_k") is not None and kwargs["cu_seq_lens_k"] is not cu:
        raise NotImplementedError(f"{VARLEN_SDPA}: self-attention only (cu_seq_lens_k must be cu_seq_lens_q)")
    if (kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or kwargs.get("softcap")
            or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None):
        raise NotImplementedError(f"{VARLEN_SDPA}: sliding windows, soft-capping, position biases and attention "
                                  f"sinks are not supported ({type(module).__name__}); use flash_attention_2 or eager")
    B, H, T, D = query.shape
    if B != 1 or key.shape[2] != T:
        raise ValueError(f"{VARLEN_SDPA}: a packed batch is one row of self-attention, got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    slots = kwargs.get(SLOTS_KWARG)
    if slots is None:  # only the varlen kwargs: one bucket, every sequence padded to the longest
        Lmax = int(kwargs["max_length_q"])  # a Python int in the layout: no sync
        slot_token, valid, token_slot = _varlen_slots(cu, T, Lmax, query.device)
        slots = (slot_token, valid.reshape(-1), token_slot, ((cu.shape[0] - 1, Lmax),))
    slot_token, valid, token_slot, buckets = slots
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

    def to_slots(x):  # [1, h, T, d] -> [N, h, d], in the [n, L, h, d] memory layout transformers uses
        return _GatherRows.apply(x[0].transpose(0, 1), slot_token, token_slot, None)
    q, k, v = to_slots(query), to_slots(key), to_slots(value)
    groups = H // key.shape[1]
    outs, at = [], 0
    for n, L in buckets:  # per bucket: [n, h, L, d], a key-padding mask (encoders) or is_causal (decoders)
        qb, kb, vb = (t[at:at + n * L].view(n, L, t.shape[1], D).transpose(1, 2) for t in (q, k, v))
        mask = None if causal else valid[at:at + n * L].view(n, 1, 1, L)
        gqa = {}
        if groups > 1:
            if mask is None:  # torch's kernels take grouped heads without a mask
                gqa["enable_gqa"] = True
            else:
                kb, vb = repeat_kv(kb, groups), repeat_kv(vb, groups)
        ob = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout,
                                                              is_causal=bool(causal), scale=scaling, **gqa)
        outs.append(ob.transpose(1, 2).reshape(n * L, H, D))
        at += n * L
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = _GatherRows.apply(out, token_slot, slot_token, valid)
    return out[None], None


def bert_last_layer_at(layer, hidden: torch.Tensor, read: torch.Tensor, cu: torch.Tensor, max_length: int):
    """A BERT encoder layer's output at ONE token per sequence (the token the head reads), from its input
    `hidden` [1, T, d] in the varlen layout -> [S, d]. Keys and values come from every token of the
    sequence; the query, attention output, residual, LayerNorms and feed-forward only from the read token.
    Exact: each of those is row-wise, so the other rows the full layer computes are never read."""
    sa = layer.attention.self
    H, hd = sa.num_attention_heads, sa.attention_head_size
    x = hidden[0]
    T, S = x.shape[0], cu.shape[0] - 1
    at = x.index_select(0, read)  # [S, d]
    q = sa.query(at).view(S, 1, H, hd).transpose(1, 2)  # [S, H, 1, hd]
    slot_token, valid, token_slot = _varlen_slots(cu, T, max_length, x.device)

    def to_padded(t):  # [T, H*hd] -> [S, H, Lmax, hd]
        rows = _GatherRows.apply(t.view(T, H, hd), slot_token, token_slot, None)
        return rows.view(S, max_length, H, hd).transpose(1, 2)
    k, v = to_padded(sa.key(x)), to_padded(sa.value(x))
    dropout = sa.dropout.p if sa.training else 0.0
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], dropout_p=dropout,
                                                         scale=sa.scaling)  # padded keys masked: zero gradient
    a = layer.attention.output(a.reshape(S, H * hd), at)
    return layer.feed_forward_chunk(a)


def trims_bert_last_layer(base) -> bool:
    """True when bert_last_layer_at reproduces `base`'s last layer: a BERT encoder (self-attention only,
    no feed-forward chunking) whose attention runs one packed row (varlen)."""
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not layers or not is_varlen(base.config) or base.config.model_type != "bert":
        return False
    last = layers[-1]
    sa = getattr(getattr(last, "attention", None), "self", None)
    return (sa is not None and all(hasattr(sa, n) for n in ("query", "key", "value", "scaling"))
            and not getattr(sa, "is_causal", False) and not getattr(last, "is_decoder", False)
            and not getattr(last, "add_cross_attention", False) and not last.chunk_size_feed_forward
            and hasattr(last, "feed_forward_chunk"))


def varlen_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """Mask creation for varlen_sdpa: None when there is nothing to mask (no 2D mask, or a `packed_row_mask`;
    no cache offset), as for flash attention, so a packed row never materializes a [T, T] mask; else
    transformers' sdpa_mask."""
    from transformers.masking_utils import sdpa_mask
    if is_packed_row_mask(attention_mask):
        return None
    if (attention_mask is None and isinstance(q_offset, int) and isinstance(kv_offset, int)
            and q_offset == 0 and kv_offset == 0 and q_length == kv_length):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def register_varlen_sdpa() -> str:
    """Register varlen_sdpa with transformers (idempotent); returns its name for attn_implementation=."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, varlen_sdpa_mask)
    return VARLEN_SDPA


def use_varlen_sdpa(model) -> bool:
    """A transformers model running `sdpa` switches to varlen_sdpa (True); any other implementation is
    left as it is (False). Padded forwards are unchanged by the switch: varlen_sdpa is sdpa without
    varlen kwargs."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register_varlen_sdpa())
    return True


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
    for b, (p, r) in enumerate(zip(prompts, responses)):
        for t in range(len(r)):
            pos[b][t] = starts[b] + len(p) - 1 + t
    keep, resp_keep = keep_columns(pos, [len(r) for r in responses], L)
    layout.update(resp_pos=torch.tensor(pos, dtype=torch.long), keep_cols=torch.tensor(keep, dtype=torch.long),
                  resp_keep=torch.tensor(resp_keep, dtype=torch.long))
    return layout


def ensure_registered(attn_implementation: str) -> str:
    """`attn_implementation`, after registering ours with transformers if it names it: the model loaders
    (models.loader.load_model, for every role) calls this, so --attn_implementation aplot_varlen_sdpa works."""
    if attn_implementation == VARLEN_SDPA:
        register_varlen_sdpa()
    return attn_implementation


# ------------------------------------------------------------------------------ prompt-shared layout
# A causal model's hidden states at a prompt do not depend on the tokens after it, so a prompt followed by
# several responses can be run once: each response attends to the prompt and to itself (causally), never to a
# sibling, and its positions continue from the prompt's length. Exact, not an approximation.

FLEX = "flex_attention"
SHARED_DENSE = ("sdpa", "eager", VARLEN_SDPA)  # a 4D mask used as given (varlen_sdpa without varlen kwargs is sdpa)


def shared_attention_support(config) -> str | None:
    """None when prompt-shared rows are exact for this model's attention, else why not (one line). For causal
    decoders only (the caller knows which it has: an encoder's prompt states depend on its response): dense
    4D masks for sdpa / eager / varlen_sdpa, a FlexAttention block mask for flex_attention; flash attention's
    varlen kernel cannot express "the prompt, then myself only"."""
    impl = str(getattr(config, "_attn_implementation", "") or "")
    if impl in SHARED_DENSE or impl == FLEX:
        return None
    return f"attention {impl!r} takes no per-token mask (use sdpa, eager, {VARLEN_SDPA} or {FLEX})"


def split_wide_groups(members: list[list[int]], prefix: list[int], suffix_len: list[list[int]],
                      capacity: int | None) -> list[list[int]]:
    """Groups of a prompt-shared batch of pairs (members[g]: the sequences sharing prefix[g] tokens, suffix_len[g]:
    each one's tokens after it) -> runs, each laid out as a group of its own (its prefix once, then its members).

    pack_shared pads every row to the widest, and a dense mask costs rows x width^2, so one prompt with many
    pairs in a batch (OASST-style data, several ranked answers per prompt: one evaluation batch of 32 pairs became
    31 rows of 4,352 tokens, 10x its real tokens) would widen the whole batch. Every group is cut, in order,
    into runs of at most max(capacity, each group's prefix plus its two longest suffixes) tokens: any two of a
    group's sequences fit one run (only a group's last run may hold one), so a batch of one pair per prompt
    keeps exactly its layout, and the pairs of a crowded prompt share it run by run. capacity None (one row, a
    block mask) splits nothing."""
    if capacity is None or not members:
        return members
    limit = max(capacity, *(k + sum(sorted(n)[-2:]) for k, n in zip(prefix, suffix_len)))
    runs = []
    for m, k, n in zip(members, prefix, suffix_len):
        run, used = [], k
        for i, ni in zip(m, n):
            if run and used + ni > limit:
                runs.append(run)
                run, used = [], k
            run.append(i)
            used += ni
        runs.append(run)
    return runs


def pack_shared(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, capacity: int | None) -> dict:
    """Groups (prefix, [suffix, ...]) laid out as prefix, suffix 1, suffix 2, ... and first-fit packed into rows
    of at most `capacity` tokens (None: one row); an empty prefix leaves its suffixes plainly packed.
    -> input_ids, position_ids (each suffix continues from the prefix's length), segment (the group's index,
    -1 on padding), branch (0 on a prefix, j+1 on suffix j, -1 on padding) [R, L]; prefix_at [G] (flat index
    of each prefix's first token), suffix_at (per group, the flat index of each suffix's first token),
    n_tokens, n_slots. All CPU tensors, built on the host."""
    sizes = [len(p) + sum(len(s) for s in sufs) for p, sufs in groups]
    rows = first_fit_rows(sizes, capacity)
    L = max(sum(sizes[g] for g in r) for r in rows)
    R = len(rows)
    flat_ids, flat_pos = [pad_id] * (R * L), [0] * (R * L)
    flat_seg, flat_branch = [-1] * (R * L), [-1] * (R * L)
    prefix_at, suffix_at = [0] * len(groups), [[] for _ in groups]
    for r, members in enumerate(rows):
        at = r * L
        for g in members:
            prefix, suffixes = groups[g]
            P = len(prefix)
            prefix_at[g] = at
            flat_ids[at:at + P], flat_pos[at:at + P] = prefix, range(P)
            flat_seg[at:at + P], flat_branch[at:at + P] = [g] * P, [0] * P
            at += P
            for j, s in enumerate(suffixes):
                n = len(s)
                suffix_at[g].append(at)
                flat_ids[at:at + n], flat_pos[at:at + n] = s, range(P, P + n)
                flat_seg[at:at + n], flat_branch[at:at + n] = [g] * n, [j + 1] * n
                at += n
    shape = (R, L)
    return {"input_ids": torch.tensor(flat_ids, dtype=torch.long).view(shape),
            "position_ids": torch.tensor(flat_pos, dtype=torch.long).view(shape),
            "segment": torch.tensor(flat_seg, dtype=torch.long).view(shape),
            "branch": torch.tensor(flat_branch, dtype=torch.long).view(shape),
            "prefix_at": prefix_at, "suffix_at": suffix_at, "n_tokens": sum(sizes), "n_slots": R * L}


def shared_allowed(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L] bool: query q sees key k iff both are in one group, k <= q, and k is on the prefix or on
    q's own suffix (padding sees earlier padding: no query row is empty)."""
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()
    own = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return ((segment[:, :, None] == segment[:, None, :]) & own & causal)[:, None]


def shared_attention_kwargs(layout: dict, config, dtype: torch.dtype) -> dict:
    """attention_kwargs for a pack_shared layout: a FlexAttention BlockMask (flex_attention; torch runs its
    backward on GPUs only), else a dense 4D mask (bool for sdpa / varlen_sdpa, additive for eager)."""
    why = shared_attention_support(config)
    if why is not None:
        raise ValueError(f"prompt sharing: {why}")
    seg, branch = layout["segment"], layout["branch"]
    if config._attn_implementation == FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        def shared_mask(b, h, q, k):
            return ((seg[b, q] == seg[b, k]) & (k <= q)
                    & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q])))
        R, L = seg.shape
        mask = create_block_mask(shared_mask, B=R, H=None, Q_LEN=L, KV_LEN=L, device=seg.device)
        return {"attention_mask": mask, "position_ids": layout["position_ids"]}
    allowed = shared_allowed(seg, branch)
    if config._attn_implementation == "eager":
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed,
                                                                                            torch.finfo(dtype).min)
    return {"attention_mask": allowed, "position_ids": layout["position_ids"]}


def keep_columns(pos: list[list[int]], lengths: list[int], L: int) -> tuple[list[int], list[list[int]]]:
    """The row columns any sequence reads logits at (`logits_to_keep`) and, per row of `pos` (flat indices into
    the R*L tokens; entries past lengths[b] are unused), the flat index into the R*len(keep) kept logits."""
    cols = sorted({f % L for row, n in zip(pos, lengths) for f in row[:n]}) or [0]
    rank = {c: k for k, c in enumerate(cols)}
    K = len(cols)
    return cols, [[(f // L) * K + rank[f % L] if t < n else 0 for t, f in enumerate(row)]
                  for row, n in zip(pos, lengths)]


def pack_prompt_shared(prompts: list[list[int]], responses: list[list[int]], pad_id: int, capacity: int | None,
                       width: int | None = None) -> dict:
    """pack_prompt_response with each distinct prompt laid out once and its responses after it (pack_shared):
    the same resp_pos [B, T], keep_cols, resp_keep [B, T]. A response's first token is predicted by its
    prompt's last token (shared by the group), token t > 0 by its own token t-1."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt sharing: an empty prompt leaves no position to predict the first response token")
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(b)
    members = list(groups.values())
    layout = pack_shared([(prompts[m[0]], [responses[b] for b in m]) for m in members], pad_id, capacity)
    L = layout["input_ids"].shape[1]
    B, T = len(prompts), width or max(1, max(len(r) for r in responses))
    pos = [[0] * T for _ in range(B)]
    for g, m in enumerate(members):
        last = layout["prefix_at"][g] + len(prompts[m[0]]) - 1
        for b, at in zip(m, layout["suffix_at"][g]):
            for t in range(len(responses[b])):
                pos[b][t] = last if t == 0 else at + t - 1
    keep, resp_keep = keep_columns(pos, [len(r) for r in responses], L)
    layout.update(resp_pos=torch.tensor(pos, dtype=torch.long), keep_cols=torch.tensor(keep, dtype=torch.long),
                  resp_keep=torch.tensor(resp_keep, dtype=torch.long))
    return layout
