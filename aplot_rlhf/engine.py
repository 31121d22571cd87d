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
import re
import shutil
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError, ConfigError, UserError  # noqa: F401  (CheckpointError: re-exported)

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


# ------------------------------------------------------------------------------------ configuration

def effective_precision(precision: str) -> str:
    """bf16/fp16 need an accelerator; on CPU we train in fp32 (and say so)."""
    if precision != "fp32" and not torch.cuda.is_available():
        log.warning("precision %s requested but no CUDA device: training in fp32 on CPU", precision)
        return "fp32"
    return precision


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

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# files up to this size are hashed too (RNG, client state, ZeRO-3 model-state shards); the multi-GB
# optimizer shards of a 70B run are checked by size only, which catches truncated and missing files
HASH_LIMIT = 64 << 20
# knobs that change neither the model, the data order nor the step arithmetic: free to change on resume
RESUME_FREE_KEYS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "resume_allow_config_change", "dry_run", "export",
    "eval_steps", "eval_at_start", "eval_batch_size", "eval_data", "max_eval_pairs", "save_steps",
    "save_total_limit", "log_steps", "tensorboard", "wandb_project", "progress", "timeout_s", "dist_backend",
    "gradient_checkpointing", "attn_implementation", "reward_batch_size", "vllm_gpu_memory_utilization",
    "vllm_sleep", "vllm_enforce_eager"})
# the run's length: free only while the learning-rate schedule does not depend on the total step count
RUN_LENGTH_KEYS = frozenset({"max_steps", "epochs", "ppo_iterations"})


class ResumeConfigError(ConfigError):
    """--resume with a config that would change the model, the data order or the step arithmetic."""


class OutputDirError(ConfigError):
    """A fresh run pointed at a folder that holds an earlier run."""


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


def _from_rank0(obj):
    """rank 0's `obj` on every rank (rank 0 decides what the filesystem says; every rank acts alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    with Phase.collective("broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_objects(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    with Phase.collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def _list_files(folder: str) -> dict:
    """{relative path: size} of every file under folder."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return out


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_folders(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, folder name) of every step_N folder, newest first; partial and stale folders do not match."""
    if not os.path.isdir(ckpt_root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(ckpt_root)
             if (m := STEP_DIR.match(d)) and os.path.isdir(os.path.join(ckpt_root, d))]
    return sorted(found, reverse=True)


def read_manifest(step_dir: str) -> dict:
    """The manifest of a checkpoint folder, or CheckpointError naming the file and what is wrong with it."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (the save did not finish)")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' or 'step')")
    return manifest


def verify_checkpoint(step_dir: str) -> dict:
    """The manifest, after checking every file it lists (size, and sha256 where recorded)."""
    manifest = read_manifest(step_dir)
    for rel, want in sorted(manifest["files"].items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (manifest lists {want['size']} bytes)")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointError(f"{path}: {size} bytes, manifest says {want['size']} (truncated or rewritten)")
        if "sha256" in want and _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: sha256 {_sha256(path)[:16]}... differs from the manifest's "
                                  f"{want['sha256'][:16]}... (same size, damaged content)")
    return manifest


