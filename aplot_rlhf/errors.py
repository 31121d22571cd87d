"""Errors the user caused, and the CLI wrapper that reports them as one message instead of a traceback.

A `UserError` means "your input is wrong and this says how": a data file, a config value, a model folder
or a checkpoint. The command-line entry points print its message once (rank 0; other ranks one line) and
exit with status 2. Anything else is a bug and keeps its traceback. APLOT_DEBUG=1 shows tracebacks for
user errors too.
"""
from __future__ import annotations

import os
import sys
import time

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input from the user; the message names the file, line, field or flag and what to do."""


class ConfigError(UserError, ValueError):
    """A config value (flag, YAML key, DeepSpeed JSON) that cannot work."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ModelError(UserError, ValueError):
    """A model folder that cannot serve the role it was given (e.g. a reward model with an untrained head)."""


class RewardError(UserError):
    """A reward source failed on a batch (an exception, a wrong count, a NaN, a non-number, a timeout, a reward
    server that stayed away); the message names the source and the prompt row or the server's URL. Raised by
    rewards.py and remote_reward.py (here, so the HTTP client need not import rewards.py, which imports it)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from (missing, incomplete, from a different run); the message
    names the path and the reason."""


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


# How long shutdown_process_group leaves gloo's worker threads to free their last work items.
GLOO_DRAIN_S = 0.25


def shutdown_process_group() -> None:
    """Destroy the process group if one is up (without it some multi-process runs abort at exit), then wait
    GLOO_DRAIN_S before the interpreter may finalize. A gloo worker thread frees a finished work item
    (an all_gather's output tensors, say) just after the rank's Python code has been woken by its completion; if
    Python already dropped those tensors, freeing them takes the GIL, and a thread that asks for the GIL while the
    interpreter finalizes is terminated: `terminate called without an active exception`, SIGABRT, a run that
    finished and saved everything exiting -6 (seen in CI on a loaded 2-core runner, and here in 1 of ~25 two-rank
    runs; core dump: ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit inside
    ProcessGroupGloo::runLoop while the main thread was in Py_FinalizeEx). destroy_process_group does not join
    those threads, and torch offers no call that waits for them, so the main thread sleeps briefly instead (the
    GIL released) while they finish: 0.25 s once per process, whatever the backend.
    """
    dist = sys.modules.get("torch.distributed")  # torch is imported by whoever started a group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    dist.destroy_process_group()
    time.sleep(GLOO_DRAIN_S)


def _shutdown_process_group() -> None:
    """On the way out with a user error: a failed teardown must not replace the user's message."""
    try:
        shutdown_process_group()
    except Exception:
        pass


def run_cli(main, argv=None):
    """Call main(argv); a UserError becomes one message on stderr and exit status 2 (bugs still raise)."""
    try:
        return main(argv)
    except UserError as exc:
        if os.environ.get("APLOT_DEBUG", "") not in ("", "0"):
            raise
        rank = _rank()
        message = str(exc) or type(exc).__name__
        if rank == 0:
            print(f"error: {message}", file=sys.stderr)
        else:  # every rank usually hits the same input: one short line each, the full text once on rank 0
            print(f"[rank {rank}] error: {message.splitlines()[0]}", file=sys.stderr)
        sys.stderr.flush()
        _shutdown_process_group()
        sys.exit(USER_ERROR_EXIT)
