"""Align a policy with PPO: `deepspeed --module aplot_rlhf.cli.train_ppo ...`, torchrun, or `python -m`."""
from __future__ import annotations

import json
import logging
import sys

from ..config import PPOConfig, load_config


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(PPOConfig, argv, "PPO with vLLM (or HF) generation inside the DeepSpeed ranks.")
    if cfg.dry_run:
        from .dry_run import dry_run_ppo
        return dry_run_ppo(cfg)
    from ..engine import PREEMPT_EXIT_CODE
    from ..trainers.ppo import PPOTrainer
    trainer = PPOTrainer(cfg).setup()
    try:
        metrics = trainer.train()
        if trainer.preempted:  # a checkpoint is written: exit so the scheduler requeues the job
            raise SystemExit(PREEMPT_EXIT_CODE)
        if trainer.rank == 0:
            print(json.dumps({k: metrics[k] for k in ("reward/raw_mean", "kl", "response_length") if k in metrics}))
        return metrics
    finally:
        trainer.close()


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
