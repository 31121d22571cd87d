"""Real DeepSpeed ZeRO-3 reward-model training over 2 CPU processes (gloo), export, reload, resume."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, HH_PAIRS, PYTHON, REPO, python_env

STEPS = 8


def rm_args(model_dir, out, **extra):
    args = {"model_name_or_path": model_dir, "train_data": str(HH_PAIRS), "output_dir": str(out),
            "eval_split_fraction": 0.5, "max_train_pairs": 16, "max_eval_pairs": 12, "max_length": 64,
            "micro_batch_size": 2, "long_response": "skip", "gradient_accumulation_steps": 2, "learning_rate": 2e-3, "warmup_ratio": 0.0,
            "lr_scheduler": "constant", "max_steps": STEPS, "zero_stage": 3, "loss": "aplot", "save_steps": 2,
            "eval_batch_size": 4, **extra}
    flags = []
    for k, v in args.items():
        flags += [f"--{k}", str(v)]
    return flags + ["--no-progress", "--no-tensorboard"]


def torchrun(flags, port):
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "aplot_rlhf.cli.train_rm", *flags]


def read_metrics(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_full")
    proc = subprocess.run(torchrun(rm_args(tiny_llama_dir, out), free_port()), env=python_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, proc


def test_zero3_two_process_loss_goes_down(full_run):
    out, proc = full_run
    m = read_metrics(out)
    assert sorted(m) == list(range(1, STEPS + 1))
    first = (m[1]["train/loss"] + m[2]["train/loss"]) / 2
    last = (m[STEPS - 1]["train/loss"] + m[STEPS]["train/loss"]) / 2
    assert last < first - 0.05, f"loss did not go down: {first:.4f} -> {last:.4f}"
    assert m[1]["train/aplot/ot_batch_size"] == 4  # global OT batch: 2 pairs per rank x 2 ranks
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = torch.load(out / "eval_rewards.pt")["id_val"]
    assert summary["id_val"]["n"] == len(saved["chosen"]) > 0  # pairs too long for the window are counted skips


def test_export_reloads_in_plain_transformers_with_identical_rewards(full_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from aplot_rlhf.data.preference import PairTokenizer, load_pairs, split_pairs
    from aplot_rlhf.eval import score_pairs
    out, _ = full_run
    model_dir = out / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert abs(model.config.reward_std) > 0
    saved = torch.load(out / "eval_rewards.pt")["id_val"]
    _, val = split_pairs(load_pairs(str(HH_PAIRS)), 0.5, 1234)
    encoded = PairTokenizer(tok, 64, long_response="skip").encode_pairs(val[:12])
    c, r = score_pairs(lambda i, a, s: model(input_ids=i, attention_mask=a).logits[:, 0], encoded, 4,
                       tok.pad_token_id, "cpu")
    assert torch.allclose(c, saved["chosen"], atol=1e-5) and torch.allclose(r, saved["rejected"], atol=1e-5)
    # and the eval CLI users script against prints the same accuracy as its last line
    proc = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.eval_rm", "--model", str(model_dir), "--data", str(HH_PAIRS),
                           "--max_pairs", "5"], env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"harmless-base-test"} and 0 < last["harmless-base-test"]["n"] <= 5


def test_resume_after_kill_continues_the_same_loss_curve(full_run, tiny_llama_dir, tmp_path):
    """SIGKILL a run once it has passed a checkpoint, resume with one flag, compare with the uninterrupted run."""
    full_out, _ = full_run
    out = tmp_path / "rm_killed"
    proc = subprocess.Popen(torchrun(rm_args(tiny_llama_dir, out), free_port()), env=python_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(s >= 5 for s in read_metrics(out)):
            break
        if proc.poll() is not None:
            pytest.fail("run ended before it could be killed")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = json.loads((out / "checkpoints" / "latest_checkpoint.json").read_text())
    assert latest["step"] in (2, 4, 6)
    resumed = subprocess.run(torchrun(rm_args(tiny_llama_dir, out) + ["--resume"], free_port()), env=python_env(),
                             cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    full, mine = read_metrics(full_out), read_metrics(out)
    for step in range(latest["step"] + 1, STEPS + 1):
        assert abs(full[step]["train/loss"] - mine[step]["train/loss"]) < 1e-5, (step, full[step], mine[step])


def _ot_run(model_dir, out, nproc, micro_batch_size):
    flags = rm_args(model_dir, out, micro_batch_size=micro_batch_size, gradient_accumulation_steps=1,
                    zero_stage=2, eval_split_fraction=0.0) + ["--no-export"]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(REPO / "tests" / "rm_ot_check.py"), *flags]
    proc = subprocess.run(cmd, env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(l.split("RESULT ", 1)[1]) for l in proc.stdout.splitlines() if "RESULT " in l]
    return sorted(rows, key=lambda r: r["rank"])


def test_global_ot_batch_over_two_ranks_equals_one_rank_with_the_whole_batch(tiny_llama_dir, tmp_path):
    """2 ranks x 2 pairs with the global OT batch solve the same problem as 1 rank x 4 pairs: each rank
    keeps its own rows of the margins, and the first step's loss is the same (same data, same init)."""
    two = _ot_run(tiny_llama_dir, tmp_path / "two", 2, 2)
    (one,) = _ot_run(tiny_llama_dir, tmp_path / "one", 1, 4)
    assert [r["ot_batch"] for r in two] == [4, 4] and one["ot_batch"] == 4
    margins = two[0]["margins"] + two[1]["margins"]
    assert margins == pytest.approx(one["margins"], abs=1e-6)
    assert len(set(round(m, 6) for m in margins)) > 1  # distinct rows: keeping rank 0's rows would show
    loss_two = (two[0]["loss"] + two[1]["loss"]) / 2  # equal shares: the global mean
    assert loss_two == pytest.approx(one["loss"], abs=1e-6)


def test_log_row_is_the_mean_of_its_interval(tiny_llama_dir, tmp_path):
    """With --log_steps 2 each row averages its two steps, as the per-step rows of the same run show."""
    rows = {}
    for log_steps in (1, 2):
        out = tmp_path / f"log{log_steps}"
        flags = rm_args(tiny_llama_dir, out, max_steps=4, zero_stage=0, save_steps=0, eval_split_fraction=0.0,
                        log_steps=log_steps) + ["--no-export"]
        proc = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.train_rm", *flags], env=python_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows[log_steps] = read_metrics(out)
    assert sorted(rows[2]) == [2, 4]
    for step in (2, 4):
        for key in ("train/loss", "train/accuracy", "train/aplot/margin_mean", "train/rewards/margins"):
            mean = (rows[1][step - 1][key] + rows[1][step][key]) / 2
            assert rows[2][step][key] == pytest.approx(mean, abs=1e-6), (step, key)
