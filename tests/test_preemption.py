"""The preemption request in one process: signals, the stop file, a bad signal name (the end-to-end
runs that checkpoint, exit 75 and resume are in test_rm_train.py and test_ppo.py)."""
import os
import signal
import time

import pytest


def test_sigusr1_and_the_stop_file_request_a_stop_and_a_requeued_run_starts_clean(tmp_path):
    from aplot_rlhf.engine import preemption as preemption
    (tmp_path / preemption.STOP_FILE).write_text("")
    (tmp_path / preemption.PREEMPTED_FILE).write_text("{}")
    before = signal.getsignal(signal.SIGUSR1)  # whatever this process had: restore() must give it back
    # a requeued run starts clean: Run clears, before set-up, the files older than its process (issue 23:
    # Preemption itself no longer deletes them, so a request made during set-up is kept)
    preemption.clear_stale_requests(str(tmp_path), time.time() + 1)
    p = preemption.Preemption(str(tmp_path), ["SIGUSR1"])
    try:
        assert not (tmp_path / preemption.STOP_FILE).exists() and not (tmp_path / preemption.PREEMPTED_FILE).exists()
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: this process keeps running
        assert p.requested() and p.signalled == "SIGUSR1"
    finally:
        p.restore()
    q = preemption.Preemption(str(tmp_path), ["SIGUSR1"])
    try:
        assert not q.requested()
        (tmp_path / preemption.STOP_FILE).write_text("")  # what the slurm launcher's trap creates
        assert q.requested()
        q.finish(7)
        assert '"step": 7' in (tmp_path / preemption.PREEMPTED_FILE).read_text()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # a late signal cannot kill the exit
    finally:
        q.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_an_unknown_signal_name_is_a_config_error(tmp_path):
    from aplot_rlhf.engine import preemption as preemption
    from aplot_rlhf.errors import ConfigError
    with pytest.raises(ConfigError, match="SIGNOPE"):
        preemption.Preemption(str(tmp_path), ["SIGNOPE"])
