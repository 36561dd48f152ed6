"""Frequency control for periodic actions (saving, evaluation, logging)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional


class EpochStepTimeFreqCtl:
    """Fires every ``freq_epoch`` epochs, ``freq_step`` steps or ``freq_sec`` seconds.

    Unset triggers are ignored. Counters and the timer are measured since the
    last time :meth:`check` returned True, whichever trigger caused it. The
    state can be saved and restored so that a recovered run fires at the
    same points; ``time_fn`` is injectable for tests.
    """

    def __init__(
        self,
        freq_epoch: Optional[int] = None,
        freq_step: Optional[int] = None,
        freq_sec: Optional[float] = None,
        time_fn: Callable[[], float] = time.monotonic,
    ):
        for name, value in (
            ("freq_epoch", freq_epoch),
            ("freq_step", freq_step),
            ("freq_sec", freq_sec),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}.")
        self.freq_epoch = freq_epoch
        self.freq_step = freq_step
        self.freq_sec = freq_sec
        self._time_fn = time_fn
        self._epochs = 0
        self._steps = 0
        self._last_fire = time_fn()

    def check(self, epochs: int = 0, steps: int = 0) -> bool:
        """Account ``epochs``/``steps`` newly finished; True if the action is due."""
        self._epochs += epochs
        self._steps += steps
        now = self._time_fn()
        fire = (
            (self.freq_epoch is not None and self._epochs >= self.freq_epoch)
            or (self.freq_step is not None and self._steps >= self.freq_step)
            or (self.freq_sec is not None and now - self._last_fire >= self.freq_sec)
        )
        if fire:
            self._epochs = 0
            self._steps = 0
            self._last_fire = now
        return fire

    def time_since_last_fire(self) -> float:
        return self._time_fn() - self._last_fire

    def state_dict(self) -> Dict[str, Any]:
        # Store elapsed time rather than a clock reading: monotonic clocks
        # are not comparable across processes.
        return {
            "epochs": self._epochs,
            "steps": self._steps,
            "elapsed": self.time_since_last_fire(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._epochs = state["epochs"]
        self._steps = state["steps"]
        self._last_fire = self._time_fn() - state["elapsed"]
