"""How PPO lays a rollout out for its forwards, and reads response log-probs and values back.

A rollout is prompt token lists and response token lists. `Layout.build` turns a micro-batch of them into
one `Layout`, built once and read by every forward of that micro-batch (actor, reference, critic, in
experience and training) and by the readers (`logprobs_on`, `values_on`), whatever its kind:

- "padded": prompts left-padded, responses right-padded (`pad_prompt_response`), every response at the
  same columns;
- "packed" (--packing): sequences back to back, attention within each (`models.packing.pack_prompt_response`);
- "shared" (--share_prompt): each distinct prompt once, its responses after it, each attending to the prompt
  and to itself only (`models.packing.pack_prompt_shared`): a group's prompt is computed once.

A layout says where the logits predicting response token t of row b sit (`resp_pos`: a flat index into the
model's [R*L] outputs; `resp_keep`: into the `keep` columns projected onto the vocabulary), so the readers
have no branch on the kind.
"""
from __future__ import annotations

import inspect

import torch

from ..models.lora import is_lora
from ..models.packing import attention_kwargs, pack_prompt_response, pack_prompt_shared, to_device
from .ppo_math import entropy_from_logits, logprobs_of, tempered


def pad_prompt_response(prompts: list[list[int]], responses: list[list[int]], pad_id: int, width: int | None = None):
    """One batch of prompt+response rows, prompts left-padded and responses right-padded.

    Every response starts at the same column P (the longest prompt), so the logits predicting
    response token t sit at column P-1+t in every row and the model only needs the last T+1 columns
    of logits (`logits_to_keep`): the vocabulary projection skips the prompts. Position ids count
    from 0 at each row's first real token, as in generation.
    width: T, the response columns (default: the longest response, at least 1).
    -> input_ids, attention_mask, position_ids [B, P+T], response tokens [B, T], response mask [B, T].
    """
    B, T = len(prompts), width or max(1, max(len(r) for r in responses))
    P = max(len(p) for p in prompts)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P + len(r)] = torch.tensor(p + r)
        attn[i, P - len(p):P + len(r)] = 1
        if r:
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1.0
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    return ids, attn, position_ids, tokens, mask


def trim_left_padding(ids, attn, position_ids, first: int | None = None):
    """Drop the leading columns that are padding in every row of this (micro-)batch.

    first: that column, when the caller knows it from the host-side prompt lengths (`first_column`):
    reading it from `attn` waits for the device."""
    if first is None:
        first = int(attn.any(0).nonzero()[0]) if attn.any() else 0
    return ids[:, first:], attn[:, first:], position_ids[:, first:]


def first_column(prompts: list[list[int]], rows, width: int) -> int:
    """First non-padding column of `rows` of a `pad_prompt_response` batch whose prompts are left-padded to
    `width` (the rollout's longest prompt), from the token lists alone."""
    return width - max(len(prompts[r]) for r in rows)


def _accepts_logits_to_keep(model) -> bool:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    module = module.get_base_model() if is_lora(module) else module  # peft forwards the keyword
    flag = getattr(module, "_aplot_logits_to_keep", None)
    if flag is None:
        flag = "logits_to_keep" in inspect.signature(module.forward).parameters
        module._aplot_logits_to_keep = flag
    return flag


