"""Metrics to JSONL, tensorboard and (optionally) wandb, from rank 0 only."""
from __future__ import annotations

import json
import logging
import math
import os
import time

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append-only JSONL (a resume drops the rows past its checkpoint), plus tensorboard and wandb when enabled."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, wandb_project: str = "",
                 run_config: dict | None = None, resume: bool = False):
        self.enabled = enabled
        self.tb = self.wandb = None
        self.resumed_step, self.resumed_rows = None, set()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if not resume and os.path.exists(self.path):
            # a fresh run in a used folder: keep the old rows, but never mix them into this run's file
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(self.path)))
            old, n = os.path.join(output_dir, f"metrics.{stamp}.jsonl"), 1
            while os.path.exists(old):
                old, n = os.path.join(output_dir, f"metrics.{stamp}-{n}.jsonl"), n + 1
            os.replace(self.path, old)
            log.warning("%s held an earlier run's metrics: moved to %s", self.path, old)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
            except ImportError:
                log.warning("tensorboard not installed: metrics go to %s only", self.path)
        if wandb_project:
            import wandb  # optional dependency: fail loudly if asked for and missing
            self.wandb = wandb.init(project=wandb_project, config=run_config or {}, dir=output_dir)

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        if step == self.resumed_step and frozenset(row) in self.resumed_rows:
            self._drop_resumed(step, frozenset(row))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def resume_at(self, step: int) -> None:
        """Drop the rows a killed run logged after its checkpoint at `step`, so every step appears once.

        Rows past `step` go, and so does a last row cut by the kill; other lines stay, and the file is
        replaced atomically. Rows at `step` stay until a row with the same keys is logged again at
        `step` (a run resumed at its last step repeats the final eval): that one replaces them.
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        kept, dropped = [], 0
        with open(self.path) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                    if not line.endswith("\n"):  # the last row, cut by the kill
                        dropped += 1
                        continue
                row_step = row.get("step") if isinstance(row, dict) else None
                if isinstance(row_step, int) and row_step > step:
                    dropped += 1
                    continue
                if row_step == step:
                    self.resumed_rows.add(frozenset(row))
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            self._rewrite(kept)
            log.warning("%s: dropped %d row(s) logged after the checkpoint at step %d", self.path, dropped, step)
        self.resumed_step = step

    def _rewrite(self, lines: list[str]) -> None:
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _drop_resumed(self, step: int, keys: frozenset) -> None:
        """Remove the rows at the resumed step with these keys: the row being logged supersedes them."""
        self.resumed_rows.discard(keys)
        with open(self.path) as fh:
            lines = fh.readlines()

        def same(line):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(row, dict) and row.get("step") == step and frozenset(row) == keys
        self._rewrite([line for line in lines if not same(line)])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class MetricsWindow:
    """Per-step metric dicts collected between two log lines, reduced to their mean over the interval.

    A logged row with log_steps = N is the average of the N steps it covers, not the last step's values.
    Keys missing from some steps (e.g. APLOT diagnostics) average over the steps that have them.
    """

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.rows.append(metrics)

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str]:
        return sorted({k for r in self.rows for k in r})

    def local_means(self, keys: list[str], device=None):
        """[len(keys)] fp64 tensor of this rank's means over the window (NaN-skipping), on `device`.

        Values may be floats or 0-dim tensors still on the accelerator: they are stacked there, so the
        window costs no host sync until the caller reads the result."""
        import torch
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
        table = torch.stack([torch.stack([torch.as_tensor(r[k], dtype=torch.float64).to(device) if k in r else nan
                                          for k in keys]) for r in self.rows])
        return table.nanmean(0)

    def means(self, device=None) -> dict:
        """{key: this rank's mean over the window} as 0-dim fp64 tensors on `device` (no host sync)."""
        keys = self.keys()
        return dict(zip(keys, self.local_means(keys, device)))

    def clear(self) -> None:
        self.rows = []

