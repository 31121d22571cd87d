"""Run by tests/test_ppo_correctness.py (issue 25 item 4): the actor's and critic's gradients of one PPO
mini-batch, without the optimizer step, written to output_dir/grads_world{W}.pt by rank 0.

World 1 (plain python): builds the first rollout's experience, shortens one response to 3 tokens (so the
ranks' token counts differ), saves it to EXP, and trains on all of it. World 2 (torchrun): each rank trains
on its half of the rows of EXP. Usage: ppo_grad_check.py EXP [train_ppo flags]."""
import os
import sys

import torch

from aplot_rlhf.config import PPOConfig, load_config
from aplot_rlhf.trainers.ppo import PPOTrainer


def main():
    exp_path, flags = sys.argv[1], sys.argv[2:]
    cfg = load_config(PPOConfig, flags)
    trainer = PPOTrainer(cfg).setup()
    try:
        if trainer.world == 1:
            batch = trainer.prompt_batch(0)
            prompts = [b[0] for b in batch]
            exp = trainer.make_experience(prompts, [b[1] for b in batch], trainer.generate(prompts))
            mask = exp["mask"].clone()
            mask[0, 3:] = 0  # as if the first response had ended at EOS after 3 tokens
            exp["mask"] = exp["loss_mask"] = mask
            torch.save(exp, exp_path)
        else:
            full = torch.load(exp_path, weights_only=False)
            n = full["ids"].shape[0]
            rows = slice(trainer.rank * n // trainer.world, (trainer.rank + 1) * n // trainer.world)
            exp = {k: v[rows] if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == n else v
                   for k, v in full.items()}
        engines = (("actor", trainer.actor), ("critic", trainer.critic))
        for _, engine in engines:
            engine.zero_grad()
            engine.step = lambda *a, **k: None  # keep the (averaged) gradients of the one mini-batch
        trainer.train_on(exp)
        grads = {f"{role}.{name}": p.grad.clone() for role, engine in engines
                 for name, p in engine.module.named_parameters() if p.grad is not None}
        if trainer.rank == 0:
            torch.save(grads, os.path.join(cfg.output_dir, f"grads_world{trainer.world}.pt"))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
