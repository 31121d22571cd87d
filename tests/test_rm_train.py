"""Real DeepSpeed ZeRO-3 reward-model training over 2 CPU processes (gloo), export, reload, resume (a plain
kill-and-resume of the same run is in test_lora.py, with LoRA; kills during saving and SIGTERM are here)."""
import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import HH_PAIRS, PYTHON, REPO, free_port, python_env

STEPS = 8


def rm_args(model_dir, out, **extra):
    args = {"model_name_or_path": model_dir, "train_data": str(HH_PAIRS), "output_dir": str(out),
            "eval_split_fraction": 0.5, "max_train_pairs": 16, "max_eval_pairs": 12, "max_length": 64,
            "micro_batch_size": 2, "long_response": "skip", "gradient_accumulation_steps": 2, "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
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
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def kill_run(proc):
    """SIGKILL torchrun and every worker at once: torchrun starts its workers in sessions of their own,
    so killing its process group alone leaves them training."""
    import psutil
    root = psutil.Process(proc.pid)
    tree = root.children(recursive=True) + [root]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=60)


def assert_each_step_once(out):
    """Every training step has exactly one row, and no eval set has two rows at one step."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train = sorted(r["step"] for r in rows if "train/loss" in r)
    assert train == list(range(1, STEPS + 1)), f"training rows by step: {train}"
    evals = [(r["step"], next(k for k in r if k.startswith("eval/"))) for r in rows if "train/loss" not in r]
    assert len(evals) == len(set(evals)), f"duplicated eval rows: {sorted(evals)}"


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_full")
    proc = subprocess.run(torchrun(rm_args(tiny_llama_dir, out), free_port()), env=python_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, proc


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_export_reloads_in_plain_transformers_with_identical_rewards(full_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from aplot_rlhf.data.pair_tokenizer import PairTokenizer
    from aplot_rlhf.data.pairs import load_pairs, split_pairs
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


def _ot_run(model_dir, out, nproc, micro_batch_size):
    flags = rm_args(model_dir, out, micro_batch_size=micro_batch_size, gradient_accumulation_steps=1,
                    zero_stage=2, eval_split_fraction=0.0) + ["--no-export"]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(REPO / "tests" / "rm_ot_check.py"), *flags]
    proc = subprocess.run(cmd, env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((Path(out) / f"ot_check_rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.distributed
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


@pytest.mark.slow
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


def newest_step_dirs(ckpts):
    """step_N folders (exact name: what resume may load), newest first."""
    found = [(int(m.group(1)), p) for p in ckpts.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return [p for _, p in sorted(found, reverse=True)]


@pytest.mark.distributed
def test_kills_during_saving_and_damaged_checkpoints_resume_to_the_same_losses(full_run, tiny_llama_dir, tmp_path):
    """SIGKILL a 2-rank ZeRO-3 run while it saves (three times), damage what the kill left in each way a
    user meets (deleted file, truncated file, garbage pointer, missing pointer, temp leftovers), resume:
    it falls back to the newest complete checkpoint and ends with the uninterrupted run's losses."""
    full_out, _ = full_run
    out = tmp_path / "rm_killed"
    ckpts = out / "checkpoints"
    seed = int(time.time())
    rng = random.Random(seed)
    args = rm_args(tiny_llama_dir, out, save_steps=1)
    killed_mid_save = []
    expected_resume, expected_warnings = None, []
    for round_, (kill_at, damage) in enumerate([(3, "delete"), (5, "truncate+garbage_pointer"),
                                                (7, "missing_pointer+tmp")]):
        log_path = tmp_path / f"round{round_}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(torchrun(args + (["--resume"] if round_ else []), free_port()), env=python_env(),
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 600
            while not (ckpts.is_dir() and any(re.fullmatch(r"step_(\d+)(\.partial)?", p.name) and
                                              int(p.name.split("_")[1].split(".")[0]) >= kill_at
                                              for p in ckpts.iterdir())):
                assert proc.poll() is None, f"round {round_} ended before its kill:\n{log_path.read_text()[-4000:]}"
                assert time.time() < deadline
                time.sleep(0.005)
            time.sleep(0.0 if round_ == 0 else rng.uniform(0.0, 0.3))  # the first kill lands as a save starts
            kill_run(proc)
        text = log_path.read_text()
        if expected_resume is not None:  # what this round resumed from, after the damage done before it
            assert f"resumed at optimizer step {expected_resume} " in text, (seed, text[-4000:])
            for line in expected_warnings:
                assert line in text, (seed, line, text[-4000:])
        killed_mid_save.append(any(p.name.endswith(".partial") for p in ckpts.iterdir()))
        complete = newest_step_dirs(ckpts)
        assert len(complete) >= 2, (seed, round_, [p.name for p in ckpts.iterdir()])
        newest = complete[0]
        victim = max(newest.rglob("*.pt"), key=lambda p: p.stat().st_size)
        size = victim.stat().st_size
        pointer = ckpts / "latest_checkpoint.json"
        if damage == "delete":
            victim.unlink()
            expected_resume = int(complete[1].name.split("_")[1])
            expected_warnings = [f"{victim}: missing (manifest lists {size} bytes)",
                                 f"falling back to {complete[1].name}"]
        elif damage == "truncate+garbage_pointer":
            victim.write_bytes(victim.read_bytes()[:size // 3])
            pointer.write_text('{"tag": "step_')
            expected_resume = int(complete[1].name.split("_")[1])
            expected_warnings = [f"{victim}: {size // 3} bytes, manifest says {size}", f"{pointer}: unreadable"]
        else:
            pointer.unlink(missing_ok=True)
            (ckpts / "latest_checkpoint.json.tmp.99999").write_text('{"tag": "step_99"}')
            expected_resume = int(newest.name.split("_")[1])
            expected_warnings = []
    assert killed_mid_save[0], "the first kill should have left a half-written checkpoint folder"
    final = subprocess.run(torchrun(args + ["--resume"], free_port()), env=python_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-6000:]
    assert f"resumed at optimizer step {expected_resume} " in final.stderr
    assert not [p.name for p in ckpts.iterdir() if ".partial" in p.name or ".tmp." in p.name]
    assert_each_step_once(out)
    full, mine = read_metrics(full_out), read_metrics(out)
    for step in range(1, STEPS + 1):
        assert abs(full[step]["train/loss"] - mine[step]["train/loss"]) < 1e-5, (seed, step, full[step], mine[step])


def start_ranks(flags, world: int, module: str = "aplot_rlhf.cli.train_rm"):
    """`world` ranks as plain processes (no torchrun): a signal sent to one reaches the trainer itself,
    as slurm's does, and each rank's exit status is its own. -> (procs, stderr log paths)."""
    import tempfile
    port, procs, logs = free_port(), [], []
    for rank in range(world):
        env = python_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                              "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(Path(tempfile.mkstemp(suffix=f".rank{rank}.log")[1]))
        procs.append(subprocess.Popen([PYTHON, "-m", module, *flags], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=open(logs[-1], "w")))
    return procs, logs


@pytest.mark.distributed
def test_sigterm_checkpoints_every_rank_together_and_resume_continues_the_curve(full_run, tiny_llama_dir, tmp_path):
    """SIGTERM (slurm's warning) to both ranks of a ZeRO-3 run mid-training, and a second SIGTERM while it
    saves: each rank finishes its step, one checkpoint is written, both exit 75; --resume continues
    the uninterrupted run's loss curve."""
    from aplot_rlhf.engine.preemption import PREEMPT_EXIT_CODE
    full_out, _ = full_run
    out = tmp_path / "preempted"
    procs, logs = start_ranks(rm_args(tiny_llama_dir, out), 2)
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").exists() and any(s >= 3 for s in read_metrics(out))):
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        ckpts = out / "checkpoints"
        while not (ckpts.is_dir() and any(d.name.endswith(".partial") for d in ckpts.iterdir())):
            if any(p.poll() is not None for p in procs):  # saved before this loop looked: no second signal
                break
            assert time.time() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.002)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # again, while the checkpoint is being written
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [PREEMPT_EXIT_CODE] * 2, (codes, logs[0].read_text()[-3000:])
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and marker["exit_code"] == PREEMPT_EXIT_CODE
    stopped = marker["step"]
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped}" / "manifest.json").exists()
    assert "Traceback" not in logs[0].read_text()
    resumed = subprocess.run(torchrun(rm_args(tiny_llama_dir, out) + ["--resume"], free_port()), env=python_env(),
                             cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"resumed at optimizer step {stopped} " in resumed.stderr
    assert not (out / "PREEMPTED").exists()  # the requeued run served it
    assert_each_step_once(out)
    full, mine = read_metrics(full_out), read_metrics(out)
    for step in range(1, STEPS + 1):
        assert abs(full[step]["train/loss"] - mine[step]["train/loss"]) < 1e-5, (step, full[step], mine[step])
