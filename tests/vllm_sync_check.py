"""Run by tests/test_ppo.py in its own process: move the actor's embeddings and LM head away from the files vLLM
started from, sync, and compare the log-probs vLLM reports for its samples with the trainer's.

Prints one line: RESULT {"tied", "before_sync_max_diff", "after_sync_max_diff", "tokens", "warnings" (the
"Failed to load weights" messages of the sync that reached the log)}."""
import json
import logging
import sys

import torch

from aplot_rlhf.config import PPOConfig, load_config
from aplot_rlhf.rollout.base import sample_seeds
from aplot_rlhf.trainers.ppo import PPOTrainer


class Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        if "Failed to load weights" in record.getMessage():
            self.messages.append(record.getMessage())


def engine_vs_trainer(trainer, cfg, prompts, rm_prompts, seed):
    responses, engine_lp = trainer.backend.generate(
        prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seeds=sample_seeds(seed, 0, trainer.rank, trainer.world, len(prompts)), return_logprobs=True)
    exp = trainer.make_experience(prompts, rm_prompts, responses)
    mask = exp["mask"].bool()
    engine = torch.zeros_like(exp["old_lp"])
    for i, lps in enumerate(engine_lp):
        engine[i, :len(lps)] = torch.tensor(lps)
    return (exp["old_lp"] - engine)[mask].abs().max().item(), int(mask.sum())


def main():
    cfg = load_config(PPOConfig, sys.argv[1:])
    trainer = PPOTrainer(cfg).setup()
    count = Count()  # after vLLM configured its loggers; sees what the sync's filter lets through
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addHandler(count)
    try:
        model = trainer.actor.module
        batch = trainer.prompt_batch(0)
        prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        with torch.no_grad():  # the embedding (and an untied head) moved: the files vLLM loaded are stale now
            g = torch.Generator().manual_seed(0)
            emb = model.get_input_embeddings().weight
            emb.add_(torch.randn(emb.shape, generator=g) * 0.5)
            if not tied:
                head = model.get_output_embeddings().weight
                head.add_(torch.randn(head.shape, generator=g) * 0.5)
        before, _ = engine_vs_trainer(trainer, cfg, prompts, rm_prompts, 1)
        count.messages.clear()
        trainer.sync_weights()
        after, tokens = engine_vs_trainer(trainer, cfg, prompts, rm_prompts, 2)
        print("RESULT " + json.dumps({"tied": tied, "before_sync_max_diff": before, "after_sync_max_diff": after,
                                      "tokens": tokens, "warnings": count.messages}), flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
