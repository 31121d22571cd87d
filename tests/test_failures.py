"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-training makes the surviving rank exit non-zero within
the collective timeout, with its own message naming its rank and the phase it was in.

The two ranks are plain `python -m` processes with RANK/WORLD_SIZE/MASTER_ADDR set, not torchrun: torchrun
tears the whole group down when one worker dies, which would hide whether rank 0 fails by itself.
"""
import re
import signal
import subprocess
import time

import pytest

from helpers import PYTHON, REPO, free_port, python_env
from test_rm_train import read_metrics, rm_args

pytestmark = pytest.mark.distributed

TIMEOUT_S = 20  # --timeout_s: every collective fails after this (a hung peer costs the test this long)
SLACK_S = 60    # process exit, stack unwinding and a busy shared CPU


@pytest.fixture
def ranks(tiny_llama_dir, tmp_path):
    """Start two training ranks; yields (procs, stderr paths, out dir) once step 1 is logged; kills both at the end."""
    procs, logs = [], []

    def start():
        port = free_port()
        out = tmp_path / "run"
        flags = rm_args(tiny_llama_dir, out, max_steps=500, save_steps=0, timeout_s=TIMEOUT_S) + ["--no-export"]
        for rank in range(2):
            env = python_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            logs.append(tmp_path / f"rank{rank}.stderr")  # a file, not a pipe: a full pipe would hang the rank
            procs.append(subprocess.Popen([PYTHON, "-m", "aplot_rlhf.cli.train_rm", *flags], env=env, cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=open(logs[-1], "w")))
        deadline = time.time() + 600
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and read_metrics(out):
                return procs, logs
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        pytest.fail("training did not start:\n" + logs[0].read_text()[-3000:])

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_surviving_rank_fails_with_rank_and_phase(ranks, how):
    (rank0, rank1), (log0, _) = ranks()
    t0 = time.time()
    rank1.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        rank0.wait(timeout=TIMEOUT_S + SLACK_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 still running {TIMEOUT_S + SLACK_S} s after rank 1 was {how} (timeout {TIMEOUT_S} s)")
    elapsed = time.time() - t0
    err = log0.read_text()
    assert rank0.returncode != 0, err[-3000:]
    found = re.search(r"\[rank 0\] phase '([^']+)' failed: (.*)", err)
    assert found, err[-3000:]
    print(f"{how}: rank 0 exited {rank0.returncode} after {elapsed:.1f} s: phase {found.group(1)!r}: "
          f"{found.group(2)[:160]}")
    if how == "hung":  # nothing tells rank 0 the peer is gone: only the timeout can end the wait
        assert re.search(r"time(d)? ?out", found.group(2), re.I), found.group(0)
