"""Checkpoints and resume: manifests, fallback past damage, no foreign deletions, config and folder guards.

One real single-process ZeRO-3 RM run (tiny Llama, 4 steps, a checkpoint every step) is copied into each
scenario; resumes run the real CLI, folder checks call the engine's functions directly.
"""
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from aplot_rlhf.engine import checkpoint as ckpt
from aplot_rlhf.errors import CheckpointError
from aplot_rlhf.metrics import MetricsLogger
from helpers import HH_PAIRS, PYTHON, REPO, python_env

STEPS = 4


def flags(model_dir, out, **extra):
    args = {"model_name_or_path": model_dir, "train_data": str(HH_PAIRS), "output_dir": str(out),
            "eval_split_fraction": 0.5, "max_train_pairs": 8, "max_eval_pairs": 4, "max_length": 64,
            "micro_batch_size": 2, "long_response": "skip", "learning_rate": 2e-3, "warmup_ratio": 0.0,
            "lr_scheduler": "constant", "max_steps": STEPS, "zero_stage": 3, "loss": "aplot", "save_steps": 1,
            "eval_batch_size": 4, **extra}
    out = []
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out + ["--no-progress", "--no-tensorboard"]


def train_rm(args, check=True):
    proc = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.train_rm", *args], env=python_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out):
    """{step: loss}, asserting that no step has two training rows."""
    steps = [r["step"] for r in rows(out) if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"duplicated training rows: {sorted(steps)}"
    return {r["step"]: r["train/loss"] for r in rows(out) if "train/loss" in r}


@pytest.fixture(scope="module")
def base_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_base") / "run"
    train_rm(flags(tiny_llama_dir, out))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_3", "step_4"]  # save_total_limit 2
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def biggest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*.pt")), key=lambda p: p.stat().st_size)


# --------------------------------------------------------------------------- 1. no pointer, no foreign deletion

@pytest.mark.slow
def test_resume_without_pointer_finds_the_newest_checkpoint_and_deletes_no_foreign_one(tiny_llama_dir, run_copy,
                                                                                        base_run):
    ckpts = run_copy / "checkpoints"
    (ckpts / "latest_checkpoint.json").unlink()
    foreign = ckpts / "step_1"  # another run's (or an older version's) folder: no manifest of this run
    foreign.mkdir()
    (foreign / "weights.pt").write_bytes(b"not ours")
    proc = train_rm(flags(tiny_llama_dir, run_copy, max_steps=6) + ["--resume"])  # constant LR: may run longer
    assert "resumed at optimizer step 4" in proc.stderr, proc.stderr[-3000:]
    assert foreign.exists() and (foreign / "weights.pt").read_bytes() == b"not ours"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_1", "step_5", "step_6"]
    losses = train_losses(run_copy)
    assert sorted(losses) == list(range(1, 7))
    assert all(losses[s] == train_losses(base_run)[s] for s in range(1, 5))


def test_pruning_keeps_checkpoints_of_other_runs(run_copy):
    ckpts = run_copy / "checkpoints"
    other = ckpts / "step_2"
    shutil.copytree(ckpts / "step_3", other)  # a complete checkpoint, but of another run
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "step": 2, "run_id": "another-run"}))
    ours = json.loads((ckpts / "step_4" / "manifest.json").read_text())["run_id"]
    saver = ckpt.Checkpointer(str(ckpts), {}, 1, keep=1)
    saver.run_id = ours
    saver._prune(current=5)
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_2"]  # its own 3 and 4 went, not 2


# --------------------------------------------------------------------------- 2. manifests and fallback

def test_every_checkpoint_has_a_manifest_of_its_files(base_run):
    step_dir = base_run / "checkpoints" / "step_4"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    on_disk = {str(p.relative_to(step_dir)): p.stat().st_size for p in step_dir.rglob("*") if p.is_file()}
    assert manifest["step"] == 4 and manifest["world_size"] == 1
    assert {k: v["size"] for k, v in manifest["files"].items()} == {k: v for k, v in on_disk.items()
                                                                   if k != "manifest.json"}
    for v in manifest["files"].values():  # small files hashed, multi-GB optimizer shards checked by size
        assert ("sha256" in v) == (v["size"] <= ckpt.HASH_LIMIT)
    assert manifest["config"]["micro_batch_size"] == 2


@pytest.mark.parametrize("damage", ["deleted_file", "truncated_file", "flipped_byte", "garbage_pointer",
                                    "partial_and_tmp"])
