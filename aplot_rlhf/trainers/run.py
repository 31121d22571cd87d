"""The scaffold both training jobs stand on: what a run does before, around and after its own step.

A trainer (trainers/rm.py, trainers/ppo.py) starts a `Run` and then describes only its job: its data, its
models, one step of training. The Run owns the rest, so a change to how runs start, log, checkpoint or
resume is made here once:

  start      process group, seeds, device, the output folder (an earlier run in it is refused or moved aside)
  load       the ZeRO-3 context models are built in (transformers partitions at load by one global config)
  resume     metrics logger, checkpointer, the newest complete checkpoint restored, config.json written
  loop       step -> one metrics row per log interval (its mean, over ranks) -> progress bar -> the trainer's
             periodic work (evaluation) -> checkpoint every save_steps -> stop on preemption; a final checkpoint
  close      signal handlers back, logger closed, process group down

A trainer handed to `Run.loop` has `position` (steps done: RM optimizer steps, PPO iterations), `train_step()`
(one step, returning the metric dicts it produced, still on the device), `log_row(window, seconds)` (the
row for a log interval), `after_step()` (periodic work) and `checkpoint_state()` (engines and client state).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch

from ..config import save_config, to_dict
from ..engine import checkpoint as ckpt
from ..engine import deepspeed as ds_api
from ..engine import distributed as comm
from ..engine import preemption as preemption
from ..metrics import MetricsLogger, MetricsWindow

log = logging.getLogger(__name__)


def rank_shard(items: list, rank: int, world: int) -> tuple[list, list[bool]]:
    """Rank `rank`'s share of `items`, and which of its entries count.

    Every rank gets the same number of entries (ZeRO-3 gathers are collective): the last shards are padded
    with the last item, whose extra results do not count; the ranks' results gathered in rank order, first
    len(items) kept, are the items' results in order."""
    per_rank = math.ceil(len(items) / world)
    own = range(rank * per_rank, (rank + 1) * per_rank)
    return [items[min(i, len(items) - 1)] for i in own], [i < len(items) for i in own]


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


