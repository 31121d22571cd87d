"""Fallback generation: transformers `generate` on the actor, with ZeRO-3 weights gathered first.

Gathering makes the full model resident on every rank for the rollout, so it fits small and medium
models; `synced_gpus=True` instead keeps ZeRO-3 partitioning during generate (slow: one all-gather
per layer per token) and exists for comparison.
"""
from __future__ import annotations

import torch

from ..engine import deepspeed as ds_api
from ..engine import distributed as comm
from .base import cut_at_eos

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


class HFRollout:
    def __init__(self, actor_module: torch.nn.Module, tokenizer, zero3: bool, synced_gpus: bool = False,
                 banned_token_ids=()):
        """banned_token_ids: never sampled (embedding rows past the tokenizer: the trainer's log-probs leave
        them out of the softmax), through generate's suppress_tokens."""
        self.model, self.tok, self.zero3, self.synced = actor_module, tokenizer, zero3, synced_gpus
        self.banned = sorted(set(banned_token_ids)) or None
        self.name = "hf_zero3_synced" if synced_gpus else "hf_gathered"
        self.eos_ids = {tokenizer.eos_token_id}

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seeds, return_logprobs: bool = False):
        """One batched `generate`: its rows draw from one generator seeded with the batch's first seed
        (distinct per rank and iteration), inside `fork_rng` so the trainer's RNG stream is untouched.

        return_logprobs: also the log-prob of each sampled token under the distribution it was drawn from
        (generate's processed scores: temperature and top-p applied), as the vLLM backend reports them;
        keeps every step's [B, vocab] scores until generate returns."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        dev = comm.device()
        was_training = self.model.training
        self.model.eval()
        sampling = dict(sampling_kwargs(temperature, top_p), suppress_tokens=self.banned)
        rng_devices = ([dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda"
                       else [])
        with ds_api.gathered_params(list(self.model.parameters()), enabled=self.zero3 and not self.synced), \
                torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seeds[0])
            out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                      pad_token_id=pad, eos_token_id=list(self.eos_ids), use_cache=True,
                                      synced_gpus=self.synced, return_dict_in_generate=return_logprobs,
                                      output_scores=return_logprobs, **sampling)
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
