"""PPO (gae, with a critic) vs critic-free estimators on the PPO demo's task, for the same wall-clock budget.

SmolLM2-135M-Instruct against the demo's APLOT reward model (`make demo` writes runs/demo/model), the
demo's model, prompts and learning rate, gae and the group estimators at 16 sequences per rollout (below);
each estimator trains for `--budget_s` seconds of PPO iterations (set-up and evaluations not counted), in
its own process, one after the other. Reports the mean RM reward of the greedy answers to the 32 held-out
prompts before and after, the iterations done, and the process's peak host memory (ru_maxrss: on a GPU
machine, torch.cuda.max_memory_allocated is added).

    python benchmarks/estimators.py --budget_s 240            # gae and grpo, one after the other
    python benchmarks/estimators.py --estimators gae grpo rloo --budget_s 300
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the comparison as first measured: gae samples 16 prompts once each with kl_coef 0.01 (the demo's settings until
# issue 25 item 9; the demo now runs rloo), group estimators 4 prompts x 4 samples = the same 16 sequences
GAE_FLAGS = ["--samples_per_prompt", "1", "--rollout_batch_size", "16", "--ppo_mini_batch_size", "8",
             "--kl_coef", "0.01"]
GROUP_FLAGS = ["--samples_per_prompt", "4", "--rollout_batch_size", "4", "--ppo_mini_batch_size", "8",
               "--kl_coef", "0.01", "--kl_mode", "loss"]


def run_one(estimator: str, budget_s: float, out: Path) -> dict:
    import torch

    from aplot_rlhf.cli.demo_ppo import demo_flags
    from aplot_rlhf.config import PPOConfig, load_config
    from aplot_rlhf.trainers.ppo import PPOTrainer
    backend, flags = demo_flags(REPO / "runs" / "demo" / "model", out)
    extra = ["--advantage_estimator", estimator, "--ppo_iterations", "1000", "--no-export", "--no-progress"]
    extra += GAE_FLAGS if estimator == "gae" else GROUP_FLAGS
    cfg = load_config(PPOConfig, flags + extra)
    trainer = PPOTrainer(cfg).setup()
    try:
        held_out = trainer.eval_prompts
        before = trainer.evaluate_reward(held_out)
        t0, iterations = time.perf_counter(), 0
        while time.perf_counter() - t0 < budget_s:
            trainer.step()
            iterations += 1
        train_s = time.perf_counter() - t0
        after = trainer.evaluate_reward(held_out)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        gpu_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
        params = sum(p.numel() for e in trainer.trained_engines.values() for p in e.module.parameters())
        return {"estimator": estimator, "backend": backend, "iterations": iterations, "train_s": train_s,
                "sequences_per_iteration": cfg.rollout_batch_size * cfg.samples_per_prompt,
                "reward_before": before, "reward_after": after, "peak_host_gib": peak_gib, "peak_gpu_gib": gpu_gib,
                "trained_params": params, "has_critic": trainer.critic is not None}
    finally:
        trainer.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=["gae", "grpo"])
    p.add_argument("--budget_s", type=float, default=240.0, help="seconds of PPO iterations per estimator")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one estimator, print JSON
    p.add_argument("--out", default=str(REPO / "runs" / "bench_estimators"))
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.budget_s, Path(args.out) / args.one)), flush=True)
        return
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    if not (REPO / "runs" / "demo" / "model" / "config.json").exists():
        subprocess.run([sys.executable, "-m", "aplot_rlhf.cli.demo"], cwd=REPO, check=True)
    rows = []
    for est in args.estimators:  # a fresh process each: peak memory is the estimator's own
        proc = subprocess.run([sys.executable, __file__, "--one", est, "--budget_s", str(args.budget_s),
                               "--out", args.out], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode:
            sys.exit(f"{est} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]))
    print(f"\nsame budget: {args.budget_s:.0f} s of PPO iterations each; reward = mean RM score of greedy answers to "
          "32 held-out prompts")
    print(f"{'estimator':<12}{'critic':>7}{'iters':>6}{'train s':>8}{'seq/iter':>9}{'before':>9}{'after':>9}"
          f"{'change':>9}{'trained params':>16}{'peak host GiB':>15}")
    for r in rows:  # the last iteration may run past the budget: train s is what each really used
        print(f"{r['estimator']:<12}{'yes' if r['has_critic'] else 'no':>7}{r['iterations']:>6}{r['train_s']:>8.0f}"
              f"{r['sequences_per_iteration']:>9}{r['reward_before']:>9.4f}{r['reward_after']:>9.4f}"
              f"{r['reward_after'] - r['reward_before']:>+9.4f}{r['trained_params'] / 1e6:>15.1f}M"
              f"{r['peak_host_gib']:>15.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
