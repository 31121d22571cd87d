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
        self.last_step, self.rows_at_last_step = None, 0
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
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows_at_last_step = self.rows_at_last_step + 1 if step == self.last_step else 1
        self.last_step = step
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def rows_at(self, step: int) -> int:
        """Rows this file holds for `step` (recorded in a checkpoint, so a resume keeps exactly those)."""
        return self.rows_at_last_step if step == self.last_step else 0

    def resume_at(self, step: int, rows_at_step: int | None = None) -> None:
        """Drop the rows a killed run logged after its checkpoint at `step`, so every step appears once.

        Rows past `step` go, and at `step` itself only the first `rows_at_step` rows stay (all when the
        checkpoint did not record it); a last row cut by the kill goes too, other lines stay. The file is
        replaced atomically.
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        kept, dropped, seen = [], 0, 0
        with open(self.path) as fh:
            for line in fh:
                try:
                    row_step = json.loads(line).get("step")
                except (json.JSONDecodeError, AttributeError):
                    if not line.endswith("\n"):  # the last row, cut by the kill
                        dropped += 1
                        continue
                    row_step = None
                if isinstance(row_step, int) and row_step == step:
                    seen += 1
                if isinstance(row_step, int) and (row_step > step or (
                        row_step == step and rows_at_step is not None and seen > rows_at_step)):
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as fh:
                fh.writelines(kept)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            log.warning("%s: dropped %d row(s) logged after the checkpoint at step %d", self.path, dropped, step)
        self.last_step, self.rows_at_last_step = step, min(seen, rows_at_step) if rows_at_step is not None else seen

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
