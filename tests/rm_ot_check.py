"""Run by tests/test_rm_train.py (torchrun, any world size): one APLOT micro-step on the first
micro-batch, printing this rank's margins and loss. Prints RESULT {"rank", "margins", "loss", "ot_batch"}."""
import json
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
        trainer.train_micro_step(trainer._micro_batch(0))
        print("RESULT " + json.dumps({"rank": trainer.rank, "ot_batch": trainer.ot_batch_size, **seen}), flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