def latest_checkpoint(ckpt_root: str) -> dict | None:
    """The pointer file's content, None if absent; CheckpointError naming the file if it is unreadable."""
    path = os.path.join(ckpt_root, LATEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            latest = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(latest, dict) or not isinstance(latest.get("tag"), str):
        raise CheckpointError(f"{path}: no checkpoint 'tag' in it")
    return latest


def newest_complete_checkpoint(ckpt_root: str) -> dict | None:
    """The manifest of the newest step_N folder whose files all match their manifest.

    The pointer file is only a hint: a missing or garbage pointer, a damaged newest folder, or a folder
    a kill left half-written each get a warning naming the file, and the next older checkpoint is tried.
    None when there is no checkpoint at all; CheckpointError when there are some and none is usable.
    """
    try:
        pointer = latest_checkpoint(ckpt_root)
    except CheckpointError as exc:
        log.warning("%s; choosing from the step_N folders instead", exc)
        pointer = None
    folders = step_folders(ckpt_root)
    problems = []
    for _, name in folders:
        try:
            manifest = verify_checkpoint(os.path.join(ckpt_root, name))
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for p in problems:
            log.warning("checkpoint not usable: %s; falling back to %s", p, name)
        if pointer is not None and pointer["tag"] != name:
            log.warning("%s names %s, but the newest complete checkpoint is %s: resuming from %s",
                        os.path.join(ckpt_root, LATEST), pointer["tag"], name, name)
        return {**manifest, "tag": name}
    if problems:
        raise CheckpointError(f"{ckpt_root}: no usable checkpoint:\n  " + "\n  ".join(problems))
    if pointer is not None:
        raise CheckpointError(f"{os.path.join(ckpt_root, LATEST)}: names {pointer['tag']}, but {ckpt_root} holds "
                              "no step_N checkpoint folder")
    return None


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: saved X, now Y' for every key that differs in a way that changes the run being resumed."""
    schedule_fixed = all(c.get("lr_scheduler") == "constant" and not c.get("warmup_ratio") for c in (saved, current))
    free = RESUME_FREE_KEYS | (RUN_LENGTH_KEYS if schedule_fixed else frozenset())
    out = []
    for key in sorted(set(saved) & set(current) - free):  # a key one version lacks has no saved value to hold to
        if json.dumps(saved[key], sort_keys=True) != json.dumps(current[key], sort_keys=True):
            out.append(f"{key}: saved {saved[key]!r}, now {current[key]!r}")
    return out


class Checkpointer:
    """A run's checkpoints under ckpt_root/step_N: written atomically, verified on resume, pruned safely.

    A checkpoint is written into step_N.partial; after every rank has written its files, rank 0 writes
    manifest.json (every file's size, and a sha256 for files up to HASH_LIMIT) and renames the folder to
    step_N. A kill at any moment leaves either a complete step_N or a leftover that never counts.
    Every manifest carries the run's id (a fresh run draws one; a resumed run takes its checkpoint's), and
    pruning removes only older checkpoints of this id, never another run's or a folder without a manifest.
    """

    def __init__(self, ckpt_root: str, config: dict, world_size: int, keep: int = 2,
                 allow_config_change: bool = False):
        import uuid
        self.root, self.config, self.world_size, self.keep = ckpt_root, config, world_size, keep
        self.allow_config_change = allow_config_change
        self.run_id = _from_rank0(uuid.uuid4().hex)

    def save(self, engines: dict, step: int, client_state: dict) -> str:
        tag = f"step_{step}"
        final = os.path.join(self.root, tag)
        partial = final + ".partial"
        rank = dist.get_rank() if dist.is_initialized() else 0
        with Phase.of("save_checkpoint"):
            if is_rank0():
                os.makedirs(self.root, exist_ok=True)
                self._clean_leftovers()
            barrier()
            for name, engine in engines.items():
                engine.save_checkpoint(partial, tag=name, client_state=client_state, save_latest=False)
            torch.save(rng_state(), os.path.join(partial, f"rng_rank{rank}.pt"))
            barrier()
            views = _gather_objects(_list_files(partial))  # each rank's own view: under ZeRO-3 each writes its shards
            if is_rank0():
                files = {}
                for view in views:
                    for rel, size in view.items():
                        files[rel] = max(size, files.get(rel, 0))
                if any(set(v) != set(files) for v in views):
                    log.warning("%s: the ranks see different files; checkpoints need a folder every rank shares",
                                partial)
                for rel, size in files.items():
                    entry = files[rel] = {"size": size}
                    if size <= HASH_LIMIT and os.path.isfile(os.path.join(partial, rel)):
                        entry["sha256"] = _sha256(os.path.join(partial, rel))
                _atomic_write_json(os.path.join(partial, MANIFEST), {
                    "version": 1, "step": step, "run_id": self.run_id, "world_size": self.world_size,
                    "time": time.time(), "config": self.config, "files": files})
                self._publish(partial, final)
                _atomic_write_json(os.path.join(self.root, LATEST), {"tag": tag, "step": step, "time": time.time()})
                self._prune(step)
            barrier()
        return final

    def _clean_leftovers(self) -> None:
        """Half-written folders and temp files that only a killed save leaves behind (rank 0)."""
        for d in os.listdir(self.root):
            p = os.path.join(self.root, d)
            if re.match(r"^step_\d+\.(partial|stale\.\d+)$", d):
                log.warning("removing %s, left by an interrupted save", p)
                shutil.rmtree(p, ignore_errors=True)
            elif d.startswith(LATEST + ".tmp."):
                os.remove(p)

    @staticmethod
    def _publish(partial: str, final: str) -> None:
        if os.path.isdir(final):  # resaving a step (resumed at the end, or replacing a damaged one)
            stale = f"{final}.stale.{os.getpid()}"
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)

    def _prune(self, current: int) -> None:
        """Keep the newest `keep` checkpoints of this run (the current one included); others are left alone."""
        if self.keep <= 0:
            return
        older = []
        for step, name in step_folders(self.root):
            if step >= current:
                continue
            try:
                if read_manifest(os.path.join(self.root, name)).get("run_id") == self.run_id:
                    older.append(name)
            except CheckpointError:
                continue  # no manifest: not provably this run's
        for name in older[self.keep - 1:]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def load(self, engines: dict) -> dict | None:
        """Restore the newest complete checkpoint into every engine; returns its client_state, or None."""
        choice = None
        if is_rank0():
            try:
                choice = {"manifest": newest_complete_checkpoint(self.root)}
            except CheckpointError as exc:
                choice = {"error": str(exc)}
        choice = _from_rank0(choice)
        if "error" in choice:
            raise CheckpointError(choice["error"])
        manifest = choice["manifest"]
        if manifest is None:
            return None
        step_dir = os.path.join(self.root, manifest["tag"])
        changes = config_changes({**manifest.get("config", {}), "world_size": manifest.get("world_size")},
                                 {**self.config, "world_size": self.world_size})
        if changes and not self.allow_config_change:
            raise ResumeConfigError(f"{step_dir}: --resume with a config that changes the run:\n  "
                                    + "\n  ".join(changes)
                                    + "\npass the saved values, or --resume_allow_config_change to resume anyway")
        if changes and is_rank0():
            log.warning("resuming %s with a changed config (--resume_allow_config_change): %s", step_dir,
                        "; ".join(changes))
        self.run_id = manifest["run_id"]
        client_state, failed = None, []
        with Phase.of("load_checkpoint"):
            for name, engine in engines.items():  # every rank loads every engine: their collectives stay matched
                path, state = engine.load_checkpoint(step_dir, tag=name)
                client_state = state if state is not None else client_state
                if path is None:
                    failed.append(f"{step_dir}/{name}: DeepSpeed could not load this checkpoint")
            # one rank's failure (storage not shared, say) stops every rank, instead of leaving the others waiting
            anywhere = all_reduce_sum(torch.tensor([float(len(failed))], device=device())).item()
        if anywhere:
            raise CheckpointError("; ".join(failed) or f"{step_dir}: another rank could not load this checkpoint")
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = os.path.join(step_dir, f"rng_rank{rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s missing: RNG not restored (world size changed?)", rng_file)
        return client_state


