"""PPO building blocks over packed (padding-free) batches.

Layouts used throughout (``bs`` sequences of lengths ``L_i``):

* full: ``sum(L_i)`` entries, sequence ``i`` at ``cu_seqlens[i]:cu_seqlens[i+1]``
  (token ids, values, prompt masks);
* shifted: ``sum(L_i - 1)`` entries, sequence ``i`` at
  ``short1cu_seqlens[i]:short1cu_seqlens[i+1]`` with
  ``short1cu_seqlens = cu_seqlens - arange(bs + 1)``; entry ``t`` belongs to
  the transition "token t -> token t+1" (log-probs, rewards, advantages,
  returns, loss masks).

Every function is pure torch and works on any device.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from realhf.impl.model.utils.functional import masked_normalization

Stats = Dict[str, torch.Tensor]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the true entries of ``mask`` (0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def actor_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    loss_mask: torch.Tensor,
    early_stop_imp_ratio: Optional[float] = None,
    early_stop_kl: Optional[float] = None,
) -> Tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate loss, masked mean over the shifted tokens.

    All inputs have the same shape (usually ``[sum(L_i - 1)]``); ``loss_mask``
    is bool (True = trained token). With ``r = exp(logprobs - old_logprobs)``::

        loss = masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))

    When the masked mean of ``r`` exceeds ``early_stop_imp_ratio`` (or the
    approximate KL exceeds ``early_stop_kl``) the loss is multiplied by 0
    (no update, the graph is kept so a backward still works).

    :return: ``(loss, stats)`` with scalar tensor stats ``approx_kl`` (masked
        mean of ``old_logprobs - logprobs``), ``clip_ratio`` (fraction of
        tokens where the clipped term is used), ``importance_weight`` (masked
        mean ratio) and ``early_stop`` (1.0 when the loss was zeroed).
    """
    mask = loss_mask.bool()
    logprobs = logprobs.float()
    old_logprobs = old_logprobs.float()
    advantages = advantages.float().detach()
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    per_token = torch.maximum(surr1, surr2)
    loss = _masked_mean(per_token, mask)

    with torch.no_grad():
        clipped = (surr2 > surr1) & mask
        clip_ratio = _masked_mean(clipped.float(), mask)
        imp = _masked_mean(ratio.detach(), mask)
        approx_kl = _masked_mean(-log_ratio.detach(), mask)
        stop = False
        if early_stop_imp_ratio is not None and float(imp) > early_stop_imp_ratio:
            stop = True
        if early_stop_kl is not None and float(approx_kl) > early_stop_kl:
            stop = True
    if stop:
        loss = loss * 0.0
    stats = {
        "approx_kl": approx_kl,
        "clip_ratio": clip_ratio,
        "importance_weight": imp,
        "early_stop": torch.tensor(float(stop), device=loss.device),
    }
    return loss, stats


def _elementwise_value_loss(x: torch.Tensor, y: torch.Tensor, loss_type: str, huber_delta: float) -> torch.Tensor:
    if loss_type == "mse":
        return 0.5 * (x - y).square()
    if loss_type == "huber":
        return torch.nn.functional.huber_loss(x, y, reduction="none", delta=huber_delta)
    raise ValueError(f"Unknown value loss type '{loss_type}' (expected 'mse' or 'huber').")


def critic_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    value_eps_clip: float,
    loss_mask: torch.Tensor,
    loss_type: str = "mse",
    huber_delta: float = 10.0,
) -> Tuple[torch.Tensor, Stats]:
    """Clipped value loss, masked mean.

    With ``v_c = old + clip(v - old, -eps, eps)`` the per-token loss is
    ``max(f(v, R), f(v_c, R))`` where ``f(x, y) = 0.5 (x - y)^2`` ("mse") or
    the Huber loss with ``huber_delta`` ("huber", which equals the mse one
    for ``|x - y| <= delta``). Inputs share one shape.

    :return: ``(loss, {"value_clip_ratio": fraction of tokens whose clipped
        term is larger})``.
    """
    mask = loss_mask.bool()
    values = values.float()
    old_values = old_values.float().detach()
    returns = returns.float().detach()
    clipped_v = old_values + (values - old_values).clamp(-value_eps_clip, value_eps_clip)
    l_orig = _elementwise_value_loss(values, returns, loss_type, huber_delta)
    l_clip = _elementwise_value_loss(clipped_v, returns, loss_type, huber_delta)
    loss = _masked_mean(torch.maximum(l_orig, l_clip), mask)
    with torch.no_grad():
        # Only where clipping changed the value (else rounding could flag ties).
        changed = (values - old_values).abs() > value_eps_clip
        clip_ratio = _masked_mean((changed & (l_clip > l_orig) & mask).float(), mask)
    return loss, {"value_clip_ratio": clip_ratio}


