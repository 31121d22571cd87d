"""Train a reward model: `deepspeed --module aplot_rlhf.cli.train_rm ...`, torchrun, or `python -m`."""
from __future__ import annotations

import sys

from ._train import train_main


def main(argv=None) -> dict:
    return train_main("rm", argv, "Train a reward model (bt, bt_smooth, margin, aplot) under DeepSpeed.")


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
