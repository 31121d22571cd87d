"""A run's checkpoints and output folder: written atomically, verified on resume, pruned safely.

step_N folders with a manifest (every file's size, sha256 where small), the pointer file, choosing the
newest complete checkpoint on resume, the config keys a resume may change, RNG state per rank, and the
output folder a fresh run may (or may not) start in.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError, ConfigError
from .distributed import Phase, all_reduce_sum, barrier, device, from_rank0, gather_objects, is_rank0

log = logging.getLogger(__name__)

LATEST = "latest_checkpoint.json"
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
    "vllm_sleep", "vllm_enforce_eager", "checkpoint_storage"})
# knobs that give the checkpoint's parameters another shape: --resume_allow_config_change cannot override them
NEVER_FREE_KEYS = frozenset({"lora_rank", "lora_target_modules"})
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


def atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)




def _list_files(folder: str) -> dict:
    """{relative path: size} of every file under folder."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return out


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def storage_failure(exc: BaseException, root: str) -> str | None:
    """'no space left on <root> (N MiB free)' (or read-only, or gone) if `exc` is the storage refusing a write,
    else None. torch.save reports a full disk as 'unexpected pos A vs B' or 'file write failed', with no errno."""
    import errno
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain)
    where = root
    while where and not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free if where else 0
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left" in text or (
            ("unexpected pos" in text or "file write failed" in text) and free < 64 << 20):
        return f"no space left on {root} ({free / 2 ** 20:.1f} MiB free)"
    if errno.EROFS in codes:
        return f"{root} is on a read-only file system"
    if codes & {errno.EACCES, errno.EPERM}:
        return f"{root}: permission denied"
    return None


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
        if "sha256" in want and (got := file_sha256(path)) != want["sha256"]:
            raise CheckpointError(f"{path}: sha256 {got[:16]}... differs from the manifest's "
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
                 allow_config_change: bool = False, storage: str = "shared"):
        import uuid
        self.root, self.config, self.world_size, self.keep = ckpt_root, config, world_size, keep
        self.storage = storage
        self.allow_config_change = allow_config_change
        self.run_id = from_rank0(uuid.uuid4().hex)

    def save(self, engines: dict, step: int, client_state: dict) -> str:
        """Write step_N (see the class docstring). A write that fails for want of space (or a read-only or
        vanished folder) on any rank removes the half-written folder and raises CheckpointError on every rank,
        naming the path and the free space; the previous checkpoint stays the one --resume loads."""
        tag = f"step_{step}"
        final = os.path.join(self.root, tag)
        partial = final + ".partial"
        rank = dist.get_rank() if dist.is_initialized() else 0
        writer = self._writes_folder()
        with Phase.of("save_checkpoint"):
            if writer:
                os.makedirs(self.root, exist_ok=True)
                self._clean_leftovers()
            barrier()
            failure = None
            try:
                for name, engine in engines.items():
                    engine.save_checkpoint(partial, tag=name, client_state=client_state, save_latest=False)
                torch.save(rng_state(), os.path.join(partial, f"rng_rank{rank}.pt"))
            except (OSError, RuntimeError) as exc:
                failure = storage_failure(exc, self.root)
                if failure is None:
                    raise
            failures = [f for f in gather_objects(failure) if f]  # every rank learns it: all stop together
            if failures:
                self._abandon(partial, writer, step, failures[0])
            views = gather_objects(_list_files(partial) if os.path.isdir(partial) else {})
            manifest, failure = None, None
            if is_rank0():
                try:
                    manifest = self._manifest(partial, step, views)
                except OSError as exc:
                    failure = storage_failure(exc, self.root) or f"{partial}: {exc}"
            manifest, failure = from_rank0((manifest, failure))
            if failure is None and writer:
                try:
                    atomic_write_json(os.path.join(partial, MANIFEST), manifest)
                    self._publish(partial, final)
                    atomic_write_json(os.path.join(self.root, LATEST), {"tag": tag, "step": step, "time": time.time()})
                    self._prune(step)
                except OSError as exc:
                    failure = storage_failure(exc, self.root) or f"{partial}: {exc}"
            failures = [f for f in gather_objects(failure) if f]
            if failures:
                self._abandon(partial, writer, step, failures[0])
        return final

    def _writes_folder(self) -> bool:
        """Does this rank manage the checkpoint folder (make, publish, prune)? Rank 0 on shared storage; with
        per-node storage the first rank of every node, each in its own node's folder."""
        if self.storage == "per_node":
            return int(os.environ.get("LOCAL_RANK", 0)) == 0
        return is_rank0()

    def _manifest(self, partial: str, step: int, views: list[dict]) -> dict:
        """Every file any rank wrote (size, and sha256 where small and visible here) (rank 0)."""
        files = {}
        for view in views:
            for rel, size in view.items():
                files[rel] = max(size, files.get(rel, 0))
        if self.storage == "shared" and any(set(v) != set(files) for v in views):
            log.warning("%s: the ranks see different files; checkpoints need a folder every rank shares",
                        partial)
        for rel, size in files.items():
            entry = files[rel] = {"size": size}
            if size <= HASH_LIMIT and os.path.isfile(os.path.join(partial, rel)):
                entry["sha256"] = file_sha256(os.path.join(partial, rel))
        return {"version": 1, "step": step, "run_id": self.run_id, "world_size": self.world_size,
                "time": time.time(), "config": self.config, "files": files}

    def _abandon(self, partial: str, writer: bool, step: int, reason: str) -> None:
        """A save that cannot finish: its folder goes (it would keep the disk full), every rank raises."""
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        kept = step_folders(self.root)
        raise CheckpointError(f"{reason}: checkpoint step_{step} not written (its partial folder removed); "
                              + (f"{os.path.join(self.root, kept[0][1])} is still the newest checkpoint"
                                 if kept else "no earlier checkpoint exists"))

    def _clean_leftovers(self) -> None:
        """Half-written folders and temp files that only a killed save leaves behind (the folder's writer)."""
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
        choice = from_rank0(choice)
        if "error" in choice:
            raise CheckpointError(choice["error"])
        manifest = choice["manifest"]
        if manifest is None:
            return None
        step_dir = os.path.join(self.root, manifest["tag"])
        changes = config_changes({**manifest.get("config", {}), "world_size": manifest.get("world_size")},
                                 {**self.config, "world_size": self.world_size})
        fixed = [c for c in changes if c.split(":", 1)[0] in NEVER_FREE_KEYS]
        if fixed:
            raise ResumeConfigError(f"{step_dir}: --resume with " + "; ".join(fixed) + ": this cannot be overridden "
                                    "(--resume_allow_config_change does not apply: the checkpoint's adapters have "
                                    "another shape); pass the saved value, or start a fresh run")
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
    error = from_rank0(error)
    if error:
        raise OutputDirError(error)



