"""Train a reward model: `deepspeed --module aplot_rlhf.cli.train_rm ...`, torchrun, or `python -m`."""
from __future__ import annotations

import json
import logging
import sys

from ..config import RMConfig, load_config


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RMConfig, argv, "Train a reward model (bt, bt_smooth, margin, aplot) under DeepSpeed.")
    if cfg.dry_run:
        from .dry_run import dry_run_rm
        return dry_run_rm(cfg)
    from ..engine import PREEMPT_EXIT_CODE
    from ..trainers.rm import RewardModelTrainer  # heavy imports after flag parsing, so --help is fast
    trainer = RewardModelTrainer(cfg).setup()
    try:
        results = trainer.train()
        if trainer.preempted:  # a checkpoint is written: exit so the scheduler requeues the job
            raise SystemExit(PREEMPT_EXIT_CODE)
        if trainer.rank == 0:
            print(json.dumps({name: {"accuracy": r["accuracy"], "n": r["n"]} for name, r in results.items()}))
        return results
    finally:
        trainer.close()


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