class Run:
    def __init__(self, cfg, job: str):
        """job: the progress bar's name and the prefix of the logged training rows ('rm', 'ppo')."""
        self.cfg, self.job = cfg, job
        started = preemption.process_start_time()
        self.rank, self.world, self.local_rank = ds_api.init_distributed(cfg.dist_backend, cfg.timeout_s)
        comm.seed_everything(cfg.seed)
        self.device = comm.device()
        self.is_rank0 = comm.is_rank0()
        if not (cfg.progress and self.is_rank0):  # transformers' own bars too (loading, "Writing model shards")
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
        except OSError as exc:
            raise ckpt.OutputDirError(f"--output_dir {cfg.output_dir} cannot be created ({exc.strerror})") from None
        # before anything is written or loaded: one run per folder (the lock is also the writability check),
        # one folder for every rank, an earlier run refused or moved aside, stale stop requests served
        self.lock = ckpt.OutputLock(cfg.output_dir)
        ckpt.check_shared_storage(cfg.output_dir, cfg.checkpoint_storage)
        ckpt.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir)
        preemption.clear_stale_requests(cfg.output_dir, started)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.logger = self.checkpoints = self.preempt = None
        self.preempted = False
        self._ds_cfg = None    # the run's DeepSpeed config: ZeRO-3 partitioning follows it outside `loading`
        self._hf_ds = None     # transformers keeps only a weak reference to it: held here for the whole run

    # ------------------------------------------------------------------------------------- models
    def use_ds_config(self, ds_cfg: dict) -> None:
        """The DeepSpeed config of the run's trained model; HF generation under ZeRO-3 reads it too."""
        self._ds_cfg, self._hf_ds = ds_cfg, ds_api.zero3_context(ds_cfg)

    @contextlib.contextmanager
    def loading(self, ds_cfg: dict):
        """Models built inside are partitioned (ZeRO-3) as `ds_cfg` says; the run's own config is back after."""
        if ds_cfg is self._ds_cfg:
            yield
            return
        self._hf_ds = ds_api.zero3_context(ds_cfg)
        try:
            yield
        finally:
            self._hf_ds = ds_api.zero3_context(self._ds_cfg)

    # ------------------------------------------------------------------------------------- resume
    def resume(self, engines: dict) -> dict | None:
        """Metrics logger and checkpointer; with --resume the newest complete checkpoint is loaded into
        `engines` and its client state returned (None: a fresh start). config.json is written last, so a
        refused resume or a refused folder keeps the earlier run's file."""
        cfg = self.cfg
        self.logger = MetricsLogger(cfg.output_dir, self.is_rank0, cfg.tensorboard, cfg.wandb_project,
                                    run_config=vars(cfg), resume=cfg.resume)
        self.checkpoints = ckpt.Checkpointer(self.ckpt_root, to_dict(cfg), self.world, cfg.save_total_limit,
                                            cfg.resume_allow_config_change, cfg.checkpoint_storage)
        state = None
        if cfg.resume:
            state = self.checkpoints.load(engines)
            if state is None:
                log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_root)
        if self.is_rank0:
            save_config(cfg, os.path.join(cfg.output_dir, "config.json"))
        return state

    def resumed_at(self, step: int, where: str) -> None:
        """The trainer restored its position from the checkpoint (`where`, for the log): rows logged after
        it are dropped."""
        self.logger.resume_at(step)
        log.info("resumed at %s", where)

    def watch_preemption(self) -> None:
        """From now on a signal or output_dir/PREEMPT stops the run after its current step (`loop`); a PREEMPT
        made while the run was setting up is honoured before the first step. PPO calls it after its rollout
        engine has started: the engine may install signal handlers of its own."""
        self.preempt = preemption.Preemption(self.cfg.output_dir, self.cfg.preempt_signals)

    # ------------------------------------------------------------------------------------- metrics
    def reduce(self, metrics: dict) -> dict:
        """Means over ranks of this rank's values (floats or 0-dim tensors, on the device or not); a rank
        whose value is NaN (a correlation over a constant batch, say) is left out of that key's mean
        instead of turning it NaN. One host sync."""
        keys = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).to(self.device) for k in keys])
        return dict(zip(keys, comm.all_reduce_finite_mean(values).cpu().tolist()))

    def shard(self, items: list) -> tuple[list, list[bool]]:
        """This rank's share of `items` for a sharded evaluation (`rank_shard`)."""
        return rank_shard(items, self.rank, self.world)

    def progress(self, total: int, initial: int):
        if not (self.cfg.progress and self.is_rank0):
            return _NoProgress()
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=self.job, dynamic_ncols=True)

    # ------------------------------------------------------------------------------------- loop
    def save(self, trainer) -> None:
        engines, client_state = trainer.checkpoint_state()
        self.checkpoints.save(engines, trainer.position, client_state)

    def loop(self, trainer, total: int, prefix: str, postfix) -> bool:
        """Steps `trainer` until `total`; True if a preemption stopped it (its checkpoint is written).

        Every log_steps steps one row: `trainer.log_row` over the interval's metrics. postfix(row) -> the
        progress bar's fields. A checkpoint every save_steps and one at the end."""
        cfg = self.cfg
        bar = self.progress(total, trainer.position)
        window, t0 = MetricsWindow(), time.perf_counter()
        if trainer.position < total and self.preempt.requested():  # asked to stop while the run was setting up
            log.warning("a stop was requested during set-up: exiting before the first step (nothing new to save)")
            self.preempt.finish(trainer.position)
            self.preempted = True
        while trainer.position < total and not self.preempted:
            for metrics in trainer.train_step():
                window.add(metrics)
            position = trainer.position
            if position % cfg.log_steps == 0 or position == total:
                row = trainer.log_row(window, time.perf_counter() - t0)
                self.logger.log(position, row, prefix=prefix)
                bar.set_postfix(**postfix(row))
                window, t0 = MetricsWindow(), time.perf_counter()
            bar.update(1)
            trainer.after_step()
            saved = cfg.save_steps and position % cfg.save_steps == 0 and position < total
            if saved:
                self.save(trainer)
            if self.preempt.requested():  # all ranks agree, after the same step
                if not saved:
                    self.save(trainer)
                self.preempt.finish(position)
                self.preempted = True
                break
        bar.close()
        if not self.preempted:
            self.save(trainer)
        return self.preempted

    # ------------------------------------------------------------------------------------- close
    def close(self) -> None:
        if self.preempt is not None and not self.preempted:  # a preempted run ignores later signals until exit
            self.preempt.restore()
        if self.logger is not None:
            self.logger.close()
        self.lock.release()
        comm.shutdown()


def train_to_the_end(trainer, summary) -> dict:
    """What a training CLI does with a configured trainer: set up, train, and on rank 0 print `summary` of the
    results as one JSON line; a preempted run exits with PREEMPT_EXIT_CODE (its checkpoint written) so the
    scheduler requeues it. The trainer is closed however it ends."""
    import json
    trainer.setup()
    try:
        results = trainer.train()
        if trainer.preempted:
            raise SystemExit(preemption.PREEMPT_EXIT_CODE)
        if trainer.rank == 0:
            print(json.dumps(summary(results)))
        return results
    finally:
        trainer.close()
