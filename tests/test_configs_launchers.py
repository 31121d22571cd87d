"""Every shipped DeepSpeed JSON parses with DeepSpeed's own parser; every launcher's flags and recipe are
accepted by the CLI it calls (its DRY_RUN mode runs the CLI's parsing, validation and dry run) and its plan
fits the hardware the launcher states; wrong configs fail the dry run with one clear line."""
import copy
import json
import re
import subprocess

import pytest
import yaml

from helpers import PYTHON, REPO, python_env

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
LAUNCHERS = sorted(p for p in (REPO / "launchers").iterdir()
                   if p.suffix in (".sh", ".sbatch") and not p.name.startswith("_"))
SHAPES = REPO / "ds_configs" / "model_shapes"
DEMO_PAIRS = REPO / "aplot_rlhf" / "demo_data" / "hh-rlhf" / "harmless-base-test.pairs.jsonl"


def test_there_is_something_to_check():
    names = {p.name for p in DS_CONFIGS}
    assert {"rm_zero3_bf16.json", "rm_zero3_offload_bf16.json", "rm_zero2_bf16.json", "ppo_actor_zero3_bf16.json",
            "ppo_critic_zero3_bf16.json", "ppo_ref_zero3_bf16.json"} <= names
    assert {"rm_7b_single_node.sh", "rm_13b_single_node.sh", "rm_70b_multinode_hostfile.sh",
            "rm_70b_slurm.sbatch"} <= {p.name for p in LAUNCHERS}
    assert (REPO / "launchers" / "hostfile.example").exists()


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_parses_with_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    from aplot_rlhf.config import RMConfig
    from aplot_rlhf.engine import deepspeed as ds_api
    cfg = RMConfig(model_name_or_path="x", train_data=["x"], ds_config=str(path), micro_batch_size=2,
                   gradient_accumulation_steps=4, max_grad_norm=0.5, learning_rate=3e-6)
    ds = ds_api.build_ds_config(cfg, world_size=8, precision="bf16")
    assert "auto" not in json.dumps(ds), "every 'auto' must be filled from the flags"
    ds_api.check_ds_config(ds, 8)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (2, 4, 64)
    raw = json.loads(path.read_text())
    if "optimizer" in raw:
        assert ds["optimizer"]["params"]["lr"] == 3e-6 and ds["gradient_clipping"] == 0.5
    probe = copy.deepcopy(ds)
    probe["train_batch_size"] //= 8  # without a process group the parser takes world size 1
    parsed = DeepSpeedConfig(probe)
    assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert parsed.bfloat16_config.enabled and parsed.train_batch_size == 8


def test_reference_template_is_frozen():
    raw = json.loads((REPO / "ds_configs" / "ppo_ref_zero3_bf16.json").read_text())
    assert "optimizer" not in raw and "offload_optimizer" not in raw["zero_optimization"]


def test_inconsistent_batch_sizes_are_a_clear_error(tmp_path):
    from aplot_rlhf.config import RMConfig
    from aplot_rlhf.engine import deepspeed as ds_api
    bad = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 10}
    with pytest.raises(ValueError, match="train_batch_size 10 != micro batch 2 x grad accum 4 x world size 8"):
        ds_api.check_ds_config(bad, 8)
    path = tmp_path / "broken.json"
    path.write_text('{"zero_optimization": {"stage": 3},}')
    with pytest.raises(ValueError, match="broken.json:1: malformed JSON"):
        ds_api.build_ds_config(RMConfig(model_name_or_path="x", train_data=["x"], ds_config=str(path)), 1)


