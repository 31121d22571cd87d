"""Run by tests/test_ppo.py in its own process: sample with vLLM at a temperature, then compare the
log-probs vLLM reports for the sampled tokens with the trainer's old log-probs of the same tokens.

Prints one line: RESULT {"tempered_max_diff", "untempered_max_diff", "tokens", "max_sampled" (the largest
sampled id), "vocab" (the tokenizer's length), "embedding_rows"}.
"""
import json
import sys

import torch

from aplot_rlhf.config import PPOConfig, load_config
from aplot_rlhf.rollout.base import sample_seeds
from aplot_rlhf.trainers.ppo import PPOTrainer
from aplot_rlhf.trainers.ppo_layout import response_logprobs, trim_left_padding


def main():
    cfg = load_config(PPOConfig, sys.argv[1:])
    trainer = PPOTrainer(cfg).setup()
    try:
        batch = trainer.prompt_batch(0)
        prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
        responses, engine_lp = trainer.backend.generate(
            prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            seeds=sample_seeds(cfg.seed, 0, trainer.rank, trainer.world, len(prompts)), return_logprobs=True)
        exp = trainer.make_experience(prompts, rm_prompts, responses)
        mask = exp["mask"].bool()
        engine = torch.zeros_like(exp["old_lp"])
        for i, lps in enumerate(engine_lp):
            engine[i, :len(lps)] = torch.tensor(lps)
        with torch.no_grad():  # the same tokens under the untempered policy: what the trainer used to compute
            raw = response_logprobs(trainer.actor, *trim_left_padding(exp["ids"], exp["attn"], exp["posids"]),
                                    exp["tokens"], temperature=1.0, vocab_size=trainer.vocab_size)
        print("RESULT " + json.dumps({
            "tempered_max_diff": (exp["old_lp"] - engine)[mask].abs().max().item(),
            "untempered_max_diff": (raw - engine)[mask].abs().max().item(),
            "tokens": int(mask.sum()), "max_sampled": max(t for r in responses for t in r),
            "vocab": trainer.vocab_size, "embedding_rows": trainer.actor.module.config.vocab_size}), flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
