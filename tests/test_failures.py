"""A rank that dies or hangs makes the others fail within the collective timeout, naming rank and phase."""
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, python_env
from test_rm_train import read_metrics, rm_args

TIMEOUT_S = 20


def start_ranks(model_dir, out, port):
    """Two ranks as plain processes (no torchrun, which would kill the group itself and hide rank 0's error)."""
    flags = rm_args(model_dir, out, max_steps=500, save_steps=0, timeout_s=TIMEOUT_S) + ["--no-export"]
    procs = []
    for rank in range(2):
        env = python_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([PYTHON, "-m", "aplot_rlhf.cli.train_rm", *flags], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 600
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and read_metrics(out):
            return procs
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    pytest.fail("training did not start: " + procs[0].communicate()[1][-3000:])


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_surviving_rank_fails_with_rank_and_phase(tiny_llama_dir, tmp_path, how):
    procs = start_ranks(tiny_llama_dir, tmp_path / how, 29551 if how == "killed" else 29552)
    victim = procs[1]
    t0 = time.time()
    victim.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 120)
    finally:
        if how == "hung":
            victim.send_signal(signal.SIGCONT)
        victim.kill()
        victim.wait()
    elapsed = time.time() - t0
    assert procs[0].returncode != 0
    assert elapsed < TIMEOUT_S + 90, f"rank 0 took {elapsed:.0f} s to fail"
    assert "[rank 0] phase '" in err, err[-3000:]
