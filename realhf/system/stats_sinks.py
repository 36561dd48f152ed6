"""Where the master's step and evaluation statistics go besides ``stats.jsonl``.

Both sinks get the same flat scalars (:func:`scalars_of`), so a curve in
tensorboard has the same name and steps as in wandb: ``<call>/<stat>`` per
training call, ``eval/<call>/<stat>`` per evaluation, and ``step/seconds``,
``step/tokens_per_s``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from realhf.base import logging

logger = logging.getLogger("stats_sinks")


def scalars_of(rec: Dict[str, Any]) -> Dict[str, float]:
    """The plottable numbers of one stats.jsonl record."""
    out: Dict[str, float] = {}
    groups = rec.get("stats") or {f"eval/{k}": v for k, v in rec.get("eval", {}).items()}
    for call, stats in groups.items():
        for k, v in stats.items():
            out[f"{call}/{k}"] = v
    if "seconds" in rec:
        out["step/seconds"] = rec["seconds"]
        out["step/tokens_per_s"] = rec["n_tokens"] / max(rec["seconds"], 1e-9)
    return out


class TensorboardSink:
    """A SummaryWriter under ``<log dir>/tensorboard``; inactive when tensorboard is not installed."""

    def __init__(self, log_dir: str):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        except ImportError:
            logger.info("tensorboard is not installed; step statistics go to stats.jsonl only.")

    def log(self, rec: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in scalars_of(rec).items():
            self.writer.add_scalar(k, v, rec["global_step"])
        self.writer.flush()


class WandbSink:
    """One wandb run per trial (project = experiment name, run name = trial name), files in the log dir.

    The quickstart configs refuse ``wandb_mode`` other than "disabled" when
    wandb is not installed, so the import here only fails for hand-built configs.
    """

    def __init__(self, mode: str, experiment: str, trial: str, log_dir: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode=mode, project=experiment, name=trial, dir=log_dir)

    def log(self, rec: Dict[str, Any]) -> None:
        self.wandb.log(scalars_of(rec), step=rec["global_step"])

    def close(self) -> None:
        self.wandb.finish()


def make_wandb_sink(mode: Optional[str], experiment: str, trial: str, log_dir: str) -> Optional[WandbSink]:
    if mode in (None, "disabled"):
        return None
    if mode not in ("online", "offline"):
        raise ValueError(f"wandb_mode must be 'online', 'offline' or 'disabled', got {mode!r}.")
    return WandbSink(mode, experiment, trial, log_dir)
