"""Every shipped DeepSpeed JSON parses with DeepSpeed's own parser; every launcher's flags are accepted by
the CLI it calls (its DRY_RUN mode runs the CLI's parsing and validation) and its plan fits the hardware
the launcher states."""
import copy
import json
import subprocess

import pytest

from conftest import PYTHON, REPO, python_env

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
LAUNCHERS = sorted(p for p in (REPO / "launchers").iterdir() if p.suffix in (".sh", ".sbatch") and not p.name.startswith("_"))


def test_there_is_something_to_check():
    assert len(DS_CONFIGS) >= 5 and len(LAUNCHERS) >= 7


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_parses_with_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from aplot_rlhf import engine as eng
    from aplot_rlhf.config import RMConfig
    cfg = RMConfig(model_name_or_path="x", train_data=["x"], ds_config=str(path), micro_batch_size=2,
                   gradient_accumulation_steps=4)
    ds = eng.build_ds_config(cfg, world_size=8, precision="bf16")
    assert "auto" not in json.dumps(ds), "every 'auto' must be filled from the flags"
    eng.check_ds_config(ds, 8)
    assert ds["train_batch_size"] == 2 * 4 * 8
    probe = copy.deepcopy(ds)
    probe.pop("train_batch_size")  # the parser runs with world size 1 here
    parsed = DeepSpeedConfig(probe)
    assert parsed.zero_optimization_stage == json.loads(path.read_text())["zero_optimization"]["stage"]


def test_inconsistent_batch_sizes_are_a_clear_error(tmp_path):
    from aplot_rlhf import engine as eng
    bad = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 10}
    with pytest.raises(ValueError, match="train_batch_size 10 != micro batch 2 x grad accum 4 x world size 8"):
        eng.check_ds_config(bad, 8)
    path = tmp_path / "broken.json"
    path.write_text('{"zero_optimization": {"stage": 3},}')
    from aplot_rlhf.config import RMConfig
    with pytest.raises(ValueError, match="broken.json:1: malformed JSON"):
        eng.build_ds_config(RMConfig(model_name_or_path="x", train_data=["x"], ds_config=str(path)), 1)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_dry_run_accepts_flags_and_fits(path):
    env = python_env() | {"DRY_RUN": "1", "PYTHON": PYTHON}
    proc = subprocess.run(["bash", str(path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == {"dry_run": "ok", "fits": True}
    text = path.read_text()
    assert "GPUs x 80 GB" in text and "host RAM" in text  # each launcher states the hardware it assumes


def test_dry_run_rejects_a_plan_that_does_not_fit():
    env = python_env() | {"APLOT_PLAN_NODES": "1", "APLOT_PLAN_GPUS_PER_NODE": "8", "APLOT_PLAN_GPU_MEM_GIB": "80"}
    cmd = [PYTHON, "-m", "aplot_rlhf.cli.train_rm", "--model_name_or_path", str(REPO / "ds_configs/model_shapes/llama3-70b"),
           "--train_data", str(REPO / "aplot_rlhf/demo_data/hh-rlhf/harmless-base-test.pairs.jsonl"),
           "--zero_stage", "3", "--micro_batch_size", "8", "--max_length", "4096", "--dry_run"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout and "smallest change that fits" in proc.stdout


def test_dry_run_names_a_missing_data_file():
    cmd = [PYTHON, "-m", "aplot_rlhf.cli.train_rm", "--model_name_or_path", str(REPO / "ds_configs/model_shapes/llama3-8b"),
           "--train_data", "/nonexistent/pairs.jsonl", "--dry_run"]
    proc = subprocess.run(cmd, env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train_data: /nonexistent/pairs.jsonl does not exist" in proc.stderr