RUN_OUTPUTS = ("checkpoints", "model", "policy", "actor_hf", "metrics.jsonl", "config.json", "eval_rewards.pt", "tb")


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding an earlier run, or move that run aside with --overwrite_output_dir.

    Runs before anything is written, so the earlier run's config.json and checkpoints stay as they were.
    """
    error = None
    if is_rank0():
        ckpts = os.path.join(output_dir, "checkpoints")
        used = [d for d in sorted(os.listdir(ckpts)) if d.startswith("step_")] if os.path.isdir(ckpts) else []
        used += [d + "/" for d in ("model", "policy") if os.path.isdir(os.path.join(output_dir, d))]
        if resume and overwrite:
            error = "--resume and --overwrite_output_dir contradict each other: pass one"
        elif used and not resume and not overwrite:
            error = (f"{output_dir} holds an earlier run ({', '.join(used[:4])}{', ...' if len(used) > 4 else ''}): "
                     "pass --resume to continue it, or --overwrite_output_dir to move it aside and start afresh")
        elif used and overwrite:
            present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, n))]
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(
                max(os.path.getmtime(os.path.join(output_dir, n)) for n in present)))
            aside, n = os.path.join(output_dir, f"previous_run.{stamp}"), 1
            while os.path.exists(aside):
                aside, n = os.path.join(output_dir, f"previous_run.{stamp}-{n}"), n + 1
            os.makedirs(aside)
            for name in present:
                os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
            log.warning("--overwrite_output_dir: moved the earlier run in %s (%s) to %s", output_dir,
                        ", ".join(present), aside)
    error = _from_rank0(error)
    if error:
        raise OutputDirError(error)


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


def iter_gathered_named_params(module: torch.nn.Module, zero3: bool):
    """(HF name, full tensor) for every parameter, gathered one decoder layer at a time under ZeRO-3.

    LoRA: merged weights (W + scale * B @ A) under the plain names. vLLM gets merged weights rather than
    its own LoRA path: the engine keeps serving an ordinary model (same kernels, CUDA graphs, tensor
    parallel layout and weight loader as without LoRA), and merging costs one layer's matmuls per sync."""
    from .models.lora import is_lora, iter_merged_named_params  # models.lora imports this module
    if is_lora(module):
        yield from iter_merged_named_params(module, zero3)
        return
    groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts[:3] else parts[0]  # model.layers.N, or a top-level module
        groups.setdefault(key, []).append((name, p))
    for members in groups.values():
        with gathered_params([p for _, p in members], enabled=zero3):
            for name, p in members:
                yield name, p.data