LOCK_FILE = ".aplot_run.lock"


class OutputLock:
    """An exclusive lock on the output folder for the run's life, so two runs never write one folder.

    Rank 0 holds an flock(2) on output_dir/.aplot_run.lock (the kernel drops it when the process ends, even
    killed: a crashed run leaves no stale lock) and writes its host, pid and start time into the file, so a
    refused run says who holds it. Taking the lock is also the writability check: a read-only or
    unwritable --output_dir fails here, before any model loads. Every rank gets rank 0's verdict."""

    def __init__(self, output_dir: str):
        self.path, self._fh = os.path.join(output_dir, LOCK_FILE), None
        error = self._acquire() if is_rank0() else None
        error = from_rank0(error)
        if error:
            raise OutputDirError(error)

    def _acquire(self) -> str | None:
        import errno
        import fcntl
        import socket
        folder = os.path.dirname(self.path)
        try:
            fh = open(self.path, "a+")
        except OSError as exc:
            reason = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission "
                      "denied)", errno.ENOSPC: "has no space left"}.get(exc.errno, f"cannot be written ({exc})")
            return f"--output_dir {folder} {reason}"
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                return (f"--output_dir {folder} is in use by another run ({holder}): two runs would delete each "
                        "other's checkpoints; wait for it, or pass another --output_dir")
            log.warning("%s: the file system does not support locks (%s): nothing stops a second run from "
                        "writing this folder", self.path, exc)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
        except OSError as exc:
            fh.close()
            return f"--output_dir {folder} cannot be written ({exc})"
        self._fh = fh
        return None

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file drops the flock
            self._fh = None


PROBE_FILE = ".aplot_storage_probe"
# how long a rank looks for rank 0's probe: past NFS's usual directory attribute cache (acdirmin 30 s)
PROBE_WAIT_S = float(os.environ.get("APLOT_STORAGE_PROBE_WAIT_S", 45))


def check_shared_storage(output_dir: str, storage: str) -> None:
    """With several ranks, prove that every rank sees the folder rank 0 writes (checkpoints are written by all
    ranks and published by rank 0): rank 0 writes a token, every rank reads it back. A rank that cannot is a
    node with its own disk at that path: OutputDirError naming the path and the ranks, unless the user declared
    per-node storage (`--checkpoint_storage per_node`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or storage == "per_node":
        return
    import uuid
    token = from_rank0(uuid.uuid4().hex)
    path = os.path.join(output_dir, f"{PROBE_FILE}.{token}")  # a new name each run: no cached lookup of an old one
    if is_rank0():
        atomic_write_json(path, {"token": token})
    barrier()
    seen, deadline = False, time.time() + PROBE_WAIT_S
    while True:  # network file systems may show a new file to other nodes only after their attribute cache expires
        try:
            with open(path) as fh:
                seen = json.load(fh).get("token") == token
        except (OSError, ValueError):
            seen = False
        if seen or time.time() >= deadline:
            break
        time.sleep(0.5)
    blind = [r for r, ok in enumerate(gather_objects(seen)) if not ok]
    barrier()
    if is_rank0():
        os.remove(path)
    if blind:
        raise OutputDirError(
            f"--output_dir {output_dir} is not one folder for every rank: rank(s) {', '.join(map(str, blind[:8]))}"
            f"{' ...' if len(blind) > 8 else ''} cannot read what rank 0 writes there, so checkpoints would be "
            "split across nodes and --resume would find none; put it on storage every node mounts, or pass "
            "--checkpoint_storage per_node and copy each node's checkpoints/step_N into one folder before --resume")