# --------------------------------------------------------------------------- #
# KL controllers
# --------------------------------------------------------------------------- #
class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_ctl: float):
        self.value = float(kl_ctl)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller of Ziegler et al. (2019).

    ``update(kl, n)``: ``err = clip(kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + err * n / horizon``.
    """

    def __init__(self, init_kl_ctl: float, target: float = 6.0, horizon: float = 10000.0):
        super().__init__(init_kl_ctl)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}.")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * float(n_steps) / self.horizon


# --------------------------------------------------------------------------- #
# Rewards and GAE
# --------------------------------------------------------------------------- #
def short1_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Boundaries of the shifted layout from the full-layout ones."""
    return cu_seqlens - torch.arange(cu_seqlens.numel(), device=cu_seqlens.device, dtype=cu_seqlens.dtype)


def shaped_rewards(
    kl_ctl: float,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    reward_score: torch.Tensor,
    short1cu_seqlens: torch.Tensor,
    seq_no_eos_mask: torch.Tensor,
    max_reward_clip: float,
    loss_mask: Optional[torch.Tensor] = None,
    reward_scaling: float = 1.0,
    reward_bias: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards in the shifted layout.

    :param old_logp, ref_logp: float ``[sum(L_i - 1)]``.
    :param reward_score: float ``[bs]``, one scalar score per sequence.
    :param short1cu_seqlens: int ``[bs + 1]`` shifted boundaries.
    :param seq_no_eos_mask: bool ``[bs]``, True when the sequence was truncated.
    :param loss_mask: bool ``[sum(L_i - 1)]``; KL rewards are zeroed where False.
    :return: ``(kl_rewards, rewards)``: ``kl_rewards = -kl_ctl * (old - ref)``
        (masked), and ``rewards`` = ``kl_rewards`` plus
        ``clip((score - bias) * scaling, -max_reward_clip, max_reward_clip)``
        at each sequence's last shifted position when it ended with EOS.
    """
    kl = old_logp.float() - ref_logp.float()
    if loss_mask is not None:
        kl = kl * loss_mask.to(kl.dtype)
    kl_rewards = -float(kl_ctl) * kl
    score = ((reward_score.float().to(kl.device) - reward_bias) * reward_scaling).clamp(
        -max_reward_clip, max_reward_clip)
    score = torch.where(seq_no_eos_mask.to(kl.device).bool(), torch.zeros_like(score), score)
    ends = short1cu_seqlens[1:].long().to(kl.device) - 1
    lens = (short1cu_seqlens[1:] - short1cu_seqlens[:-1]).to(kl.device)
    if bool((lens < 1).any()):
        raise ValueError("Every sequence needs at least two tokens (one shifted position).")
    rewards = kl_rewards.clone()
    rewards.index_add_(0, ends, score)
    return kl_rewards, rewards


def get_packed_advantages_and_returns(
    gamma: float,
    lam: float,
    values: torch.Tensor,
    rewards: torch.Tensor,
    short1cu_seqlens: torch.Tensor,
    seq_no_eos_mask: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE over a packed batch with the native ``gae_1d`` operator.

    :param values: float ``[sum(L_i)]`` (full layout): ``V(s_t)`` for every
        token; a sequence's last value is the bootstrap value, used only when
        ``seq_no_eos_mask`` is True (truncated); finished sequences use 0.
    :param rewards: float ``[sum(L_i - 1)]`` (shifted layout).
    :param short1cu_seqlens: int ``[bs + 1]`` shifted boundaries.
    :param seq_no_eos_mask: bool ``[bs]``.
    :return: ``(advantages, returns)`` float ``[sum(L_i - 1)]``, ``returns =
        advantages + values[:-1 of each sequence]``.
    """
    from realhf.impl.ops import gae_1d

    device = rewards.device
    short1 = short1cu_seqlens.to(device).long()
    cu = short1 + torch.arange(short1.numel(), device=device)
    adv, ret = gae_1d(rewards.float(), values.float().to(device), cu, seq_no_eos_mask.to(device).bool(),
                      gamma, lam)
    return adv, ret


def masked_advantage_normalization(advantages: torch.Tensor, loss_mask: torch.Tensor, eps: float = 1e-5,
                                   all_reduce: bool = True, group: Any = None) -> torch.Tensor:
    """Whiten advantages with the mean/std (biased) of the masked entries;
    masked-out entries become 0. With ``all_reduce`` and an initialized process
    group the statistics are those of all ranks of ``group`` (None = world)."""
    return masked_normalization(advantages, loss_mask.bool(), eps=eps,
                                all_reduce=all_reduce and dist.is_initialized(), group=group)


# --------------------------------------------------------------------------- #
# Value normalization
# --------------------------------------------------------------------------- #
class ValueNormalizer:
    """Running mean / variance of returns, to train the critic on normalized targets.

    * ``type="exp"``: exponential moving averages of the batch mean and of the
      batch mean square with decay ``beta``, debiased by the accumulated
      weight ``1 - beta^n`` (clamped below by ``eps``);
    * ``type="ma"``: exact mean / mean square over every value seen so far.

    ``var = max(mean_sq - mean^2, min_var)``; before any update the
    normalizer is the identity (mean 0, var 1). Batch statistics are summed
    over ``group`` (data-parallel ranks) when a process group is initialized,
    so all ranks keep identical states (``group=None`` means the world;
    ``all_reduce=False`` keeps them local). Statistics are kept in float64.
    """

    def __init__(self, type: str = "exp", beta: float = 0.99995, eps: float = 1e-5, min_var: float = 1e-2,
                 group: Any = None, all_reduce: bool = True):
        if type not in ("exp", "ma"):
            raise ValueError(f"Unknown value normalizer type '{type}' (expected 'exp' or 'ma').")
        self.type = type
        self.beta = float(beta)
        self.eps = float(eps)
        self.min_var = float(min_var)
        self.group = group
        self.all_reduce = all_reduce
        self.mean = torch.zeros((), dtype=torch.float64)
        self.mean_sq = torch.zeros((), dtype=torch.float64)
        self.weight = torch.zeros((), dtype=torch.float64)  # debias term ("exp") or count ("ma")

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        xf = x.detach().double().cpu()
        m = torch.ones_like(xf) if mask is None else mask.detach().cpu().to(torch.float64)
        sums = torch.stack([m.sum(), (xf * m).sum(), (xf.square() * m).sum()])
        if self.all_reduce and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            t = sums.to(x.device)  # the group's backend must support x's device
            dist.all_reduce(t, group=self.group)
            sums = t.cpu()
        n, s1, s2 = sums[0], sums[1], sums[2]
        if float(n) <= 0:
            return
        b_mean, b_sq = s1 / n, s2 / n
        if self.type == "exp":
            self.mean = self.mean * self.beta + b_mean * (1.0 - self.beta)
            self.mean_sq = self.mean_sq * self.beta + b_sq * (1.0 - self.beta)
            self.weight = self.weight * self.beta + (1.0 - self.beta)
        else:
            total = self.weight + n
            self.mean = (self.mean * self.weight + s1) / total
            self.mean_sq = (self.mean_sq * self.weight + s2) / total
            self.weight = total

    def mean_var(self) -> Tuple[float, float]:
        """Current (mean, variance) estimates."""
        if float(self.weight) <= 0:
            return 0.0, 1.0
        if self.type == "exp":
            w = self.weight.clamp(min=self.eps)
            mean, mean_sq = self.mean / w, self.mean_sq / w
        else:
            mean, mean_sq = self.mean, self.mean_sq
        var = (mean_sq - mean.square()).clamp(min=self.min_var)
        return float(mean), float(var)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.mean_var()
        return ((x.double() - mean) / var ** 0.5).to(torch.float32)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.mean_var()
        return (x.double() * var ** 0.5 + mean).to(torch.float32)

    def state_dict(self) -> Dict[str, Any]:
        return {"mean": self.mean.clone(), "mean_sq": self.mean_sq.clone(), "weight": self.weight.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        self.mean_sq = torch.as_tensor(state["mean_sq"], dtype=torch.float64)
        self.weight = torch.as_tensor(state["weight"], dtype=torch.float64)
