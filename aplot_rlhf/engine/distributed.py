"""The process group's helpers and our collectives (no DeepSpeed here: engine.deepspeed starts the group).

Every collective of ours runs inside a `Phase`, so a failed or timed-out one says which rank and phase.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError, shutdown_process_group


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        with Phase.collective("barrier"):
            dist.barrier()


def shutdown() -> None:
    """Tear the process group down; without it some multi-process runs abort at exit (errors.py has the why of
    the short wait that follows)."""
    shutdown_process_group()


class Phase:
    """Names the phase a rank is in, so a failed or timed-out collective says rank and phase."""
    current = "startup"
    last = "startup"  # the phase entered most recently: names collectives that run between phases
    depth = 0

    @classmethod
    @contextlib.contextmanager
    def of(cls, name: str, record: bool = True):
        previous, cls.current = cls.current, name
        cls.last = name if record else cls.last
        cls.depth += 1
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, UserError):  # already names the file and the reason: keep it a one-line user error
                raise
            rank = dist.get_rank() if dist.is_initialized() else 0
            if "[rank" in str(exc) and "phase" in str(exc):
                raise
            raise RuntimeError(f"[rank {rank}] phase {name!r} failed: {exc}") from exc
        finally:
            cls.current = previous
            cls.depth -= 1

    @classmethod
    def collective(cls, op: str):
        """For our own collectives: inside a phase that phase names a failure; between phases, say which one it
        follows."""
        return contextlib.nullcontext() if cls.depth else cls.of(f"{op} after {cls.last}", record=False)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank (same shape on all ranks), without grad."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    with Phase.collective("all_gather"):
        dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        with Phase.collective("all_reduce"):
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_finite_mean(values: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over ranks of the finite values only ([K] -> [K]; NaN where no rank has one).

    One rank's NaN statistic (e.g. a correlation over a constant batch) must not poison the logged value."""
    finite = torch.isfinite(values)
    both = torch.stack([torch.where(finite, values, torch.zeros_like(values)).double(), finite.double()])
    both = all_reduce_sum(both)
    return (both[0] / both[1]).to(values.dtype)  # 0/0 = NaN where nothing was finite


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)



def from_rank0(obj):
    """rank 0's `obj` on every rank (rank 0 decides what the filesystem says; every rank acts alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    with Phase.collective("broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    with Phase.collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out
