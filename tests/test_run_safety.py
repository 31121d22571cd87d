"""Runs that are never lost and inputs never accepted silently (issue 23): the slurm requeue once warned, a stop
asked for during set-up, one run per output folder, storage every rank shares, a full or read-only disk,
resumes that cannot work, and model paths checked before DeepSpeed starts.

The disk and per-node cases mount their own file systems (tmpfs, bind mounts) inside a private mount
namespace (`unshare -m`, root); where that is not allowed they skip and say so."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aplot_rlhf.engine import checkpoint as ckpt
from aplot_rlhf.engine import preemption
from helpers import PYTHON, REPO, free_port, python_env


def pairs_file(path: Path, n: int = 16) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"a kind answer {i}",
                                        "rejected": f"no {i}"}) + "\n" for i in range(n)))
    return path


def rm_flags(model_dir, data, out, **extra) -> list[str]:
    args = {"model_name_or_path": model_dir, "train_data": str(data), "output_dir": str(out), "max_length": 64,
            "micro_batch_size": 2, "eval_split_fraction": 0.0, "zero_stage": 0, "loss": "bt", "max_steps": 2,
            "learning_rate": 1e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant", "export": "false", **extra}
    flags = []
    for k, v in args.items():
        flags += [f"--no-{k}"] if v == "false" else [f"--{k}", str(v)]
    return flags + ["--no-progress", "--no-tensorboard"]


def train_rm(flags, timeout=600, prefix=()):
    return subprocess.run([*prefix, PYTHON, "-m", "aplot_rlhf.cli.train_rm", *flags], env=python_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
    """The CLI's user error: exit 2, the last stderr line 'error: ...', no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


def can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root and mount namespaces (unshare -m) to "
                                 "build a small or read-only file system")


# ------------------------------------------------------------------ 1: requeue once warned

def run_wrapper(tmp_path, step_code: str, signals: list[tuple[float, int]]):
    """launchers/_slurm.sh's run_requeueable around a real job step (a Python process), with `scontrol` a
    stand-in that records its arguments. signals: (seconds after start, signal) sent to the batch shell."""
    out, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.args\n")
    (bin_dir / "scontrol").chmod(0o755)
    script = f"source launchers/_slurm.sh; run_requeueable {out} {PYTHON} -c \"$STEP\" {out}"
    env = python_env() | {"PATH": f"{bin_dir}:" + python_env()["PATH"], "SLURM_JOB_ID": "4242", "STEP": step_code}
    proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=REPO)
    start = time.time()
    while not out.exists():
        assert time.time() - start < 60
        time.sleep(0.05)
    for at, sig in signals:
        time.sleep(max(0.0, at - (time.time() - start)))
        proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    calls = (tmp_path / "scontrol.args").read_text().splitlines() if (tmp_path / "scontrol.args").exists() else []
    return rc, calls


SLOW_SAVE = ("import os, sys, time\nout = sys.argv[1]\nwhile not os.path.exists(out + '/PREEMPT'): time.sleep(0.05)\n"
             "time.sleep(4)\n")  # a 70B save: still writing when slurm's SIGTERM comes (at 1.5 s)
FAILED_SAVE = ("import os, sys, time\nout = sys.argv[1]\nwhile not os.path.exists(out + '/PREEMPT'): time.sleep(0.05)\n"
               "sys.exit(1)\n")  # the save failed (a rank died): no PREEMPTED marker
CRASH = "import sys, time\ntime.sleep(0.5)\nsys.exit(1)\n"


def test_slurm_requeues_once_warned_even_if_the_save_never_finishes(tmp_path):
    rc, calls = run_wrapper(tmp_path / "a", SLOW_SAVE, [(0.5, signal.SIGUSR1), (1.5, signal.SIGTERM)])
    assert calls == ["requeue 4242"] and rc == 0, (rc, calls)
    rc, calls = run_wrapper(tmp_path / "b", FAILED_SAVE, [(0.5, signal.SIGUSR1)])
    assert calls == ["requeue 4242"] and rc == 0, (rc, calls)
    # without slurm's warning a failure is a failure (and a cancelled job stays cancelled)
    rc, calls = run_wrapper(tmp_path / "c", CRASH, [])
    assert calls == [] and rc == 1, (rc, calls)