def export_pretrained(hf_model, tokenizer, out_dir: str, extra_config: dict | None = None) -> str | None:
    """Consolidate (from ZeRO-3 if needed) and write a transformers folder atomically (rank 0).

    A LoRA (peft) model is written merged (a plain transformers folder) and its adapter folder beside
    it, `<out_dir>_adapter`."""
    from .models import lora
    peft_model = hf_model if lora.is_lora(hf_model) else None
    with Phase.of("export"):
        if peft_model is not None:  # merged one layer at a time; the adapters gathered one tensor at a time
            state, adapter = lora.merged_state_dict(peft_model), lora.adapter_state_dict(peft_model)
            hf_model = peft_model.get_base_model()
        else:
            state = gathered_state_dict(hf_model)
        if is_rank0():
            config = hf_model.config
            for k, v in (extra_config or {}).items():
                setattr(config, k, v)
            _replace_dir(out_dir, lambda tmp: (hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True),
                                               tokenizer.save_pretrained(tmp)))
            if peft_model is not None:
                _replace_dir(out_dir.rstrip("/") + "_adapter", lambda tmp: lora.save_adapter(peft_model, adapter, tmp))
        barrier()
    return out_dir if is_rank0() else None


def _replace_dir(out_dir: str, write) -> None:
    """write(tmp) into a temporary folder, then swap it in for out_dir."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


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


# ------------------------------------------------------------------------------------- preemption

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the slurm launchers requeue a job that ends this way
STOP_FILE = "PREEMPT"        # created in output_dir by a launcher (or a user): stop as if signalled
PREEMPTED_FILE = "PREEMPTED"  # written by rank 0 after the preemption checkpoint: the job should be requeued


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
        if is_rank0():  # a requeued run starts clean: the previous stop request is served
            for path in (self.stop_file, self.marker):
                if os.path.exists(path):
                    os.remove(path)

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
            _atomic_write_json(self.marker, {"step": step, "signal": self.signalled or "stop file",
                                             "exit_code": PREEMPT_EXIT_CODE, "time": time.time()})
        log.warning("preempted after step %d: checkpoint written; exit %d (resume with --resume)", step,
                    PREEMPT_EXIT_CODE)

    def restore(self) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
