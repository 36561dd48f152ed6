"""Stopping a run that went wrong, with one line that says why.

* :class:`HeartbeatWatchdog` (used by the launcher while it waits): every
  worker refreshes its status from a background thread, so a frozen process
  (SIGSTOP, a hung host) stops refreshing while a busy one keeps going. A
  worker whose heartbeat is older than ``stale_after_s`` is reported by
  name and pid, and the launcher stops the whole run.
* :func:`fatal_message` reads the one-line explanations that workers publish
  when they stop with :class:`~realhf.system.worker_base.FatalError`.
* :func:`check_finite_stats` turns a non-finite training statistic into such
  an error, naming the call and the step, before anything of that step is saved.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Iterable, List, Optional

from realhf.scheduler.client import JobException
from realhf.system.worker_base import FatalError, WorkerServerStatus
from realhf.system.worker_control import get_worker_status

DEFAULT_STALE_AFTER_S = 30.0
# Stats whose non-finite value means the parameters are (or are about to be) garbage.
_GUARDED_STATS = ("loss", "grad_norm")
_LIVE = (WorkerServerStatus.READY, WorkerServerStatus.RUNNING, WorkerServerStatus.PAUSED)


class RunStopped(JobException):
    """A run stopped for a reason that fits in one line (no log tail, no traceback)."""

    def __init__(self, run_name: str, worker: str, message: str, exit_code: Optional[int] = None):
        worker_type, _, index = worker.partition("/")
        super().__init__(run_name, worker_type, None, message,
                         worker_index=int(index) if index.isdigit() else None, exit_code=exit_code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class HeartbeatWatchdog:
    """Finds workers whose published heartbeat is older than ``stale_after_s``.

    Workers that have not published yet (still starting) or have finished are
    not judged: only a live status with an old heartbeat counts.
    """

    def __init__(self, experiment: str, trial: str, worker_names: Iterable[str],
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, check_interval_s: float = 1.0):
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}.")
        self.experiment, self.trial = experiment, trial
        self.worker_names = list(worker_names)
        self.stale_after_s = stale_after_s
        self.check_interval_s = check_interval_s
        self._last_check = 0.0

    def stale(self) -> Optional[RunStopped]:
        """The stalest worker past the threshold, as the error to stop the run with (None if all fresh)."""
        now = time.monotonic()
        if now - self._last_check < self.check_interval_s:
            return None
        self._last_check = now
        worst = None
        for name in self.worker_names:
            # A huge lost_after_s keeps the raw status; the age is judged here.
            info = get_worker_status(self.experiment, self.trial, name, lost_after_s=float("inf"))
            if info.status not in _LIVE or info.heartbeat is None:
                continue
            age = time.time() - info.heartbeat
            if age > self.stale_after_s and (worst is None or age > worst[1]):
                worst = (info, age)
        if worst is None:
            return None
        info, age = worst
        msg = (f"{info.worker_name} (pid {info.pid}) sent no heartbeat for {age:.0f} s "
               f"(limit {self.stale_after_s:g} s); the process is frozen or its host is gone, "
               "so the run was stopped")
        return RunStopped(f"{self.experiment}_{self.trial}", info.worker_name, msg)


def fatal_message(experiment: str, trial: str, worker_names: Iterable[str]) -> Optional[str]:
    """The first one-line explanation a worker published when it stopped with FatalError."""
    for name in worker_names:
        info = get_worker_status(experiment, trial, name)
        if info.fatal and info.error:
            return f"{name}: {info.error}"
    return None


def _guarded(key: str) -> bool:
    return key in _GUARDED_STATS or key.endswith(tuple(s + g for g in _GUARDED_STATS for s in ("_", "/")))


def check_finite_stats(call: str, stats: Dict[str, float], global_step: int, epoch: int,
                       epoch_step: int) -> None:
    """Raise FatalError if a guarded statistic (loss, grad norm) of ``call`` is NaN or infinite.

    ``epoch`` is 1-based, ``epoch_step`` and ``global_step`` count the step
    being run (1-based), as in the step log line.
    """
    if stats.get("skipped_step"):
        return  # a loss-scaler overflow: no update was applied, the scaler retries
    bad: List[str] = [f"{k}={v}" for k, v in stats.items() if _guarded(k) and not math.isfinite(v)]
    if bad:
        raise FatalError(
            f"{call} produced non-finite {', '.join(bad)} at global step {global_step} "
            f"(epoch {epoch} step {epoch_step}); stopped before saving anything of this step "
            "(lower the learning rate or check the data)")
