"""Verifiable-reward demo: GRPO on SmolLM2-135M-Instruct (GGUF from PyPI) with a reward function shipped in
examples/arithmetic/tasks.py (exact-answer checking of generated arithmetic questions), on CPU.

Prints the accuracy of the policy's greedy answers to held-out questions (never trained on) before and
after GRPO, with a 95% interval of the paired difference. Extra flags override the demo's settings
(e.g. --ppo_iterations 30, --rollout_backend hf). `--kind` picks the task (examples/arithmetic/tasks.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from .demo import REPO
from .demo_ppo import greedy_scores, smollm2_gguf

TASKS = REPO / "examples" / "arithmetic" / "tasks.py"
N_TRAIN, N_EVAL = 320, 96  # distinct questions: the held-out ones are the last rows, never sampled in training


def load_tasks():
    if not TASKS.exists():
        raise SystemExit(f"{TASKS} not found: the demo runs from a clone of the repository")
    spec = importlib.util.spec_from_file_location("arithmetic_tasks", TASKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_flags(prompts: Path, output_dir: Path) -> list[str]:
    """The demo's GRPO flags (see README, "Verifiable rewards"): 8 questions x 8 samples per iteration."""
    gguf = smollm2_gguf()
    try:
        import vllm  # noqa: F401
        backend = "vllm"
    except Exception:
        backend = "hf"
    import torch
    return ["--actor_model", str(gguf.parent), "--actor_gguf_file", gguf.name,
            "--reward_model", f"correct=python:{TASKS}:exact_answer", "--prompt_data", str(prompts),
            "--eval_prompts", str(N_EVAL), "--prompt_format", "chat", "--rollout_backend", backend,
            "--advantage_estimator", "grpo", "--samples_per_prompt", "8", "--rollout_batch_size", "8",
            "--ppo_mini_batch_size", "32", "--micro_batch_size", "16", "--max_new_tokens", "32",
            "--max_prompt_length", "64", "--ppo_iterations", "12", "--learning_rate", "1e-5",
            "--kl_mode", "loss", "--kl_coef", "0.01", "--zero_stage", "2", "--precision", "fp32",
            "--warmup_ratio", "0",
            "--lr_scheduler", "constant", "--output_dir", str(output_dir), "--save_total_limit", "1",
            "--overwrite_output_dir", "--no-export", "--log_steps", "1",
            *([] if torch.cuda.is_available() else ["--vllm_gpu_memory_utilization", "0.1"])]


def paired_interval(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean paired difference and its 95% half-width (normal approximation over prompts)."""
    d = [a - b for a, b in zip(after, before)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return mean, 1.96 * math.sqrt(var / len(d))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--kind", default="add2")
    known, rest = ap.parse_known_args(list(argv if argv is not None else sys.argv[1:]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = REPO / "runs" if (REPO / "pyproject.toml").exists() else Path.cwd() / "runs"
    out = runs / "demo_grpo"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_tasks().make_rows(known.kind, N_TRAIN + N_EVAL, seed=0)
    prompts = out / f"{known.kind}.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from ..config import PPOConfig, load_config
    cfg = load_config(PPOConfig, demo_flags(prompts, out / "run") + rest)
    from ..trainers.ppo import PPOTrainer
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg).setup()
    try:
        held_out = trainer.eval_prompts  # the last N_EVAL questions: never trained on
        before, _ = greedy_scores(trainer, held_out)
        trainer.train()
        after, texts = greedy_scores(trainer, held_out)
        before, after = before.tolist(), after.tolist()
        if trainer.rank == 0:
            report(cfg, held_out, before, after, texts, time.perf_counter() - t0)
        return {"accuracy_before": sum(before) / len(before), "accuracy_after": sum(after) / len(after)}
    finally:
        trainer.close()


def report(cfg, held_out, before, after, texts, wall_s) -> None:
    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    print(f"\n{'iter':>4} {'train acc':>9} {'kl':>7} {'len':>5} {'s':>6}")
    for r in rows:
        if "ppo/reward/correct/mean" in r:
            print(f"{r['step']:>4} {r['ppo/reward/correct/mean']:>9.3f} {r['ppo/kl']:>7.3f} "
                  f"{r['ppo/response_length']:>5.1f} {r['ppo/gen_s'] + r['ppo/experience_s'] + r['ppo/train_s']:>6.1f}")
    mean, half = paired_interval(before, after)
    gained = sum(a > b for a, b in zip(after, before))
    lost = sum(a < b for a, b in zip(after, before))
    n = len(before)
    print(f"\nheld-out accuracy ({n} questions never trained on, greedy): {sum(before) / n:.3f} -> "
          f"{sum(after) / n:.3f}, change {mean:+.3f} +- {half:.3f} (95%), right only after: {gained}, "
          f"right only before: {lost}")
    for p, t in list(zip(held_out, texts))[:4]:
        print(f"  {p[1][0]['content']!r} (answer {p[3]['answer']}) -> {t!r}")
    verdict = "improved" if mean - half > 0 else "no significant change"
    print(f"verdict: {verdict}; {wall_s / 60:.1f} min in all")


if __name__ == "__main__":
    main()