def test_damaged_newest_checkpoint_falls_back_with_a_named_warning(run_copy, damage, caplog):
    ckpts = run_copy / "checkpoints"
    victim = biggest_file(ckpts / "step_4")
    size = victim.stat().st_size
    if damage == "deleted_file":
        victim.unlink()
    elif damage == "truncated_file":
        victim.write_bytes(victim.read_bytes()[:size // 2])
    elif damage == "flipped_byte":  # same size, different content: the hash of a small file catches it
        victim = ckpts / "step_4" / "model" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "garbage_pointer":
        (ckpts / "latest_checkpoint.json").write_text('{"tag": "step_4", "st')
    else:  # what a kill during the save of step 5 leaves: a half-written folder and a temp pointer
        shutil.copytree(ckpts / "step_4", ckpts / "step_5.partial")
        (ckpts / "step_5.partial" / "manifest.json").unlink()
        (ckpts / "latest_checkpoint.json.tmp.12345").write_text('{"tag": "step_5"')
    with caplog.at_level(logging.WARNING):
        chosen = ckpt.newest_complete_checkpoint(str(ckpts))
    text = caplog.text
    if damage == "deleted_file":
        assert chosen["tag"] == "step_3"
        assert f"{victim}: missing (manifest lists {size} bytes)" in text and "falling back to step_3" in text
    elif damage == "truncated_file":
        assert chosen["tag"] == "step_3"
        assert f"{victim}: {size // 2} bytes, manifest says {size}" in text and "falling back to step_3" in text
    elif damage == "flipped_byte":
        assert chosen["tag"] == "step_3" and f"{victim}: sha256 " in text and "differs from the manifest" in text
    elif damage == "garbage_pointer":
        assert chosen["tag"] == "step_4"
        assert f"{ckpts / 'latest_checkpoint.json'}: unreadable" in text
    else:
        assert chosen["tag"] == "step_4" and "step_5" not in text


def test_no_usable_checkpoint_fails_with_every_path_and_reason(run_copy):
    ckpts = run_copy / "checkpoints"
    a, b = biggest_file(ckpts / "step_4"), biggest_file(ckpts / "step_3")
    a.unlink()
    b.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        ckpt.newest_complete_checkpoint(str(ckpts))
    assert f"{a}: missing" in str(err.value) and f"{b}: 0 bytes, manifest says" in str(err.value)
    (ckpts / "latest_checkpoint.json").write_text("[]")
    shutil.rmtree(ckpts / "step_3")
    shutil.rmtree(ckpts / "step_4")
    with pytest.raises(CheckpointError, match="latest_checkpoint.json: no checkpoint 'tag'"):
        ckpt.latest_checkpoint(str(ckpts))


@pytest.mark.slow
def test_resume_past_a_damaged_checkpoint_repeats_the_same_losses(tiny_llama_dir, run_copy, base_run):
    victim = biggest_file(run_copy / "checkpoints" / "step_4")
    victim.write_bytes(victim.read_bytes()[:100])
    proc = train_rm(flags(tiny_llama_dir, run_copy) + ["--resume"])
    assert f"{victim}: 100 bytes, manifest says" in proc.stderr and "falling back to step_3" in proc.stderr
    assert "resumed at optimizer step 3" in proc.stderr
    assert train_losses(run_copy) == train_losses(base_run)  # step 4 trained again, identically, logged once
    assert ckpt.verify_checkpoint(str(run_copy / "checkpoints" / "step_4"))["step"] == 4  # rewritten whole


# --------------------------------------------------------------------------- 3. changed config

@pytest.mark.slow
def test_resume_with_a_changed_run_is_refused_naming_each_key(tiny_llama_dir, run_copy):
    proc = train_rm(flags(tiny_llama_dir, run_copy, micro_batch_size=1, seed=7, eval_steps=2, max_steps=6,
                          lr_scheduler="cosine") + ["--resume"], check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "Traceback" not in err  # a user error: one message, exit status 2
    assert proc.returncode == 2 and "micro_batch_size: saved 2, now 1" in err and "seed: saved 42, now 7" in err
    assert "lr_scheduler: saved 'constant', now 'cosine'" in err
    assert "max_steps: saved 4, now 6" in err  # the cosine schedule depends on the run's length
    assert "eval_steps" not in err and "--resume_allow_config_change" in err
    assert json.loads((run_copy / "config.json").read_text())["micro_batch_size"] == 2  # left as it was


def test_resume_config_check_compares_and_can_be_overridden(run_copy, caplog):
    ckpts = str(run_copy / "checkpoints")
    saved = json.loads((run_copy / "checkpoints" / "step_4" / "manifest.json").read_text())["config"]
    harmless = ckpt.Checkpointer(ckpts, {**saved, "eval_steps": 3, "log_steps": 5, "resume": True}, 1)
    harmless.load({})
    assert harmless.run_id == json.loads((run_copy / "checkpoints" / "step_4" / "manifest.json").read_text())["run_id"]
    with pytest.raises(ckpt.ResumeConfigError, match=r"world_size: saved 1, now 2"):
        ckpt.Checkpointer(ckpts, saved, 2).load({})
    with pytest.raises(ckpt.ResumeConfigError, match=r"gradient_accumulation_steps: saved 1, now 2"):
        ckpt.Checkpointer(ckpts, {**saved, "gradient_accumulation_steps": 2}, 1).load({})
    with caplog.at_level(logging.WARNING):
        ckpt.Checkpointer(ckpts, {**saved, "learning_rate": 1.0}, 1, allow_config_change=True).load({})
    assert "learning_rate: saved 0.002, now 1.0" in caplog.text


# --------------------------------------------------------------------------- 4. fresh run into a used folder

@pytest.mark.slow
def test_fresh_run_into_a_used_folder_is_refused_then_moved_aside(tiny_llama_dir, run_copy, base_run):
    before = {p.name: p.stat().st_mtime_ns for p in (run_copy / "checkpoints").iterdir()}
    config_before = (run_copy / "config.json").read_text()
    proc = train_rm(flags(tiny_llama_dir, run_copy, seed=5), check=False)
    assert proc.returncode != 0
    assert "holds an earlier run" in proc.stderr and "--resume" in proc.stderr
    assert "--overwrite_output_dir" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run_copy / "checkpoints").iterdir()} == before
    assert (run_copy / "config.json").read_text() == config_before
    train_rm(flags(tiny_llama_dir, run_copy, seed=5) + ["--overwrite_output_dir"])
    (aside,) = run_copy.glob("previous_run.*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir() if p.is_dir()) == ["step_3", "step_4"]
    assert (aside / "model" / "config.json").exists() and (aside / "config.json").read_text() == config_before
    assert train_losses(aside) == train_losses(base_run)
    assert sorted(train_losses(run_copy)) == list(range(1, STEPS + 1))  # the new run's rows only
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 5


def test_output_dir_guard_without_and_with_an_earlier_run(tmp_path, run_copy):
    ckpt.prepare_output_dir(str(tmp_path / "new"), resume=False, overwrite=False)  # nothing there: fine
    ckpt.prepare_output_dir(str(run_copy), resume=True, overwrite=False)  # resuming it: fine
    with pytest.raises(ckpt.OutputDirError, match="holds an earlier run"):
        ckpt.prepare_output_dir(str(run_copy), resume=False, overwrite=False)
    with pytest.raises(ckpt.OutputDirError, match="contradict"):
        ckpt.prepare_output_dir(str(run_copy), resume=True, overwrite=True)


# --------------------------------------------------------------------------- 5. metrics after resume

def test_resume_drops_metric_rows_logged_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), True, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)}, prefix="train/")
    log.log(3, {"accuracy": 0.5}, prefix="eval/x/")
    log.log(4, {"loss": 4.0}, prefix="train/")  # logged after the checkpoint at 3, then killed
    log.log(4, {"accuracy": 0.6}, prefix="eval/x/")
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write("not json, but not ours to drop\n" + '{"step": 5, "train/lo')  # the last row cut by the kill
    log.close()
    resumed = MetricsLogger(str(tmp_path), True, tensorboard=False, resume=True)
    resumed.resume_at(3)
    resumed.log(3, {"accuracy": 0.5}, prefix="eval/x/")  # resumed at its last step: the final eval again
    resumed.log(4, {"loss": 4.5}, prefix="train/")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[3] == "not json, but not ours to drop"
    assert [json.loads(line) for line in lines[:3] + lines[4:]] == [
        {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0}, {"step": 3, "train/loss": 3.0},
        {"step": 3, "eval/x/accuracy": 0.5}, {"step": 4, "train/loss": 4.5}]
    assert not list(tmp_path.glob("*.tmp.*"))
