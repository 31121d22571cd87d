"""Metrics to JSONL, tensorboard and (optionally) wandb, from rank 0 only."""
from __future__ import annotations

import json
import logging
import math
import os
import time

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append-only JSONL (survives resume), plus tensorboard and wandb when enabled."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, wandb_project: str = "",
                 run_config: dict | None = None, resume: bool = False):
        self.enabled = enabled
        self.tb = self.wandb = None
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
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