def dry_run(argv, monkeypatch, capsys, **env):
    """train_rm --dry_run in this process (it starts no process group): (exit code, stdout, stderr)."""
    from aplot_rlhf.cli import train_rm
    for key in ("APLOT_PLAN_NODES", "APLOT_PLAN_GPUS_PER_NODE", "APLOT_PLAN_GPU_MEM_GIB", "APLOT_PLAN_CPU_MEM_GIB",
                "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    try:
        train_rm.main([*argv, "--dry_run"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def rm_flags(model="llama3-8b", *extra):
    return ["--model_name_or_path", str(SHAPES / model), "--train_data", str(DEMO_PAIRS), *extra]


def test_dry_run_with_a_batch_size_mismatch_in_the_json(tmp_path, monkeypatch, capsys):
    raw = json.loads((REPO / "ds_configs" / "rm_zero3_bf16.json").read_text())
    raw["train_batch_size"] = 64  # a user hard-coded it for 8 GPUs, then launched on 2 x 8
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    code, _, err = dry_run(rm_flags("llama3-8b", "--ds_config", str(path), "--micro_batch_size", "4",
                                    "--gradient_accumulation_steps", "2"), monkeypatch, capsys,
                           APLOT_PLAN_NODES=2, APLOT_PLAN_GPUS_PER_NODE=8)
    assert code == 2
    assert "dry run failed: ds_config: train_batch_size 64 != micro batch 4 x grad accum 2 x world size 16" in err


def test_dry_run_passes_the_json_through_deepspeeds_parser(tmp_path, monkeypatch, capsys):
    raw = json.loads((REPO / "ds_configs" / "rm_zero3_bf16.json").read_text())
    raw["zero_optimization"]["stage3_prefetch_bucket_sise"] = 1e8  # a typo only DeepSpeed's parser knows
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(raw))
    code, _, err = dry_run(rm_flags("llama3-8b", "--ds_config", str(path)), monkeypatch, capsys)
    assert code == 2
    assert f"DeepSpeed rejects the config ({path})" in err and "stage3_prefetch_bucket_sise" in err


def test_dry_run_flags_must_agree_with_the_json(monkeypatch, capsys):
    code, _, err = dry_run(rm_flags("llama3-8b", "--ds_config", str(REPO / "ds_configs/rm_zero3_offload_bf16.json"),
                                    "--zero_stage", "3"), monkeypatch, capsys)
    assert code == 2
    assert "--offload_optimizer False but" in err and "zero_optimization.offload_param = True" in err


def test_dry_run_plans_the_requested_precision_not_the_cpu_fallback(monkeypatch, capsys):
    code, out, _ = dry_run(rm_flags("llama3-8b", "--precision", "bf16", "--micro_batch_size", "1",
                                    "--max_length", "512"), monkeypatch, capsys, APLOT_PLAN_GPUS_PER_NODE=8)
    assert code == 0
    assert re.search(r"^RM llama3-8b, 1x8 GPUs x 80 GiB, ZeRO-3, bf16,", out, re.M), out[-2000:]
    assert '"bf16": {\n  "enabled": true' in out
    assert json.loads(out.strip().splitlines()[-1]) == {"dry_run": "ok", "fits": True}


def test_dry_run_world_size_falls_back_to_WORLD_SIZE(monkeypatch, capsys):
    code, out, _ = dry_run(rm_flags("llama3-8b", "--micro_batch_size", "1", "--max_length", "512"), monkeypatch, capsys,
                           WORLD_SIZE=4)
    assert code == 0 and "1x4 GPUs" in out and '"train_batch_size": 4' in out


def test_dry_run_rejects_a_plan_that_does_not_fit(monkeypatch, capsys):
    code, out, _ = dry_run(rm_flags("llama3-70b", "--zero_stage", "3", "--micro_batch_size", "8",
                                    "--max_length", "4096"),
                           monkeypatch, capsys, APLOT_PLAN_NODES=1, APLOT_PLAN_GPUS_PER_NODE=8,
                           APLOT_PLAN_GPU_MEM_GIB=80)
    assert code == 1
    assert "DOES NOT FIT" in out and "smallest change that fits" in out
    assert json.loads(out.strip().splitlines()[-1]) == {"dry_run": "ok", "fits": False}


def test_dry_run_checks_host_ram_when_given(monkeypatch, capsys):
    flags = rm_flags("llama3-70b", "--ds_config", str(REPO / "ds_configs/rm_zero3_offload_bf16.json"),
                     "--offload_optimizer", "--offload_param", "--micro_batch_size", "1", "--gradient_checkpointing")
    code, out, _ = dry_run(flags, monkeypatch, capsys, APLOT_PLAN_NODES=4, APLOT_PLAN_GPUS_PER_NODE=8,
                           APLOT_PLAN_CPU_MEM_GIB=64)
    assert code == 1 and "of 64 GiB" in out


def test_dry_run_names_a_missing_data_file(monkeypatch, capsys):
    code, _, err = dry_run(["--model_name_or_path", str(SHAPES / "llama3-8b"),
                            "--train_data", "/nonexistent/pairs.jsonl"], monkeypatch, capsys)
    assert code == 2 and "dry run failed: data file not found: /nonexistent/pairs.jsonl" in err


def test_dry_run_needs_only_a_config_json(tmp_path, monkeypatch, capsys):
    code, _, err = dry_run(["--model_name_or_path", str(tmp_path), "--train_data", str(DEMO_PAIRS)],
                           monkeypatch, capsys)
    assert code == 2 and "no config.json" in err


@pytest.mark.slow
@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_dry_run_accepts_flags_and_fits(path):
    env = python_env() | {"DRY_RUN": "1", "PYTHON": PYTHON}
    proc = subprocess.run(["bash", str(path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"dry_run": "ok", "fits": True}
    text = path.read_text()
    # each launcher states the hardware it assumes, and plans exactly that hardware (host RAM included)
    hw = dict(re.findall(r"(APLOT_PLAN_\w+)=\$?\{?(?:SLURM_NNODES:-)?(\d+)", text))
    assert set(hw) == {"APLOT_PLAN_NODES", "APLOT_PLAN_GPUS_PER_NODE", "APLOT_PLAN_GPU_MEM_GIB",
                       "APLOT_PLAN_CPU_MEM_GIB"}
    assert f"{hw['APLOT_PLAN_GPUS_PER_NODE']} GPUs x {hw['APLOT_PLAN_GPU_MEM_GIB']} GB" in text
    assert f">= {hw['APLOT_PLAN_CPU_MEM_GIB']} GiB host RAM" in text
    gpus = f"{hw['APLOT_PLAN_NODES']}x{hw['APLOT_PLAN_GPUS_PER_NODE']} GPUs x {hw['APLOT_PLAN_GPU_MEM_GIB']} GiB"
    assert gpus in proc.stdout
    assert f"of {hw['APLOT_PLAN_CPU_MEM_GIB']} GiB" in proc.stdout  # host RAM was checked, not just reported
    launch = next(line for line in proc.stderr.splitlines() if line.startswith("DRY_RUN=1: would run: "))
    if path.suffix == ".sbatch":
        assert "srun torchrun" in launch and "-m aplot_rlhf.cli." in launch
    else:
        assert launch.startswith("DRY_RUN=1: would run: deepspeed ") and "--module aplot_rlhf.cli." in launch
        assert ("--hostfile" in launch) == ("hostfile" in path.name)
    # the launcher's recipe reached the trainer: the dry run's resolved config holds every value of it
    recipe = re.search(r" --config (recipes/\S+\.yaml)", launch)
    assert recipe, launch
    resolved = json.loads(proc.stdout.split("resolved config:\n", 1)[1].split("\ndata (as training reads it):", 1)[0])
    raw = yaml.safe_load((REPO / recipe.group(1)).read_text())
    assert {k: resolved[k] for k in raw} == raw


def test_ppo_role_config_must_match_the_actors_stage(tmp_path, monkeypatch, capsys):
    from aplot_rlhf.cli import train_ppo
    raw = json.loads((REPO / "ds_configs" / "ppo_critic_zero3_bf16.json").read_text())
    raw["zero_optimization"]["stage"] = 2
    path = tmp_path / "critic_z2.json"
    path.write_text(json.dumps(raw))
    monkeypatch.setenv("APLOT_PLAN_GPUS_PER_NODE", "8")
    flags = ["--actor_model", str(SHAPES / "llama3-8b"), "--reward_model", str(SHAPES / "llama3-8b"),
             "--prompt_data", str(DEMO_PAIRS), "--ds_config", str(REPO / "ds_configs/ppo_actor_zero3_bf16.json"),
             "--zero_stage", "3", "--precision", "bf16", "--critic_ds_config", str(path), "--dry_run"]
    with pytest.raises(SystemExit) as exc:
        train_ppo.main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}: the critic config has ZeRO stage 2 / bf16, the actor's has ZeRO stage 3 / bf16" in err


def test_slurm_requeue_wrapper_turns_the_warning_signal_into_a_checkpoint_request(tmp_path):
    """launchers/_slurm.sh on this machine: slurm itself cannot run here, so `scontrol` is a stand-in
    script that records its arguments; the job step is a real process that waits for the PREEMPT file
    (as the trainer ranks do), writes PREEMPTED and exits 75. Covers the trap, the wait loop and the
    requeue decision, not slurm's delivery of --signal."""
    import signal
    import time
    out, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
    (bin_dir / "scontrol").chmod(0o755)
    step = ("import os, sys, time\nout = sys.argv[1]\nwhile not os.path.exists(out + '/PREEMPT'): time.sleep(0.05)\n"
            "open(out + '/PREEMPTED', 'w').write('{\"step\": 3}')\nsys.exit(75)\n")
    script = f"source launchers/_slurm.sh; run_requeueable {out} {PYTHON} -c \"$STEP\" {out}"
    env = python_env() | {"PATH": f"{bin_dir}:" + python_env()["PATH"], "SLURM_JOB_ID": "4242", "STEP": step}
    proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=REPO)
    deadline = time.time() + 60
    while not out.exists():
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` delivers to the batch shell
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