def test_the_plan_sizes_a_checkpoint_and_the_warning_lead():
    from aplot_rlhf.plan import PlanInput, estimate, resolve_model
    big = estimate(PlanInput(model=resolve_model("llama3-70b"), job="rm", nodes=4, gpus_per_node=8, zero=3))
    ck = big.checkpoint
    params = resolve_model("llama3-70b").num_params("scalar")
    assert ck["total_bytes"] == pytest.approx(params * (2 + 12))  # bf16 weights + fp32 master, m, v
    assert ck["busiest_rank_bytes"] == pytest.approx(ck["total_bytes"] / 32)
    assert ck["busiest_node_bytes"] == pytest.approx(ck["total_bytes"] / 4)
    assert ck["preempt_lead_s"] >= ck["write_s"] + 120 > 300  # ~1 TB at 1 GB/s per node: 180 s is too short
    zero2 = estimate(PlanInput(model=resolve_model("llama3-8b"), job="rm", nodes=1, gpus_per_node=8, zero=2))
    n8 = resolve_model("llama3-8b").num_params("scalar")
    assert zero2.checkpoint["busiest_rank_bytes"] == pytest.approx(n8 * 2 + n8 * 12 / 8)  # rank 0 holds the weights
    out = subprocess.run([PYTHON, "-m", "aplot_rlhf.cli.plan", "--model", "llama3-70b", "--nodes", "4",
                          "--ckpt-write-gbps", "2"], env=python_env(), cwd=REPO, capture_output=True, text=True)
    assert "checkpoint: " in out.stdout and "at 2 GB/s per node" in out.stdout and "--signal=B:USR1@" in out.stdout


# ------------------------------------------------------------------ 2: a stop asked for during set-up