def real_vocabulary(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """The logit columns of the tokenizer's tokens: an embedding padded beyond the tokenizer (to a multiple
    of 64 or 128) has rows no text maps to, and they must not take probability mass from real tokens."""
    return logits if vocab_size is None or logits.shape[-1] <= vocab_size else logits[..., :vocab_size]



LAYOUTS = ("padded", "packed", "shared")


class Layout:
    """One micro-batch of prompt+response rows as every model reads it.

    inputs(model): the forward's keyword arguments (input_ids, attention_mask, position_ids, and for packed
    layouts the attention kwargs of the model's attention implementation, built once per implementation);
    keep: `logits_to_keep` (an int for padded rows, the kept columns for packed ones); resp_keep / resp_pos
    [B, T]: flat indices of the outputs predicting each response token among the kept logits / among all
    [R*L] positions (entries past a response's end point anywhere: the response mask drops them)."""

    def __init__(self, kind: str, batch: dict, keep, resp_keep: torch.Tensor, resp_pos: torch.Tensor):
        self.kind, self.batch, self.keep, self.resp_keep, self.resp_pos = kind, batch, keep, resp_keep, resp_pos
        self._attention: dict = {}

    @classmethod
    def build(cls, kind: str, prompts: list[list[int]], responses: list[list[int]], pad_id: int, width: int,
              device, capacity: int | None = None) -> "Layout":
        """The layout of one micro-batch from its host-side token lists (no device sync), moved to `device`
        whole. width: the rollout's response columns T; capacity: tokens per packed row (None: one row)."""
        if kind == "padded":
            ids, attn, posids, _, _ = pad_prompt_response(prompts, responses, pad_id, width)
            return cls.from_padded(*(x.to(device, non_blocking=True) for x in (ids, attn, posids)), width)
        if kind not in LAYOUTS:
            raise ValueError(f"unknown layout {kind!r} (one of {', '.join(LAYOUTS)})")
        build = pack_prompt_response if kind == "packed" else pack_prompt_shared
        return cls.of_packed(to_device(build(prompts, responses, pad_id, capacity, width), device))

    @classmethod
    def of_packed(cls, batch: dict) -> "Layout":
        """A packed or prompt-shared layout from its models.packing dict (pack_prompt_response, pack_prompt_shared)."""
        return cls("shared" if "branch" in batch else "packed", batch, batch["keep_cols"], batch["resp_keep"],
                   batch["resp_pos"])

    @classmethod
    def from_padded(cls, ids, attn, position_ids, T: int) -> "Layout":
        """A padded layout from tensors (a `pad_prompt_response` batch, its all-padding columns trimmed or not)."""
        B, L = ids.shape
        t = torch.arange(T, device=ids.device)
        rows = torch.arange(B, device=ids.device)[:, None]
        return cls("padded", {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids}, T + 1,
                   rows * (T + 1) + t, rows * L + (L - T - 1) + t)

    def inputs(self, model) -> dict:
        """The forward's keyword arguments for `model` (an HF model, a Critic, or a DeepSpeed engine of one)."""
        if self.kind == "padded":
            return dict(self.batch)
        module = getattr(model, "module", model)
        config = module.backbone.config if hasattr(module, "backbone") else module.config
        dtype = next(module.parameters()).dtype
        key = (str(getattr(config, "_attn_implementation", "")), dtype)
        if key not in self._attention:  # actor, reference and critic share one mask
            self._attention[key] = attention_kwargs(self.batch, config, causal=True, dtype=dtype)
        return {"input_ids": self.batch["input_ids"], **self._attention[key]}


def logprobs_on(model, layout: Layout, tokens, with_entropy: bool = False, temperature: float = 1.0,
                vocab_size: int | None = None):
    """Log-probs [B, T] (and entropies) of the response tokens under the policy that sampled them: logits
    divided by the sampling temperature, over the first `vocab_size` columns (the tokenizer's length; None =
    every column). Models that take `logits_to_keep` project only the layout's kept positions onto the
    vocabulary."""
    if _accepts_logits_to_keep(model):
        logits = model(use_cache=False, logits_to_keep=layout.keep, **layout.inputs(model)).logits
        index = layout.resp_keep
    else:
        logits, index = model(use_cache=False, **layout.inputs(model)).logits, layout.resp_pos
    logits = tempered(real_vocabulary(logits.reshape(-1, logits.shape[-1])[index], vocab_size), temperature)
    lp = logprobs_of(logits, tokens)
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


def values_on(critic, layout: Layout):
    """Critic values [B, T] at the positions that predict each response token."""
    return critic(**layout.inputs(critic)).reshape(-1)[layout.resp_pos]


# the readers on tensors, for callers holding a padded batch (trimmed or not) or a packed layout dict
def response_logprobs(model, ids, attn, position_ids, tokens, **kwargs):
    """logprobs_on a `pad_prompt_response` batch: responses in its last T columns."""
    return logprobs_on(model, Layout.from_padded(ids, attn, position_ids, tokens.shape[1]), tokens, **kwargs)


def response_values(critic, ids, attn, position_ids, T: int):
    """values_on a `pad_prompt_response` batch."""
    return values_on(critic, Layout.from_padded(ids, attn, position_ids, T))


def packed_response_logprobs(model, layout: dict, tokens, **kwargs):
    """logprobs_on a `models.packing.pack_prompt_response` (or pack_prompt_shared) layout dict."""
    return logprobs_on(model, Layout.of_packed(layout), tokens, **kwargs)


def packed_response_values(critic, layout: dict):
    """values_on a `models.packing.pack_prompt_response` (or pack_prompt_shared) layout dict."""
    return values_on(critic, Layout.of_packed(layout))
