"""Align a policy with PPO: `deepspeed --module aplot_rlhf.cli.train_ppo ...`, torchrun, or `python -m`."""
from __future__ import annotations

import sys

from ._train import train_main


def main(argv=None) -> dict:
    return train_main("ppo", argv, "PPO with vLLM (or HF) generation inside the DeepSpeed ranks.")


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