def test_a_stop_requested_during_set_up_is_honoured(char_llama_dir, tmp_path):
    """The PREEMPT file appears while the trainer sets up (a patched set-up step creates it, as the slurm trap
    would while a big model loads): the run must exit 75 before its first step, not delete the request, and not
    spend the grace period on the step-0 evaluation it was asked for."""
    out = tmp_path / "run"
    flags = rm_flags(char_llama_dir, pairs_file(tmp_path / "pairs.jsonl"), out, eval_split_fraction=0.25)
    flags.append("--eval_at_start")
    code = ("import sys, pathlib\n"
            "from aplot_rlhf.trainers.rm import RewardModelTrainer\n"
            "from aplot_rlhf.errors import run_cli\n"
            "from aplot_rlhf.cli import train_rm\n"
            "original = RewardModelTrainer._setup_engine\n"
            "def setup_engine(self):\n"
            "    pathlib.Path(self.cfg.output_dir, 'PREEMPT').write_text('')\n"
            "    original(self)\n"
            "RewardModelTrainer._setup_engine = setup_engine\n"
            "run_cli(train_rm.main, sys.argv[1:])\n")
    proc = subprocess.run([PYTHON, "-c", code, *flags], env=python_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == preemption.PREEMPT_EXIT_CODE, proc.stderr[-3000:]
    assert json.loads((out / preemption.PREEMPTED_FILE).read_text())["step"] == 0
    assert "stop was requested during set-up" in proc.stderr
    assert "step 0 eval" not in proc.stderr


def test_eval_at_start_evaluates_before_the_first_step_when_no_stop_is_asked(char_llama_dir, tmp_path):
    """The other side of the test above: without a stop request --eval_at_start logs the step-0 evaluation (the
    quality study's convergence curves start from it) and the run trains to the end."""
    out = tmp_path / "run"
    flags = rm_flags(char_llama_dir, pairs_file(tmp_path / "pairs.jsonl"), out, eval_split_fraction=0.25)
    proc = train_rm([*flags, "--eval_at_start"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 0 eval" in proc.stderr
    assert not (out / preemption.PREEMPTED_FILE).exists()


def test_stop_files_an_earlier_process_left_are_cleared_and_new_ones_kept(tmp_path):
    stop, marker = tmp_path / preemption.STOP_FILE, tmp_path / preemption.PREEMPTED_FILE
    stop.write_text("")
    marker.write_text("{}")
    started = time.time()
    for f in (stop, marker):
        os.utime(f, (started - 60, started - 60))  # left by the job before the requeue
    preemption.clear_stale_requests(str(tmp_path), started)
    assert not stop.exists() and not marker.exists()
    stop.write_text("")  # made while this process starts up: a request to honour
    preemption.clear_stale_requests(str(tmp_path), started - 1)
    assert stop.exists()


# ------------------------------------------------------------------ 4: one run per folder

def test_a_second_run_into_the_same_folder_is_refused_and_a_crash_leaves_no_lock(char_llama_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import sys, time\nfrom aplot_rlhf.engine.checkpoint import OutputLock\n"
            "lock = OutputLock(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([PYTHON, "-c", hold, str(out)], env=python_env(), cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = train_rm(rm_flags(char_llama_dir, pairs_file(tmp_path / "pairs.jsonl"), out))
        line = one_error_line(proc)
        assert f"--output_dir {out} is in use by another run (host " in line and f"pid {holder.pid}," in line
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    lock = ckpt.OutputLock(str(out))  # the kernel dropped the dead holder's lock
    lock.release()


# ------------------------------------------------------------------ 5: disk full, read-only

@needs_mount
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial(char_llama_dir, tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    probe = tmp_path / "probe"  # one checkpoint's size, measured on a normal disk
    assert train_rm(rm_flags(char_llama_dir, data, probe, max_steps=1)).returncode == 0
    size = sum(f.stat().st_size for f in (probe / "checkpoints" / "step_1").rglob("*") if f.is_file())
    out = tmp_path / "full"
    out.mkdir()
    # room for the run's small files and one checkpoint, not two (save_total_limit 0 keeps every one)
    flags = rm_flags(char_llama_dir, data, out, max_steps=3, save_steps=1, save_total_limit=0)
    check = ("import json, os, sys\nfrom aplot_rlhf.engine.checkpoint import newest_complete_checkpoint\n"
             "root = os.path.join(sys.argv[1], 'checkpoints')\n"
             "newest = newest_complete_checkpoint(root)['tag']\n"
             "print(json.dumps({'dirs': sorted(os.listdir(root)), 'newest': newest}))\n")
    script = (f"mount -t tmpfs -o size={int(size * 1.6) // 1024}k tmpfs {out} && "
              f"{PYTHON} -m aplot_rlhf.cli.train_rm \"$@\"; echo \"rc=$?\"; {PYTHON} -c \"$CHECK\" {out}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *flags], env=python_env() | {"CHECK": check},
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "rc=2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"no space left on {out}/checkpoints (" in errors[0], proc.stderr[-4000:]
    assert "checkpoint step_2 not written (its partial folder removed)" in errors[0]
    assert f"{out}/checkpoints/step_1 is still the newest checkpoint" in errors[0]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state == {"dirs": ["latest_checkpoint.json", "step_1"], "newest": "step_1"}, state


@needs_mount
def test_a_read_only_output_dir_fails_before_the_model_loads(char_llama_dir, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    flags = rm_flags(char_llama_dir, pairs_file(tmp_path / "pairs.jsonl"), out)
    script = f"mount -t tmpfs -o ro tmpfs {out} && exec {PYTHON} -m aplot_rlhf.cli.train_rm \"$@\""
    start = time.time()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *flags], env=python_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert one_error_line(proc) == f"error: --output_dir {out} is on a read-only file system"
    assert "LlamaForSequenceClassification" not in proc.stderr and time.time() - start < 120


# ------------------------------------------------------------------ 3: storage every rank shares

RANK_SCRIPT = """
import json, os, sys
import torch
from aplot_rlhf.config import RMConfig
from aplot_rlhf.errors import UserError
from aplot_rlhf.trainers.run import Run
from aplot_rlhf.engine import deepspeed as ds_api
out, storage = sys.argv[1], sys.argv[2]
cfg = RMConfig(model_name_or_path="m", train_data="t.jsonl", output_dir=out, checkpoint_storage=storage,
               zero_stage=0, micro_batch_size=1, timeout_s=120, progress=False, tensorboard=False)
try:
    run = Run(cfg, "rm")
except UserError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(2)
model = torch.nn.Linear(4, 2)
engine, _ = ds_api.initialize(model, ds_api.build_ds_config(cfg, run.world), cfg, total_steps=4)
run.resume({"model": engine})
run.checkpoints.save({"model": engine}, 1, {"step": 1})
print(json.dumps({"saved": sorted(os.listdir(os.path.join(out, "checkpoints")))}), flush=True)
run.close()
"""


def two_ranks(tmp_path, storage: str):
    """Two ranks (gloo) whose --output_dir is the same path but, for rank 1, another folder: a bind mount in
    its own mount namespace, as a second node with a local disk at that path would see it."""
    out, node1 = tmp_path / "out", tmp_path / "node1_disk"
    out.mkdir()
    node1.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = python_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port),  # LOCAL_RANK 0 on both: two one-GPU "nodes"
                              "APLOT_STORAGE_PROBE_WAIT_S": "3"}  # a local bind mount has no attribute cache
        cmd = [PYTHON, str(script), str(out), storage]
        if rank == 1:
            cmd = ["unshare", "-m", "sh", "-c", f"mount --bind {node1} {out} && exec \"$@\"", "sh", *cmd]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        assert lines, stderr[-3000:]
        results.append((p.returncode, json.loads(lines[-1]), stderr[-3000:]))  # stderr: why a rank failed
    return out, node1, results


@needs_mount
def test_storage_the_ranks_do_not_share_is_refused_at_start_up(tmp_path):
    out, _, results = two_ranks(tmp_path, "shared")
    for rc, result, _ in results:
        assert rc == 2 and "error" in result, results
        assert f"--output_dir {out} is not one folder for every rank: rank(s) 1 cannot read" in result["error"]
        assert "--checkpoint_storage per_node" in result["error"]


@needs_mount
def test_per_node_storage_publishes_on_every_node(tmp_path):
    out, node1, results = two_ranks(tmp_path, "per_node")
    assert [rc for rc, _, _ in results] == [0, 0], results
    for folder in (out, node1):  # each node's first rank published its own step_1: no .partial left
        names = sorted(os.listdir(folder / "checkpoints"))
        assert names == ["latest_checkpoint.json", "step_1"], (folder, names)
        manifest = json.loads((folder / "checkpoints" / "step_1" / "manifest.json").read_text())
        assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(manifest["files"])  # both nodes' files, for the copy


# ------------------------------------------------------------------ 8: resumes and paths that cannot work

def test_a_lora_rank_change_cannot_be_overridden_on_resume(tmp_path):
    step = tmp_path / "checkpoints" / "step_2"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"version": 1, "step": 2, "run_id": "r", "world_size": 1,
                                                    "config": {"lora_rank": 8, "learning_rate": 1e-5},
                                                    "files": {}}))
    cp = ckpt.Checkpointer(str(tmp_path / "checkpoints"), {"lora_rank": 16, "learning_rate": 2e-5}, 1,
                           allow_config_change=True)
    with pytest.raises(ckpt.ResumeConfigError, match=r"lora_rank: saved 8, now 16: this cannot be overridden"):
        cp.load({})
    allowed = ckpt.Checkpointer(str(tmp_path / "checkpoints"), {"lora_rank": 8, "learning_rate": 2e-5}, 1,
                                allow_config_change=True)
    assert allowed.load({}) is None  # the learning rate may change with the flag (no engine to restore here)


def test_dry_run_refuses_a_model_folder_without_its_tokenizer(tiny_llama_dir, tmp_path):
    model = tmp_path / "no_tok"
    model.mkdir()
    for f in Path(tiny_llama_dir).iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    proc = train_rm(rm_flags(str(model), pairs_file(tmp_path / "pairs.jsonl"), tmp_path / "run") + ["--dry_run"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(  # the dry run's own verdict line
        f"dry run failed: --model_name_or_path {model}: no tokenizer files in this folder"), proc.stderr[-3000:]


def test_model_paths_fail_with_one_line_before_deepspeed_starts(tiny_llama_dir, tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:4096])
    bad_yaml = tmp_path / "recipe.yaml"
    bad_yaml.write_text("learning_rate: 1e-5\nloss: [bt\n  micro_batch_size: 2\n")
    ppo = ["--prompt_data", str(prompts), "--output_dir", str(tmp_path / "ppo")]
    cases = [
        (["aplot_rlhf.cli.train_rm", *rm_flags("/models/missing-8b", data, tmp_path / "a")],
         "error: --model_name_or_path /models/missing-8b: no such folder"),
        (["aplot_rlhf.cli.train_rm", *rm_flags(str(cut), data, tmp_path / "b")],
         f"error: --model_name_or_path {cut}/model.safetensors: "),
        (["aplot_rlhf.cli.train_rm", *rm_flags(tiny_llama_dir, data, tmp_path / "c"), "--gguf_file", "/x/m.gguf"],
         f"error: --model_name_or_path {tiny_llama_dir}: GGUF file /x/m.gguf does not exist"),
        (["aplot_rlhf.cli.train_rm", *rm_flags(tiny_llama_dir, data, tmp_path / "d"), "--config", str(bad_yaml)],
         f"error: {bad_yaml}:3: not valid YAML"),
        (["aplot_rlhf.cli.train_ppo", "--actor_model", "/models/sft", "--reward_model", tiny_llama_dir, *ppo],
         "error: --actor_model /models/sft: no such folder"),
        (["aplot_rlhf.cli.train_ppo", "--actor_model", tiny_llama_dir, "--reference_model", "./ref-missing",
          "--reward_model", tiny_llama_dir, *ppo], "error: --reference_model ./ref-missing: no such folder"),
        (["aplot_rlhf.cli.train_ppo", "--actor_model", tiny_llama_dir, "--reward_model", str(tmp_path / "rm"), *ppo],
         f"error: --reward_model {tmp_path / 'rm'}: no such folder"),
    ]
    for cmd, expected in cases:
        proc = subprocess.run([PYTHON, "-m", *cmd], env=python_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        line = one_error_line(proc)
        assert line.startswith(expected), (cmd[0], line)
        assert "ds_accelerator" not in proc.stderr, proc.stderr[-2000:]  # DeepSpeed was not even imported
    assert "truncated" in subprocess.run(
        [PYTHON, "-m", "aplot_rlhf.cli.eval_rm", "--model", str(cut), "--data", str(data)], env=python_env(),
        cwd=REPO, capture_output=True, text=True, timeout=300).stderr

