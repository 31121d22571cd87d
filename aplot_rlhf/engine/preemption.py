"""Stop a run cleanly before a scheduler kills it: one checkpoint on every rank, then exit status 75."""
from __future__ import annotations

import logging
import os
import time

import torch

from ..errors import ConfigError
from .checkpoint import atomic_write_json
from .distributed import all_reduce_sum, device, is_rank0

log = logging.getLogger(__name__)

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the slurm launchers requeue a job that ends this way
STOP_FILE = "PREEMPT"        # created in output_dir by a launcher (or a user): stop as if signalled
PREEMPTED_FILE = "PREEMPTED"  # written by rank 0 after the preemption checkpoint: the job should be requeued


def clear_stale_requests(output_dir: str, started: float) -> None:
    """A requeued run starts clean: the stop file and the marker an earlier process left are served (rank 0,
    before set-up). Files made after `started` (this process's start time) are a request made while this
    run starts up, and stay: `Preemption.requested` honours them after set-up."""
    if not is_rank0():
        return
    for path in (os.path.join(output_dir, STOP_FILE), os.path.join(output_dir, PREEMPTED_FILE)):
        try:
            if os.path.getmtime(path) < started:
                os.remove(path)
                log.info("removed %s, left by an earlier process (its request was served)", path)
        except FileNotFoundError:
            pass


def process_start_time() -> float:
    """When this process started (seconds since the epoch)."""
    import psutil  # a DeepSpeed dependency
    return psutil.Process().create_time()


class Preemption:
    """Stop a run cleanly before a scheduler kills it.

    On any of `signals` (slurm sends SIGTERM, or SIGUSR1 with `--signal`) a rank only sets a flag; at the
    end of each optimizer step every rank asks `requested()`, one all-reduce, so all ranks stop after the
    same step, save one checkpoint together, and exit with PREEMPT_EXIT_CODE. A further signal while the
    checkpoint is written changes nothing: the save runs to its end (and an interrupted one leaves the
    previous checkpoint, which the manifest makes the one resume loads). `output_dir/PREEMPT` (a file any
    process on any node can create on the shared filesystem) has the same effect: through torchrun the
    signal reaches only torchrun, so the slurm launchers create that file when slurm signals the batch shell.
    """

    def __init__(self, output_dir: str, signals=("SIGTERM", "SIGUSR1")):
        import signal
        self.stop_file = os.path.join(output_dir, STOP_FILE)
        self.marker = os.path.join(output_dir, PREEMPTED_FILE)
        self.signalled = None
        bad = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if bad:  # all checked before any handler is installed
            raise ConfigError(f"preempt_signals: {bad} not signal names (e.g. SIGTERM, SIGUSR1)")
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        import signal
        if self.signalled is None:
            self.signalled = signal.Signals(signum).name
            log.warning("%s received: finishing this optimizer step, then saving a checkpoint and exiting with %d",
                        self.signalled, PREEMPT_EXIT_CODE)

    def requested(self) -> bool:
        """True on every rank once any rank was signalled (or the stop file exists). Collective."""
        local = self.signalled is not None or (is_rank0() and os.path.exists(self.stop_file))
        return all_reduce_sum(torch.tensor([float(local)], device=device())).item() > 0

    def finish(self, step: int) -> None:
        """After the preemption checkpoint: leave the marker for the launcher (rank 0), and ignore these
        signals from now on (the run is saved and exiting; Python's own shutdown would otherwise put the
        default handlers back and a late signal would end the process with a signal, not with 75)."""
        import signal
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        if is_rank0():
            atomic_write_json(self.marker, {"step": step, "signal": self.signalled or "stop file",
                                             "exit_code": PREEMPT_EXIT_CODE, "time": time.time()})
        log.warning("preempted after step %d: checkpoint written; exit %d (resume with --resume)", step,
                    PREEMPT_EXIT_CODE)

    def restore(self) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
