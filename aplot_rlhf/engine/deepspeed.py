"""Everything that calls DeepSpeed; no other module of the package imports it.

Starting the process group (through DeepSpeed, so its comm layer adopts it), the DeepSpeed config built
from our knobs or a user's JSON, initialize for trained and frozen models, ZeRO-3 gathers, optimizer-state
offload around vLLM, and DeepSpeed's own config parser for dry runs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .distributed import device, free_port

log = logging.getLogger(__name__)


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
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    if not dist.is_initialized():
        _forget_destroyed_groups()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank




def _forget_destroyed_groups() -> None:
    """DeepSpeed caches process groups in module globals (deepspeed.utils.groups: the cloned world group, the
    data/model/expert parallel groups). A second run in one process (a notebook, a sweep, a test module) after
    the first destroyed its process group would hand DeepSpeed those dead groups ("Group ... is not
    registered"): drop them, so DeepSpeed builds them again on the new group."""
    from deepspeed.utils import groups
    for name, value in list(vars(groups).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
            value.clear()

# The CPU flags (Linux /proc/cpuinfo) of bf16 arithmetic units: AMX tiles (Sapphire Rapids on) and AVX-512 bf16 dot
# products (Cooper Lake, Zen 4 on). oneDNN runs bf16 matmuls on them at several times fp32's rate; without them it
# emulates bf16 through fp32 conversions (no faster than fp32, often slower), so such CPUs keep fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# the ISA flags a benchmark header reports: what decides the CPU's matmul speed in fp32 and bf16
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# "0" keeps CPU runs in fp32 whatever the CPU (the test suite sets it: same numbers on every machine)
CPU_BF16_ENV = "APLOT_CPU_BF16"
_said: set[str] = set()  # precision decisions already logged in this process


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(the CPU's model name, its flags), read from /proc/cpuinfo; ("unknown", no flags) where there is none."""
    model, flags = "unknown", frozenset()
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / arm64
                    flags = frozenset(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return model, flags


def cpu_bf16_units(flags: frozenset[str] | None = None) -> list[str]:
    """The bf16 unit flags this CPU has (empty: none, or turned off by APLOT_CPU_BF16=0)."""
    if not _cpu_bf16_allowed():
        return []
    flags = cpu_info()[1] if flags is None else flags
    return [f for f in BF16_CPU_FLAGS if f in flags]


def _cpu_bf16_allowed() -> bool:
    return os.environ.get(CPU_BF16_ENV, "auto").strip().lower() not in ("0", "off", "false", "no")


def _say_once(level: int, msg: str, *args) -> None:
    text = msg % args
    if text not in _said:
        _said.add(text)
        log.log(level, text)


def effective_precision(precision: str, flags: frozenset[str] | None = None) -> str:
    """The precision a run trains in: as asked on CUDA; on CPU bf16 where the CPU has bf16 units (DeepSpeed's
    bf16 mixed precision: bf16 weights and compute, fp32 master weights in the optimizer), else fp32, said once.

    flags: the CPU's flags (default: this machine's). fp16 on CPU is always fp32: no CPU trains fp16 faster."""
    if precision == "fp32" or torch.cuda.is_available():
        return precision
    units = cpu_bf16_units(flags) if precision == "bf16" else []
    model = cpu_info()[0] if flags is None else "given flags"
    if units:
        # DeepSpeed's bf16 path, not torch.autocast over fp32 weights: the path CUDA runs take (its master
        # weights, ZeRO partitions, checkpoints and the bf16 weights vLLM is synced with), already wired through
        # build_ds_config and the model loaders, and frozen models (reference, reward, LoRA base) in half the memory
        _say_once(logging.INFO, "precision bf16 on CPU (%s, %s): DeepSpeed bf16 mixed precision (bf16 weights and "
                  "compute, fp32 master weights)", model, " ".join(units))
        return "bf16"
    if precision != "bf16":
        why = "no CPU trains fp16 faster than fp32"
    elif not _cpu_bf16_allowed():
        why = f"{CPU_BF16_ENV}=0"
    else:
        why = "it has no bf16 units: neither amx_bf16 nor avx512_bf16 among its flags"
    _say_once(logging.WARNING, "precision %s requested on a CPU (%s): training in fp32 (%s)", precision, model, why)
    return "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def role_ds_config(cfg, world_size: int, path: str, role: str, actor_ds_cfg: dict,
                   precision: str | None = None) -> dict:
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
    torch_adam = cfg.optimizer == "adamw_torch" or (cfg.optimizer == "auto" and not on_cuda
                                                    and not cfg.offload_optimizer)
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
        from ..errors import InputNotFoundError
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


def parse_with_deepspeed(ds_cfg: dict, world: int, what: str) -> None:
    """Batch arithmetic for `world` ranks, then DeepSpeed's own config parser (no process group needed);
    ConfigError naming `what` if rejected. For dry runs: DeepSpeed's config parser alone."""
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

