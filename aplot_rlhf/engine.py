"""Everything DeepSpeed: distributed init, config assembly, initialize, ZeRO-3 gathers, checkpoints, export.

No other module imports deepspeed. Works on CUDA (nccl) and on CPU (DeepSpeed's CPU accelerator, gloo).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest_checkpoint.json"


# ------------------------------------------------------------------------------------ process group

def init_distributed(backend: str = "auto", timeout_s: int = 600) -> tuple[int, int, int]:
    """Start (or join) the process group; works for deepspeed, torchrun and plain python (world 1).

    Returns (rank, world_size, local_rank). Every collective fails after `timeout_s` instead of hanging.
    """
    import deepspeed
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # plain `python -m`: a one-process group so the same code path runs
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _free_port() -> int:
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
    """Tear the process group down; without it some multi-process runs abort at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


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
            rank = dist.get_rank() if dist.is_initialized() else 0
            if "[rank" in str(exc) and "phase" in str(exc):
                raise
            raise RuntimeError(f"[rank {rank}] phase {name!r} failed: {exc}") from exc
        finally:
            cls.current = previous
            cls.depth -= 1

    @classmethod
    def collective(cls, op: str):
        """For our own collectives: inside a phase that phase names a failure; between phases, say which one it follows."""
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


# ------------------------------------------------------------------------------------ configuration

def effective_precision(precision: str) -> str:
    """bf16/fp16 need an accelerator; on CPU we train in fp32 (and say so)."""
    if precision != "fp32" and not torch.cuda.is_available():
        log.warning("precision %s requested but no CUDA device: training in fp32 on CPU", precision)
        return "fp32"
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def role_ds_config(cfg, world_size: int, path: str, role: str, actor_ds_cfg: dict, precision: str | None = None) -> dict:
    """A PPO role's own DeepSpeed JSON (critic, reference), or the actor's when `path` is empty.

    Every role must use the actor's ZeRO stage and precision: models are created under one
    HfDeepSpeedConfig (ZeRO-3 partitions at load time) and their tensors meet in one loss.
    """
    if not path:
        return actor_ds_cfg
    import dataclasses
    ds_cfg = build_ds_config(dataclasses.replace(cfg, ds_config=path), world_size, precision)
    stage = lambda c: c.get("zero_optimization", {}).get("stage", 0)  # noqa: E731
    if (stage(ds_cfg), ds_precision(ds_cfg)) != (stage(actor_ds_cfg), ds_precision(actor_ds_cfg)):
        raise ConfigError(f"{path}: the {role} config has ZeRO stage {stage(ds_cfg)} / {ds_precision(ds_cfg)}, the "
                         f"actor's has ZeRO stage {stage(actor_ds_cfg)} / {ds_precision(actor_ds_cfg)}: every PPO "
                         "role must match the actor")
    return ds_cfg


def ds_precision(ds_cfg: dict) -> str:
    """'bf16', 'fp16' or 'fp32', as a DeepSpeed config enables it."""
    if ds_cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds_cfg.get("fp16", {}).get("enabled") else "fp32"


def build_ds_config(cfg, world_size: int, precision: str | None = None) -> dict:
    """DeepSpeed config from our knobs, or from cfg.ds_config with its 'auto' values filled in.

    precision: override (dry runs plan the requested dtype, not the CPU fallback)."""
    precision = precision or effective_precision(cfg.precision)
    on_cuda = torch.cuda.is_available()
    torch_adam = cfg.optimizer == "adamw_torch" or (cfg.optimizer == "auto" and not on_cuda and not cfg.offload_optimizer)
    ours = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.learning_rate, "betas": list(cfg.adam_betas), "eps": 1e-8,
            "weight_decay": cfg.weight_decay, "torch_adam": torch_adam,
            # torch's one-kernel AdamW (CPU and CUDA) instead of its per-tensor loop; DeepSpeed passes it through
            **({"fused": True} if torch_adam and cfg.fused_torch_adam else {})}},
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": on_cuda,
            "reduce_bucket_size": 5e7,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }
    if cfg.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if cfg.offload_param:
        ours["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    if not cfg.ds_config:
        return ours
    if not os.path.exists(cfg.ds_config):
        from .errors import InputNotFoundError
        raise InputNotFoundError(f"ds_config {cfg.ds_config} does not exist")
    with open(cfg.ds_config) as fh:
        try:
            user = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg.ds_config}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
    return fill_auto(user, ours)


def fill_auto(user, ours):
    """Replace every "auto" in a user's DeepSpeed JSON with our value at the same path."""
    if isinstance(user, dict):
        out = {}
        for k, v in user.items():
            if v == "auto":
                if not isinstance(ours, dict) or k not in ours:
                    raise ConfigError(f"ds_config: no value to fill for 'auto' at key {k!r}")
                out[k] = copy.deepcopy(ours[k])
            else:
                out[k] = fill_auto(v, ours.get(k) if isinstance(ours, dict) else None)
        return out
    return user


def check_ds_config(ds_cfg: dict, world_size: int) -> None:
    """Batch-size arithmetic DeepSpeed would reject, reported before any model is loaded."""
    mbs = ds_cfg.get("train_micro_batch_size_per_gpu")
    ga = ds_cfg.get("gradient_accumulation_steps")
    tbs = ds_cfg.get("train_batch_size")
    if all(isinstance(x, int) for x in (mbs, ga, tbs)) and mbs * ga * world_size != tbs:
        raise ConfigError(f"ds_config: train_batch_size {tbs} != micro batch {mbs} x grad accum {ga} x "
                         f"world size {world_size}")


def zero3_context(ds_cfg: dict):
    """Must exist (and stay referenced) before from_pretrained, so ZeRO-3 partitions while loading."""
    if ds_cfg.get("zero_optimization", {}).get("stage") != 3:
        return None
    import torch._dynamo  # noqa: F401  imported before zero.Init to avoid a signature mismatch
    from transformers.integrations import HfDeepSpeedConfig
    return HfDeepSpeedConfig(ds_cfg)


def lr_lambda(total_steps: int, warmup_steps: int, kind: str, min_ratio: float):
    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def initialize(model: torch.nn.Module, ds_cfg: dict, cfg, total_steps: int, learning_rate: float | None = None):
    """deepspeed.initialize with decay/no-decay groups and our warm-up + decay schedule."""
    import deepspeed
    if learning_rate is not None:
        ds_cfg = copy.deepcopy(ds_cfg)
        ds_cfg["optimizer"]["params"]["lr"] = learning_rate
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    warmup = int(round(cfg.warmup_ratio * total_steps))
    schedule = lr_lambda(total_steps, warmup, cfg.lr_scheduler, cfg.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if engine.zero_optimization_stage() == 0 and (not dist.is_initialized() or dist.get_world_size() == 1):
        # one rank has nothing to average: DeepSpeed would still flatten, all-reduce and copy back every gradient
        engine.enable_backward_allreduce = False
    return engine, scheduler


def initialize_frozen(model: torch.nn.Module, ds_cfg: dict):
    """A model that only runs forwards (PPO reference, reward model): ZeRO-3 partitioned without
    optimizer states, or a plain module on the device for lower stages."""
    import deepspeed
    for p in model.parameters():
        p.requires_grad_(False)
    if ds_cfg.get("zero_optimization", {}).get("stage") != 3:
        precision = ds_precision(ds_cfg)
        model = model.to(device(), dtype=torch_dtype(precision)) if precision != "fp32" else model.to(device())
        return model.eval()
    frozen = copy.deepcopy(ds_cfg)
    frozen.pop("optimizer", None)
    frozen["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=frozen)
    engine.module.eval()
    return engine


def offload_states(*engines) -> None:
    """Move ZeRO-3 optimizer states, gradients and parameter partitions to CPU (GPU memory for vLLM)."""
    for e in engines:
        if hasattr(e, "offload_states") and e.zero_optimization_stage() == 3:
            e.offload_states()


def reload_states(*engines) -> None:
    for e in engines:
        if hasattr(e, "reload_states") and e.zero_optimization_stage() == 3:
            e.reload_states()


# ------------------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(engines: dict, ckpt_root: str, step: int, client_state: dict, keep: int = 2) -> str:
    """Each engine's model/optimizer/scheduler (DeepSpeed), the client state (data position, controllers)
    and per-rank RNG, under ckpt_root/step_N/<engine name>.

    Atomic: the pointer file LATEST is replaced only after every rank has written every engine, so a
    crash mid-save leaves the previous checkpoint as the one `resume` loads.
    """
    tag = f"step_{step}"
    step_dir = os.path.join(ckpt_root, tag)
    with Phase.of("save_checkpoint"):
        for name, engine in engines.items():
            engine.save_checkpoint(step_dir, tag=name, client_state=client_state, save_latest=False)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(rng_state(), os.path.join(step_dir, f"rng_rank{rank}.pt"))
        barrier()
        if is_rank0():
            _atomic_write_json(os.path.join(ckpt_root, LATEST), {"tag": tag, "step": step, "time": time.time()})
            _prune_checkpoints(ckpt_root, keep, current=tag)
        barrier()
    return step_dir


def _prune_checkpoints(ckpt_root: str, keep: int, current: str) -> None:
    tags = sorted((d for d in os.listdir(ckpt_root) if d.startswith("step_") and os.path.isdir(os.path.join(ckpt_root, d))),
                  key=lambda d: int(d.split("_")[1]))
    for old in tags[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)


def latest_checkpoint(ckpt_root: str) -> dict | None:
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def load_checkpoint(engines: dict, ckpt_root: str) -> dict | None:
    """Restore the newest complete checkpoint into every engine; returns the client_state, or None."""
    latest = latest_checkpoint(ckpt_root)
    if latest is None:
        return None
    step_dir = os.path.join(ckpt_root, latest["tag"])
    client_state = None
    with Phase.of("load_checkpoint"):
        for name, engine in engines.items():
            path, client_state = engine.load_checkpoint(step_dir, tag=name)
            if path is None:
                raise RuntimeError(f"{step_dir}/{name}: DeepSpeed could not load this checkpoint")
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = os.path.join(step_dir, f"rng_rank{rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s missing: RNG not restored (world size changed?)", rng_file)
    return client_state


# ------------------------------------------------------------------------------------------ export

def gathered_state_dict(module: torch.nn.Module) -> dict | None:
    """Full state dict on rank 0 (None elsewhere), gathered one tensor at a time under ZeRO-3.

    One parameter at a time keeps peak GPU memory at one layer's worth, whatever the model size.
    """
    import deepspeed
    out = {} if is_rank0() else None
    persistent = set(module.state_dict().keys())  # skips non-persistent buffers (e.g. rotary caches)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in persistent:
            continue
        if hasattr(tensor, "ds_id"):
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if out is not None:
                    out[name] = tensor.data.detach().cpu().clone()
        elif out is not None:
            out[name] = tensor.detach().cpu().clone()
    return out


@contextlib.contextmanager
def gathered_params(params, enabled: bool = True):
    """Gather ZeRO-3 partitioned parameters for reading (no-op for unpartitioned ones)."""
    import deepspeed
    params = [p for p in params if hasattr(p, "ds_id")]
    if not enabled or not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def export_pretrained(hf_model, tokenizer, out_dir: str, extra_config: dict | None = None) -> str | None:
    """Consolidate (from ZeRO-3 if needed) and write a transformers folder atomically (rank 0)."""
    with Phase.of("export"):
        state = gathered_state_dict(hf_model)
        if is_rank0():
            tmp = out_dir.rstrip("/") + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            config = hf_model.config
            for k, v in (extra_config or {}).items():
                setattr(config, k, v)
            hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            old = out_dir.rstrip("/") + ".old"
            if os.path.exists(out_dir):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        barrier()
    return out_dir if is_rank0() else None


# ------------------------------------------------------------------------------------- config parse

def parse_with_deepspeed(ds_cfg: dict, world: int, what: str) -> None:
    """Batch arithmetic for `world` ranks, then DeepSpeed's own config parser (no process group needed);
    ConfigError naming `what` if rejected. For dry runs: DeepSpeed itself is imported only here."""
    from deepspeed.runtime.config import DeepSpeedConfig
    check_ds_config(ds_cfg, world)
    # Without a process group DeepSpeedConfig takes world size 1 (an mpu is not consulted before
    # dist.get_rank() fails), so hand it the per-rank share; the world-size arithmetic was checked above.
    probe = copy.deepcopy(ds_cfg)
    if isinstance(probe.get("train_batch_size"), int):
        probe["train_batch_size"] //= world
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError: all mean "rejected"
        raise ConfigError(f"DeepSpeed rejects {what}: {type(exc).__name__}: {exc}") from exc
