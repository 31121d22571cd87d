"""Fallback generation: transformers `generate` on the actor, with ZeRO-3 weights gathered first.

Gathering makes the full model resident on every rank for the rollout, so it fits small and medium
models; `synced_gpus=True` instead keeps ZeRO-3 partitioning during generate (slow: one all-gather
per layer per token) and exists for comparison.
"""
from __future__ import annotations

import inspect
import logging

import torch

from ..engine import deepspeed as ds_api
from ..engine import distributed as comm
from .base import cut_at_eos

log = logging.getLogger(__name__)

# Every generate() knob that filters or reshapes the next-token distribution, at its neutral value. Passed
# explicitly, they win over the model's generation_config (hub models ship top_k, repetition_penalty, ...) and
# over transformers' own defaults (top_k=50 when the model sets none): PPO's log-probs are those of
# softmax(logits / temperature) after top-p, so the sampler must draw from exactly that.
NEUTRAL_GENERATION = dict(
    top_k=0, min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
    encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None,
    sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
    forced_eos_token_id=None, min_length=0, min_new_tokens=None, exponential_decay_length_penalty=None,
    guidance_scale=None, watermarking_config=None, remove_invalid_values=False, renormalize_logits=False,
    num_beams=1, penalty_alpha=None, dola_layers=None, num_return_sequences=1,
)
SAMPLING_ONLY = ("top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """generate() kwargs for sampling at `temperature` with nucleus `top_p` (temperature 0: greedy), every
    other filter or penalty off whatever the model's generation_config says. Keys this transformers version's
    GenerationConfig does not know are left out."""
    from transformers import GenerationConfig
    known = GenerationConfig()
    neutral = {k: v for k, v in NEUTRAL_GENERATION.items() if hasattr(known, k)}
    if temperature > 0:
        return dict(neutral, do_sample=True, temperature=temperature, top_p=top_p)
    # greedy: the sampling warpers do not run; unset (not neutral) so transformers does not warn about them
    unset = {k: None for k in SAMPLING_ONLY + ("temperature", "top_p") if hasattr(known, k)}
    return dict(neutral, **unset, do_sample=False)


def left_pad(prompts, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [len(prompts), longest], left-padded: every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def shareable_cache(cache) -> bool:
    """True for a cache whose rows can be copied to the rows of repeated prompts and extended by generate: a
    DynamicCache of plain full-attention layers. Sliding-window, quantized, static and linear-attention layers
    keep per-layer state this module does not reason about: those models generate unshared."""
    from transformers.cache_utils import DynamicCache, DynamicLayer
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


class HFRollout:
    def __init__(self, actor_module: torch.nn.Module, tokenizer, zero3: bool, synced_gpus: bool = False,
                 banned_token_ids=(), share_prompt: bool = True):
        """banned_token_ids: never sampled (embedding rows past the tokenizer: the trainer's log-probs leave
        them out of the softmax), through generate's suppress_tokens.

        share_prompt: when a batch repeats prompts (a GRPO/RLOO group is K samples of one prompt), run the
        prompts' forward once per distinct prompt and copy its key/value cache to every sample of it before
        sampling: exact (a causal prompt's keys and values do not depend on what follows) and K times fewer
        prefill tokens. Models whose cache cannot be shared this way (`shareable_cache`) and ZeRO-3 with
        synced_gpus generate unshared; the first such batch says so once."""
        self.model, self.tok, self.zero3, self.synced = actor_module, tokenizer, zero3, synced_gpus
        self.banned = sorted(set(banned_token_ids)) or None
        self.name = "hf_zero3_synced" if synced_gpus else "hf_gathered"
        self.eos_ids = {tokenizer.eos_token_id}
        self.share_prompt = share_prompt and not synced_gpus
        self.last_prefill_rows: int | None = None  # prompts prefilled by the last generate (tests, benchmarks)
        # the prefill needs no logits: models that can skip the LM head over the prompt are asked to
        base = actor_module.get_base_model() if hasattr(actor_module, "get_base_model") else actor_module
        self._one_logit = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters
                           else {})
        gen_cfg = getattr(actor_module, "generation_config", None)
        if self.share_prompt and getattr(gen_cfg, "cache_implementation", None) is not None:
            log.info("HF rollout: the model's generation_config asks for a %r cache: prompts are not shared",
                     gen_cfg.cache_implementation)
            self.share_prompt = False

    def _shared_prefill(self, prompts, pad: int, dev):
        """The key/value cache of every prompt but its last token, computed once per distinct prompt and
        copied to each of its repeats (rows in `prompts` order), or None where sharing does not apply. The last
        token is left to generate, whose first forward then yields each row's first-token logits."""
        distinct: dict[tuple, int] = {}
        rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) == len(prompts):
            self.last_prefill_rows = len(prompts)
            return None
        ids, mask = left_pad([list(p) for p in distinct], pad)
        if ids.shape[1] < 2:
            return None
        ids, mask = ids.to(dev), mask.to(dev)
        # generate's own positions for left-padded rows (cumsum of the mask, pads at 0); the model would
        # otherwise number the columns, shifting every left-padded prompt
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                         use_cache=True, **self._one_logit)
        cache = out.past_key_values
        if not shareable_cache(cache):
            log.info("HF rollout: %s's cache (%s) is not shared across a prompt's samples: prompts are "
                     "prefilled once per sample", type(self.model).__name__, type(cache).__name__)
            self.share_prompt = False
            return None
        cache.batch_select_indices(torch.tensor(rows, device=dev))
        self.last_prefill_rows = len(distinct)
        return cache

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seeds, return_logprobs: bool = False):
        """One batched `generate`: its rows draw from one generator seeded with the batch's first seed
        (distinct per rank and iteration), inside `fork_rng` so the trainer's RNG stream is untouched.

        return_logprobs: also the log-prob of each sampled token under the distribution it was drawn from
        (generate's processed scores: temperature and top-p applied), as the vLLM backend reports them;
        keeps every step's [B, vocab] scores until generate returns."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]
        dev = comm.device()
        was_training = self.model.training
        self.model.eval()
        sampling = dict(sampling_kwargs(temperature, top_p), suppress_tokens=self.banned)
        rng_devices = ([dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda"
                       else [])
        with ds_api.gathered_params(list(self.model.parameters()), enabled=self.zero3 and not self.synced), \
                torch.random.fork_rng(devices=rng_devices):
            self.last_prefill_rows = len(prompts)
            cache = self._shared_prefill(prompts, pad, dev) if self.share_prompt else None
            shared = {} if cache is None else {"past_key_values": cache}
            torch.manual_seed(seeds[0])
            out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                      pad_token_id=pad, eos_token_id=list(self.eos_ids), use_cache=True,
                                      synced_gpus=self.synced, return_dict_in_generate=return_logprobs,
                                      output_scores=return_logprobs, **shared, **sampling)
        self.model.train(was_training)
        sequences = out.sequences if return_logprobs else out
        responses = [cut_at_eos(row[width:].tolist(), self.eos_ids) for row in sequences.cpu()]
        if not return_logprobs:
            return responses
        new = sequences[:, width:]
        lps = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, t:t + 1])[:, 0]
                           for t, s in enumerate(out.scores)], 1).cpu()
        return responses, [lps[i, :len(r)].tolist() for i, r in enumerate(responses)]

    def sync_weights(self, named_tensors) -> None:
        pass  # generates from the live training weights

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass
