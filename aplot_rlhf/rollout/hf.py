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


class HFRollout:
    def __init__(self, actor_module: torch.nn.Module, tokenizer, zero3: bool, synced_gpus: bool = False):
        self.model, self.tok, self.zero3, self.synced = actor_module, tokenizer, zero3, synced_gpus
        self.name = "hf_zero3_synced" if synced_gpus else "hf_gathered"
        self.eos_ids = {tokenizer.eos_token_id}

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seeds):
        """One batched `generate`: its rows draw from one generator seeded with the batch's first seed
        (distinct per rank and iteration), inside `fork_rng` so the trainer's RNG stream is untouched."""
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
        sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0
                    else dict(do_sample=False))
        rng_devices = ([dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda"
                       else [])
        with ds_api.gathered_params(list(self.model.parameters()), enabled=self.zero3 and not self.synced), \
                torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seeds[0])
            out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                      pad_token_id=pad, eos_token_id=list(self.eos_ids), use_cache=True,
                                      synced_gpus=self.synced, **sampling)
        self.model.train(was_training)
        return [cut_at_eos(row[width:].tolist(), self.eos_ids) for row in out.cpu()]

    def sync_weights(self, named_tensors) -> None:
        pass  # generates from the live training weights

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass
