"""How PPO lays a rollout out for its forwards, and reads response log-probs and values back.

A rollout is prompt token lists (each rank's, left-padded) and response token lists. `pad_prompt_response`
builds the padded batch every experience and training forward reads (`trim_left_padding` cuts a
micro-batch's all-padding columns, `first_column` finds them from the host-side lists); the `packed_*`
readers do the same on `models.packing.pack_prompt_response` layouts (`--packing`).
"""
from __future__ import annotations

import inspect

import torch

from ..models.lora import is_lora
from ..models.packing import attention_kwargs
from .ppo_math import entropy_from_logits, logprobs_of, tempered


def pad_prompt_response(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """One batch of prompt+response rows, prompts left-padded and responses right-padded.

    Every response starts at the same column P (the longest prompt), so the logits predicting
    response token t sit at column P-1+t in every row and the model only needs the last T+1 columns
    of logits (`logits_to_keep`): the vocabulary projection skips the prompts. Position ids count
    from 0 at each row's first real token, as in generation.
    -> input_ids, attention_mask, position_ids [B, P+T], response tokens [B, T], response mask [B, T].
    """
    B, T = len(prompts), max(1, max(len(r) for r in responses))
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


def response_logprobs(model, ids, attn, position_ids, tokens, with_entropy: bool = False, temperature: float = 1.0,
                      vocab_size: int | None = None):
    """Log-probs [B, T] (and entropies) of the response tokens of a `pad_prompt_response` batch, under the
    policy that sampled them: logits divided by the sampling temperature, over the first `vocab_size`
    columns (the tokenizer's length; None = every column).

    Responses occupy the last T columns, so the logits that predict them are columns -T-1 .. -2; models
    that take `logits_to_keep` project only those T+1 hidden states onto the vocabulary.
    """
    T = tokens.shape[1]
    kwargs = {"logits_to_keep": T + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                   **kwargs).logits[:, -T - 1:-1]
    logits = tempered(real_vocabulary(logits, vocab_size), temperature)
    lp = logprobs_of(logits, tokens)
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


def response_values(critic, ids, attn, position_ids, T: int):
    """Critic values [B, T] at the positions that predict each response token (columns -T-1 .. -2)."""
    return critic(ids, attn, position_ids)[:, -T - 1:-1]


def _packed_inputs(model, layout: dict, config=None) -> dict:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    config = config if config is not None else module.config
    return {"input_ids": layout["input_ids"],
            **attention_kwargs(layout, config, causal=True, dtype=next(module.parameters()).dtype)}


def packed_response_logprobs(model, layout, tokens, with_entropy: bool = False, temperature: float = 1.0,
                             vocab_size: int | None = None):
    """response_logprobs on a `pack_prompt_response` layout: the same [B, T] log-probs (and entropies),
    with only the kept columns (`logits_to_keep` as indices) projected onto the vocabulary."""
    if _accepts_logits_to_keep(model):
        logits = model(use_cache=False, logits_to_keep=layout["keep_cols"], **_packed_inputs(model, layout)).logits
        index = layout["resp_keep"]
    else:
        logits, index = model(use_cache=False, **_packed_inputs(model, layout)).logits, layout["resp_pos"]
    logits = tempered(real_vocabulary(logits.reshape(-1, logits.shape[-1])[index], vocab_size), temperature)
    lp = logprobs_of(logits, tokens)
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


def packed_response_values(critic, layout):
    """response_values on a `pack_prompt_response` layout: [B, T] values at the positions predicting each token."""
    module = getattr(critic, "module", critic)
    kwargs = _packed_inputs(critic, layout, module.backbone.config)
    values = critic(kwargs.pop("input_ids"), kwargs.pop("attention_mask"), kwargs.pop("position_ids"), **kwargs)
    return values.reshape(-1)[layout["resp_pos"]]
