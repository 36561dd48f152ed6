"""Dynamic loss scaling for fp16 parameters.

fp16 gradients underflow for small losses, so the loss is multiplied by a
large factor before backward and the gradients divided by it afterwards.
When any gradient overflows, the step is skipped and the factor shrinks;
after ``growth_interval`` clean steps it grows again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict


@dataclasses.dataclass
class DynamicLossScaler:
    """Loss scale that backs off on overflow and grows after clean steps."""

    scale: float = 4096.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    min_scale: float = 1.0
    clean_steps: int = 0

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"initial loss scale must be positive, got {self.scale}.")
        if self.growth_factor <= 1.0 or not 0.0 < self.backoff_factor < 1.0:
            raise ValueError("Loss scaler needs growth_factor > 1 and 0 < backoff_factor < 1.")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}.")

    def update(self, found_inf: bool) -> None:
        """Record one step's outcome (``found_inf``: some gradient was not finite)."""
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
