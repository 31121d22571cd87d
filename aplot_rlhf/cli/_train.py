"""What train_rm and train_ppo do from the command line: flags (and --config YAML) -> a validated config
-> the dry run, or the trainer set up, trained to the end and closed (trainers/run.py)."""
from __future__ import annotations

import logging


def train_main(job: str, argv, description: str) -> dict | int:
    """job: 'rm' or 'ppo'. Heavy imports come after flag parsing, so --help is fast."""
    from ..config import PPOConfig, RMConfig, load_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RMConfig if job == "rm" else PPOConfig, argv, description)
    from . import dry_run
    if cfg.dry_run:  # checks the same paths first, reported as the dry run's verdict
        return (dry_run.dry_run_rm if job == "rm" else dry_run.dry_run_ppo)(cfg)
    from ..models.loader import check_run_paths
    check_run_paths(cfg, job)  # one error line, before DeepSpeed or any model loads
    if job == "ppo":
        from ..rewards import check_reward_functions
        check_reward_functions(cfg)  # a python: source's file and function, before any model loads
    from ..trainers.run import train_to_the_end
    if job == "rm":
        from ..trainers.rm import RewardModelTrainer
        return train_to_the_end(RewardModelTrainer(cfg), lambda results: {
            name: {"accuracy": r["accuracy"], "n": r["n"]} for name, r in results.items()})
    from ..trainers.ppo import PPOTrainer
    return train_to_the_end(PPOTrainer(cfg), lambda metrics: {
        k: metrics[k] for k in ("reward/raw_mean", "kl", "response_length") if k in metrics})
