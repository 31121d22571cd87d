"""Run by tests/test_rm_train.py (torchrun, any world size): one APLOT micro-step on the first
micro-batch; writes this rank's margins and loss to output_dir/ot_check_rank{rank}.json."""
import json
import os
import sys

from aplot_rlhf.config import RMConfig, load_config
from aplot_rlhf.losses import bt_loss
from aplot_rlhf.trainers.rm import RewardModelTrainer


def main():
    cfg = load_config(RMConfig, sys.argv[1:])
    trainer = RewardModelTrainer(cfg).setup()
    try:
        seen = {}
        margin = trainer.margin

        def recording_margin(chosen, rejected, *rest):
            m = margin(chosen, rejected, *rest)
            seen["margins"], seen["loss"] = m.tolist(), bt_loss(chosen, rejected, m).item()
            return m

        trainer.margin = recording_margin
        trainer.train_micro_step(trainer.micro_batch(0))
        # one file per rank: the ranks' stdout lines can interleave under torchrun
        with open(os.path.join(cfg.output_dir, f"ot_check_rank{trainer.rank}.json"), "w") as fh:
            json.dump({"rank": trainer.rank, "ot_batch": trainer.ot_batch_size, **seen}, fh)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
