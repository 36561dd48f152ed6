"""Optimizer settings, learning-rate schedules and a flat-buffer AdamW.

The model keeps every parameter of a stage in one flat buffer, so the
optimizer works on flat 1-D tensors (or a contiguous slice of them under
ZeRO-1) instead of on a list of parameters: one fused update per step and a
trivial way to shard states across data-parallel ranks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

# One-pass AdamW kernel (CPU and CUDA); the unfused update below is the reference.
_HAS_FUSED_ADAMW = hasattr(torch, "_fused_adamw_")

LR_SCHEDULER_TYPES = ("constant", "linear", "cosine")
OPTIMIZER_TYPES = ("adam", "empty")


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer and LR schedule of a trainable model.

    :param type: "adam" or "empty"; training backends always build AdamW, the
        field only tells whether a model is meant to be trained.
    :param lr: peak learning rate.
    :param weight_decay: decoupled weight decay (not applied to 1-D tensors
        such as norms and biases).
    :param beta1: Adam first-moment decay.
    :param beta2: Adam second-moment decay.
    :param eps: Adam denominator epsilon.
    :param min_lr_ratio: final LR of a decaying schedule, as a fraction of lr.
    :param lr_scheduler_type: "constant", "linear" or "cosine" after warmup.
    :param warmup_steps_proportion: fraction of all steps spent warming up.
    :param offload: keep optimizer states on the host (ignored here: this
        backend keeps them wherever the parameters are).
    """

    type: str = "empty"
    lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    min_lr_ratio: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_steps_proportion: float = 0.02
    offload: bool = False

    def __post_init__(self):
        if self.type not in OPTIMIZER_TYPES:
            raise ValueError(f"OptimizerConfig.type must be one of {OPTIMIZER_TYPES}, got {self.type!r}.")
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise ValueError(
                f"OptimizerConfig.lr_scheduler_type must be one of {LR_SCHEDULER_TYPES}, "
                f"got {self.lr_scheduler_type!r}."
            )
        if not self.lr >= 0:
            raise ValueError(f"OptimizerConfig.lr must be >= 0, got {self.lr}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}.")
        for f in ("beta1", "beta2"):
            v = getattr(self, f)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"OptimizerConfig.{f} must be in [0, 1), got {v}.")
        if not self.eps > 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0, got {self.eps}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if not 0.0 <= self.warmup_steps_proportion <= 1.0:
            raise ValueError(
                f"OptimizerConfig.warmup_steps_proportion must be in [0, 1], got {self.warmup_steps_proportion}."
            )


def warmup_steps(total_steps: int, cfg: OptimizerConfig) -> int:
    return int(cfg.warmup_steps_proportion * total_steps)


def make_lr_lambda(total_steps: int, cfg: OptimizerConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` for the step with 0-based index ``step``.

    With ``W = int(warmup_steps_proportion * total_steps)``:
    warmup ``step < W`` gives ``(step + 1) / W`` (the first step already moves
    the weights); afterwards, with ``r = (step - W) / max(1, total_steps - W)``
    clamped to [0, 1] and ``m = min_lr_ratio``:
    constant -> 1; linear -> ``m + (1 - m)(1 - r)``;
    cosine -> ``m + (1 - m) * 0.5 * (1 + cos(pi r))``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    w = warmup_steps(total_steps, cfg)
    m = cfg.min_lr_ratio
    kind = cfg.lr_scheduler_type
    decay_steps = max(1, total_steps - w)

    def lr_lambda(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if kind == "constant":
            return 1.0
        r = min(1.0, max(0.0, (step - w) / decay_steps))
        if kind == "linear":
            return m + (1.0 - m) * (1.0 - r)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * r))

    return lr_lambda


class FlatAdamW:
    """AdamW over one flat fp32 tensor (a whole buffer or one rank's shard).

    ``decay_mask`` (same shape, 0/1) switches weight decay off per element,
    which lets norms and biases live in the same buffer as matrices.
    """

    # Past this many runs of equal mask values, one masked pass beats per-run kernel calls.
    MAX_DECAY_RUNS = 256

    def __init__(self, param: torch.Tensor, cfg: OptimizerConfig, decay_mask: Optional[torch.Tensor] = None):
        if param.dim() != 1 or param.dtype != torch.float32:
            raise ValueError("FlatAdamW expects a 1-D float32 tensor.")
        self.param = param
        self.cfg = cfg
        self.decay_mask = decay_mask
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.step_count = 0
        self.decay_runs = _mask_runs(decay_mask, self.MAX_DECAY_RUNS) if decay_mask is not None else None

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: float) -> None:
        c = self.cfg
        g = grad.float()
        if _HAS_FUSED_ADAMW and self.param.device.type in ("cpu", "cuda"):
            self._fused_step(g, lr)
            return
        self.step_count += 1
        if c.weight_decay > 0 and lr > 0:
            if self.decay_mask is None:
                self.param.mul_(1.0 - lr * c.weight_decay)
            else:
                self.param.addcmul_(self.param, self.decay_mask, value=-lr * c.weight_decay)
        self.exp_avg.mul_(c.beta1).add_(g, alpha=1.0 - c.beta1)
        self.exp_avg_sq.mul_(c.beta2).addcmul_(g, g, value=1.0 - c.beta2)
        bc1 = 1.0 - c.beta1 ** self.step_count
        bc2 = 1.0 - c.beta2 ** self.step_count
        denom = (self.exp_avg_sq / bc2).sqrt_().add_(c.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-lr / bc1)

    def _fused_step(self, g: torch.Tensor, lr: float) -> None:
        """The same update in one pass over the buffers (torch's fused AdamW kernel).

        With a decay mask, the decayed and the undecayed runs of the buffer go
        to two kernel calls with their own weight decay; a mask too fragmented
        for that is applied first, as the decoupled decay it is.
        """
        c = self.cfg
        decay = c.weight_decay if lr > 0 else 0.0
        self.step_count += 1
        step = torch.tensor(float(self.step_count), device=self.param.device)  # the step being taken
        if decay > 0 and self.decay_mask is not None:
            if self.decay_runs is None:
                self.param.addcmul_(self.param, self.decay_mask, value=-lr * decay)
                decay = 0.0
            else:
                for runs, wd in ((self.decay_runs[1], decay), (self.decay_runs[0], 0.0)):
                    if runs:
                        self._fused_call(g, runs, step, lr, wd)
                return
        self._fused_call(g, [(0, self.param.numel())], step, lr, decay)

    def _fused_call(self, g: torch.Tensor, runs, step: torch.Tensor, lr: float, wd: float) -> None:
        c = self.cfg
        views = [[t[s:e] for s, e in runs] for t in (self.param, g, self.exp_avg, self.exp_avg_sq)]
        torch._fused_adamw_(*views, [], [step] * len(runs), lr=lr, beta1=c.beta1, beta2=c.beta2,
                            weight_decay=wd, eps=c.eps, amsgrad=False, maximize=False)

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step_count = int(state["step"])


def _mask_runs(mask: torch.Tensor, max_runs: int):
    """``(undecayed, decayed)`` lists of ``(start, end)`` runs of a 0/1 mask, or
    None when the mask has more than ``max_runs`` runs."""
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return [], []
    change = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
    if change.numel() + 1 > max_runs:
        return None
    bounds = [0] + change.tolist() + [flat.numel()]
    out = ([], [])
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[int(flat[s].item() != 0)].append((s, e))
    return out
