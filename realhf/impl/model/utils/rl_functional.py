"""GRPO-family building blocks over packed (padding-free) batches.

Same layouts as :mod:`realhf.impl.model.utils.ppo_functional`: per-token
tensors live in the *shifted* layout (``sum(L_i - 1)`` entries, sequence ``i``
at ``short1cu_seqlens[i]:short1cu_seqlens[i+1]``), loss masks are bool (True =
trained token), and every loss returns ``(loss, stats)`` with scalar tensor
stats. Rewards are one scalar outcome per sequence (``[bs]``). A *group* is
the ``group_size`` samples of one prompt, stored as consecutive sequences
(sequences ``g * group_size .. (g + 1) * group_size - 1`` form group ``g``).
Statistics are those of the tensors passed in (no cross-rank reduction):
callers keep whole groups on one rank. Everything is pure torch, any device.

Contents:

* KL estimators (:func:`kl_estimate`, :func:`kl_penalty_loss`);
* loss aggregation (:func:`aggregate_loss`) and the generalised clipped
  surrogate (:func:`ppo_policy_loss`: clip-higher, dual clip, token- or
  sequence-level ratio, decoupled loss with a capped behaviour weight);
* reward/advantage normalisation (:func:`normalize`) and critic-free
  advantage estimators (GRPO / Dr.GRPO, RLOO, REINFORCE++(-baseline), ReMax);
* DAPO helpers (overlong penalty, dynamic sampling, no-EOS masking).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from realhf.impl.model.utils.functional import _check_cu_seqlens

Stats = Dict[str, torch.Tensor]

KL_KINDS: Dict[str, str] = {
    "k1": "k1", "kl": "k1",
    "k2": "k2", "mse": "k2",
    "k3": "k3", "low_var_kl": "k3",
    "abs": "abs",
}
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half inputs lose too much in exp/log), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the true entries of ``mask`` (0 when there are none)."""
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1).to(x.dtype)


def sequence_ids(short1cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Index of the sequence owning each shifted token (int64 ``[n_tokens]``).

    Validates the boundaries first: a misaligned ``cu_seqlens`` would silently
    mix tokens of different sequences.
    """
    _check_cu_seqlens(short1cu_seqlens, n_tokens)
    lens = (short1cu_seqlens[1:] - short1cu_seqlens[:-1]).long()
    bs = lens.numel()
    return torch.repeat_interleave(torch.arange(bs, device=lens.device), lens, output_size=n_tokens)


def segment_sum(x: torch.Tensor, seq_ids: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-sequence sums of a per-token tensor (differentiable)."""
    return torch.zeros(bs, dtype=x.dtype, device=x.device).index_add(0, seq_ids.to(x.device), x)


# --------------------------------------------------------------------------- #
# KL estimators
# --------------------------------------------------------------------------- #
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1",
                k3_clamp: Optional[float] = 10.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

    With ``d = logprobs - ref_logprobs`` (samples drawn from ``pi``):

    * ``"k1"`` (alias ``"kl"``): ``d`` -- unbiased, can be negative;
    * ``"k2"`` (alias ``"mse"``): ``0.5 * d^2`` -- biased, low variance;
    * ``"k3"`` (alias ``"low_var_kl"``): ``exp(-d) + d - 1`` -- unbiased and
      non-negative. ``exp(-d)`` overflows once the policy drifts far from the
      reference, so by default it is clamped to ``[-k3_clamp, k3_clamp]`` =
      ``[-10, 10]`` like the peers' ``low_var_kl`` (gradients vanish outside);
      ``k3_clamp=None`` keeps the raw value;
    * ``"abs"``: ``|d|``.

    Gradients flow into both arguments (detach ``ref_logprobs`` yourself).
    """
    canon = KL_KINDS.get(kind)
    if canon is None:
        raise ValueError(f"Unknown KL estimator kind '{kind}' (allowed: {', '.join(KL_KINDS)}).")
    d = _as_float(logprobs) - _as_float(ref_logprobs)
    if canon == "k1":
        return d
    if canon == "k2":
        return 0.5 * d.square()
    if canon == "abs":
        return d.abs()
    k3 = torch.exp(-d) + d - 1.0
    if k3_clamp is not None:
        k3 = k3.clamp(-float(k3_clamp), float(k3_clamp))
    return k3


# --------------------------------------------------------------------------- #
# Loss aggregation
# --------------------------------------------------------------------------- #
def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor,
                   short1cu_seqlens: Optional[torch.Tensor] = None, mode: str = "token-mean",
                   max_len_norm: Optional[float] = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar; the mode sets how tokens weigh.

    With ``m`` the bool mask, ``n_i`` the trained tokens of sequence ``i`` and
    ``S`` the sequences with ``n_i > 0`` (fully masked sequences, e.g. dropped
    by dynamic sampling or no-EOS masking, do not dilute sequence means):

    * ``"token-mean"``: ``sum_t m_t l_t / sum_t m_t`` (every token weighs the
      same; DAPO);
    * ``"seq-mean-token-sum"``: ``mean_{i in S} sum_t m_t l_t``;
    * ``"seq-mean-token-mean"``: ``mean_{i in S} (sum_t m_t l_t / n_i)``
      (every sequence weighs the same; original GRPO);
    * ``"seq-mean-token-sum-norm"``: ``mean_{i in S} (sum_t m_t l_t / C)`` with
      the constant ``C = max_len_norm`` (Dr.GRPO: a length-independent
      normaliser, e.g. the generation budget; some peers skip the sequence mean,
      which only rescales by the batch size).

    Masked entries never reach the result (even if they are inf/NaN). With no
    trained token the result is a zero that keeps the graph.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"Unknown loss_agg_mode '{mode}' (allowed: {', '.join(LOSS_AGG_MODES)}).")
    mask = mask.bool()
    x = torch.where(mask, per_token, torch.zeros_like(per_token))
    if mode == "token-mean":
        return x.sum() / mask.sum().clamp(min=1).to(x.dtype)
    if short1cu_seqlens is None:
        raise ValueError(f"loss_agg_mode '{mode}' needs short1cu_seqlens.")
    if mode == "seq-mean-token-sum-norm" and (max_len_norm is None or max_len_norm <= 0):
        raise ValueError(f"loss_agg_mode '{mode}' needs a positive max_len_norm, got {max_len_norm}.")
    bs = short1cu_seqlens.numel() - 1
    ids = sequence_ids(short1cu_seqlens.to(x.device), x.numel())
    seq_sum = segment_sum(x, ids, bs)
    n = segment_sum(mask.to(x.dtype), ids, bs)
    if mode == "seq-mean-token-sum":
        per_seq = seq_sum
    elif mode == "seq-mean-token-mean":
        per_seq = seq_sum / n.clamp(min=1)
    else:
        per_seq = seq_sum / float(max_len_norm)
    present = n > 0
    return torch.where(present, per_seq, torch.zeros_like(per_seq)).sum() / present.sum().clamp(min=1).to(x.dtype)


def kl_penalty_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                    short1cu_seqlens: Optional[torch.Tensor] = None, kind: str = "k3",
                    loss_agg_mode: str = "token-mean", max_len_norm: Optional[float] = None,
                    k3_clamp: Optional[float] = 10.0) -> Tuple[torch.Tensor, Stats]:
    """KL-in-loss term (GRPO style): ``aggregate(kl_estimate(logp, sg(ref)))``.

    The caller multiplies by its coefficient and adds it to the policy loss.
    :return: ``(loss, {"kl": masked token mean of the estimate})``.
    """
    kl = kl_estimate(logprobs, ref_logprobs.detach(), kind, k3_clamp)
    loss = aggregate_loss(kl, loss_mask, short1cu_seqlens, loss_agg_mode, max_len_norm)
    return loss, {"kl": _masked_mean(kl.detach(), loss_mask.bool())}


# --------------------------------------------------------------------------- #
# Policy loss
# --------------------------------------------------------------------------- #
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    short1cu_seqlens: Optional[torch.Tensor] = None,
    eps_clip: float = 0.2,
    eps_clip_higher: Optional[float] = None,
    c_clip: Optional[float] = None,
    importance_sampling_level: str = "token",
    prox_logprobs: Optional[torch.Tensor] = None,
    behav_imp_weight_cap: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    max_len_norm: Optional[float] = None,
) -> Tuple[torch.Tensor, Stats]:
    """Clipped surrogate covering PPO, GRPO, DAPO, Dr.GRPO, GSPO and decoupled PPO.

    All per-token inputs share one shape (shifted layout); ``old_logprobs``
    are the behaviour (sampling) policy's. Let ``base = prox_logprobs`` when
    given (decoupled loss) else ``old_logprobs``, ``eh = eps_clip_higher``
    (default ``eps_clip``) and, per token, ``A`` the advantage::

        r      = exp(logp - base)                     (importance_sampling_level="token")
        r      = exp(mean_{t in seq, m_t} (logp_t - base_t))   ("sequence", GSPO;
                 one ratio shared by every token of the sequence)
        l      = max(-A r, -A clip(r, 1 - eps_clip, 1 + eh))   (DAPO clip-higher)
        l      = min(l, -A c_clip)   where A < 0      (dual clip, needs c_clip > 1)
        w      = exp(base - old_logprobs)             (decoupled only; 1 otherwise)
        w      = 0 where w > behav_imp_weight_cap     (stale tokens dropped)
        loss   = aggregate_loss(w * l, loss_mask, mode=loss_agg_mode)

    Capped tokens contribute 0 but stay in the denominator of the aggregation
    (the normaliser does not depend on how many tokens were dropped), as in the
    decoupled-loss reference formulation. Advantages are detached.

    :return: ``(loss, stats)``; token means over ``loss_mask`` of:
        ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high`` (the clipped
        term binds; low = ratio below 1, high = above), ``dual_clip_ratio``,
        ``importance_weight`` (r), ``approx_kl`` (``base - logp`` per token,
        also at sequence level); with
        ``prox_logprobs`` also ``behav_imp_weight`` and ``behav_approx_kl``
        (``base - old`` over kept tokens) and ``behav_mask_ratio`` (fraction of
        trained tokens dropped by the cap).
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"Unknown importance_sampling_level '{importance_sampling_level}' "
                         f"(allowed: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}).")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"Unknown loss_agg_mode '{loss_agg_mode}' (allowed: {', '.join(LOSS_AGG_MODES)}).")
    if eps_clip < 0 or eps_clip >= 1:
        raise ValueError(f"eps_clip must be in [0, 1), got {eps_clip}.")
    eps_high = eps_clip if eps_clip_higher is None else float(eps_clip_higher)
    if eps_high < 0:
        raise ValueError(f"eps_clip_higher must be >= 0, got {eps_clip_higher}.")
    if c_clip is not None and not c_clip > 1.0:
        raise ValueError(f"c_clip must be > 1 (dual clip bounds -A * c_clip), got {c_clip}.")
    if behav_imp_weight_cap is not None:
        if prox_logprobs is None:
            raise ValueError("behav_imp_weight_cap needs prox_logprobs (the decoupled loss).")
        if not behav_imp_weight_cap > 1.0:
            raise ValueError(f"behav_imp_weight_cap must be > 1, got {behav_imp_weight_cap}.")
    if importance_sampling_level == "sequence" and short1cu_seqlens is None:
        raise ValueError("importance_sampling_level 'sequence' needs short1cu_seqlens.")

    mask = loss_mask.bool()
    logprobs = _as_float(logprobs)
    old_logprobs = _as_float(old_logprobs).detach()
    base = old_logprobs if prox_logprobs is None else _as_float(prox_logprobs).detach()
    adv = _as_float(advantages).detach()
    zeros = torch.zeros_like(logprobs)
    log_ratio = torch.where(mask, logprobs - base, zeros)
    token_log_ratio = log_ratio
    if importance_sampling_level == "sequence":
        bs = short1cu_seqlens.numel() - 1
        ids = sequence_ids(short1cu_seqlens.to(logprobs.device), logprobs.numel())
        n = segment_sum(mask.to(logprobs.dtype), ids, bs).clamp(min=1)
        seq_log_ratio = segment_sum(log_ratio, ids, bs) / n
        log_ratio = torch.where(mask, seq_log_ratio[ids], zeros)
    ratio = torch.exp(log_ratio)

    surr1 = -adv * ratio
    surr2 = -adv * ratio.clamp(1.0 - eps_clip, 1.0 + eps_high)
    per_token = torch.maximum(surr1, surr2)
    if c_clip is not None:
        surr3 = -adv * float(c_clip)
        dual = (adv < 0) & (per_token > surr3)
        per_token = torch.where(adv < 0, torch.minimum(per_token, surr3), per_token)
    else:
        dual = torch.zeros_like(mask)

    stats: Stats = {}
    if prox_logprobs is not None:
        behav_log_w = base - old_logprobs
        behav_w = torch.exp(behav_log_w)
        keep = mask if behav_imp_weight_cap is None else mask & (behav_w <= behav_imp_weight_cap)
        behav_w = torch.where(keep, behav_w, torch.zeros_like(behav_w))
        per_token = per_token * behav_w
        stats["behav_imp_weight"] = _masked_mean(behav_w, keep)
        stats["behav_approx_kl"] = _masked_mean(behav_log_w, keep)
        stats["behav_mask_ratio"] = _masked_mean((mask & ~keep).to(logprobs.dtype), mask)

    loss = aggregate_loss(per_token, mask, short1cu_seqlens, loss_agg_mode, max_len_norm)

    with torch.no_grad():
        clipped = (surr2 > surr1) & mask
        low = _masked_mean((clipped & (ratio < 1.0)).to(logprobs.dtype), mask)
        high = _masked_mean((clipped & (ratio > 1.0)).to(logprobs.dtype), mask)
        stats.update(
            clip_ratio=low + high,
            clip_ratio_low=low,
            clip_ratio_high=high,
            dual_clip_ratio=_masked_mean((dual & mask).to(logprobs.dtype), mask),
            importance_weight=_masked_mean(ratio.detach(), mask),
            approx_kl=_masked_mean(-token_log_ratio.detach(), mask),
        )
    return loss, {k: v.detach() for k, v in stats.items()}


# --------------------------------------------------------------------------- #
# Groups and normalisation
# --------------------------------------------------------------------------- #
NORM_LEVELS = ("batch", "group", None)


def _check_group_size(bs: int, group_size: int, name: str = "group_size") -> int:
    """Groups must tile the batch exactly; a ragged tail would mix prompts."""
    if int(group_size) < 1 or bs % int(group_size) != 0:
        raise ValueError(f"{name}={group_size} must be >= 1 and divide the batch size {bs}.")
    return int(group_size)


def broadcast_to_tokens(seq_values: torch.Tensor, short1cu_seqlens: torch.Tensor,
                        loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Repeat one value per sequence over its shifted tokens (outcome rewards).

    Entries where ``loss_mask`` is False become 0 so they cannot leak into a
    loss that forgets the mask.
    """
    short1 = short1cu_seqlens.to(seq_values.device)
    n = int(short1[-1])
    if seq_values.numel() != short1.numel() - 1:
        raise ValueError(f"Got {seq_values.numel()} sequence values for {short1.numel() - 1} sequences.")
    out = seq_values[sequence_ids(short1, n)]
    if loss_mask is not None:
        out = torch.where(loss_mask.bool().to(out.device), out, torch.zeros_like(out))
    return out


def normalize(
    x: torch.Tensor,
    mean_level: Optional[str] = "batch",
    std_level: Optional[str] = "batch",
    group_size: int = 1,
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    short1cu_seqlens: Optional[torch.Tensor] = None,
    mean_leave1out: bool = False,
    std_unbiased: bool = True,
) -> torch.Tensor:
    """Centre and scale rewards or advantages at batch or group level.

    ``x`` is per-sequence (``[bs]``) or, with ``short1cu_seqlens``, per-token
    (the group then holds every token of its sequences). Only entries with
    ``mask`` True are counted; the others come back as 0. Per element ``j`` of
    a set ``G`` (the batch, or the group of ``j``; ``N = |G|`` counted)::

        mu_j   = mean_G(x)                 (mean_level = "batch" / "group")
               = (sum_G x - x_j) / (N - 1)  (mean_leave1out: RLOO baseline;
                                             0 when N <= 1)
               = 0                          (mean_level = None)
        sd_j   = sqrt(sum_{k in G} (x_k - mu_k)^2 / (N - 1 if std_unbiased else N))
               (spread around the subtracted mean, so mean_level=None yields the
               root mean square; 1 when the divisor is 0)
        out_j  = (x_j - mu_j) / (sd_j + eps),   or x_j - mu_j when std_level is None

    A group of identical values gives ``sd = 0`` and a finite result 0.
    Computed in float64 without gradient (rewards and advantages are
    constants of the loss), returned in x's float dtype (at least float32).
    """
    if mean_level not in NORM_LEVELS:
        raise ValueError(f"mean_level must be 'batch', 'group' or None, got {mean_level!r}.")
    if std_level not in NORM_LEVELS:
        raise ValueError(f"std_level must be 'batch', 'group' or None, got {std_level!r}.")
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    xd = x.detach().double()
    m = torch.ones_like(xd, dtype=torch.bool) if mask is None else mask.bool().to(xd.device)
    if short1cu_seqlens is None:
        bs = xd.numel()
        seq_of = torch.arange(bs, device=xd.device)
    else:
        short1 = short1cu_seqlens.to(xd.device)
        bs = short1.numel() - 1
        seq_of = sequence_ids(short1, xd.numel())
    if "group" in (mean_level, std_level):
        _check_group_size(bs, group_size)
    md = m.double()
    xm = torch.where(m, xd, torch.zeros_like(xd))

    def _set_ids(level: Optional[str]) -> tuple[torch.Tensor, int]:
        if level == "group":
            return seq_of // int(group_size), bs // int(group_size)
        return torch.zeros_like(seq_of), 1

    if mean_level is None:
        mu = torch.zeros_like(xd)
    else:
        ids, n_sets = _set_ids(mean_level)
        cnt = segment_sum(md, ids, n_sets)[ids]
        tot = segment_sum(xm, ids, n_sets)[ids]
        if mean_leave1out:
            mu = (tot - xm) / (cnt - md).clamp(min=1)
            mu = torch.where(cnt <= 1, torch.zeros_like(mu), mu)
        else:
            mu = tot / cnt.clamp(min=1)
    centred = torch.where(m, xd - mu, torch.zeros_like(xd))
    if std_level is None:
        return centred.to(out_dtype)
    ids, n_sets = _set_ids(std_level)
    cnt = segment_sum(md, ids, n_sets)
    sq = segment_sum(centred.square(), ids, n_sets)
    div = cnt - 1 if std_unbiased else cnt
    sd = torch.where(div > 0, (sq / div.clamp(min=1)).sqrt(), torch.ones_like(sq))
    return (centred / (sd[ids] + eps)).to(out_dtype)


# --------------------------------------------------------------------------- #
# Advantage estimators (outcome rewards)
# --------------------------------------------------------------------------- #
def grpo_advantages(rewards: torch.Tensor, short1cu_seqlens: torch.Tensor, group_size: int,
                    loss_mask: Optional[torch.Tensor] = None, norm_adv_by_std: bool = True,
                    eps: float = 1e-6, std_unbiased: bool = True) -> torch.Tensor:
    """GRPO: ``A_i = (r_i - mean_g r) / (std_g r + eps)`` on every token of ``i``.

    ``norm_adv_by_std=False`` gives Dr.GRPO's ``A_i = r_i - mean_g r`` (the std
    division favours prompts that are too easy or too hard). ``std_unbiased``
    picks the ``N - 1`` divisor (the usual GRPO choice). Groups of identical
    rewards get advantage 0.
    """
    adv = normalize(rewards, "group", "group" if norm_adv_by_std else None, group_size, eps,
                    std_unbiased=std_unbiased)
    return broadcast_to_tokens(adv, short1cu_seqlens, loss_mask)


def rloo_advantages(rewards: torch.Tensor, short1cu_seqlens: torch.Tensor, group_size: int,
                    loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RLOO: ``A_i = r_i - mean_{j in g, j != i} r_j`` (an unbiased baseline,
    since it does not depend on sample ``i``); needs ``group_size >= 2``."""
    if int(group_size) < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}.")
    adv = normalize(rewards, "group", None, group_size, mean_leave1out=True)
    return broadcast_to_tokens(adv, short1cu_seqlens, loss_mask)


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor, short1cu_seqlens: torch.Tensor,
                     group_size: int = 1, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ReMax: ``A_i = r_i - r_greedy(prompt of i)`` on every token of ``i``.

    ``greedy_rewards`` holds the reward of the greedy answer per prompt
    (``[bs / group_size]``, sequences of one prompt consecutive) or per
    sequence (``[bs]``).
    """
    bs = rewards.numel()
    if greedy_rewards.numel() == bs:
        base = greedy_rewards
    else:
        g = _check_group_size(bs, group_size)
        if greedy_rewards.numel() != bs // g:
            raise ValueError(f"greedy_rewards has {greedy_rewards.numel()} entries; expected {bs} "
                             f"(per sequence) or {bs // g} (per prompt, group_size={g}).")
        base = greedy_rewards.repeat_interleave(g)
    adv = rewards.to(torch.promote_types(rewards.dtype, torch.float32)) - base.to(rewards.device)
    return broadcast_to_tokens(adv, short1cu_seqlens, loss_mask)


def discounted_returns(rewards: torch.Tensor, short1cu_seqlens: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{k >= t} gamma^(k - t) r_k`` within each sequence (shifted layout).

    Runs backwards over a ``[bs, max_len]`` padded view, one vector step per
    position (right-padding with zeros does not change the sums).
    """
    short1 = short1cu_seqlens.to(rewards.device)
    n = rewards.numel()
    ids = sequence_ids(short1, n)
    bs = short1.numel() - 1
    pos = torch.arange(n, device=rewards.device) - short1[:-1].long()[ids]
    max_len = int((short1[1:] - short1[:-1]).max()) if bs > 0 else 0
    padded = torch.zeros(bs, max_len + 1, dtype=rewards.dtype, device=rewards.device)
    padded[ids, pos] = rewards
    for t in range(max_len - 1, -1, -1):
        padded[:, t] += gamma * padded[:, t + 1]
    return padded[ids, pos]


def reinforce_plus_plus_advantages(
    rewards: torch.Tensor,
    short1cu_seqlens: torch.Tensor,
    loss_mask: torch.Tensor,
    kl: Optional[torch.Tensor] = None,
    kl_ctl: float = 0.0,
    gamma: float = 1.0,
    group_size: Optional[int] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ (``group_size=None``) and REINFORCE++-baseline.

    1. baseline variant: ``r_i <- r_i - mean_g r`` (group mean of the prompt);
    2. per-token reward ``-kl_ctl * kl_t`` on trained tokens (``kl`` from
       :func:`kl_estimate` against the reference policy), plus ``r_i`` at the
       sequence's last shifted position;
    3. ``G_t`` = discounted return within the sequence (:func:`discounted_returns`);
    4. batch whitening over trained tokens: ``(G - mean) / (std + eps)``
       (unbiased std), masked tokens 0.

    Every sequence needs at least one shifted token (it carries ``r_i``).
    """
    short1 = short1cu_seqlens.to(rewards.device)
    lens = short1[1:] - short1[:-1]
    if bool((lens < 1).any()):
        raise ValueError("Every sequence needs at least two tokens (one shifted position) for REINFORCE++.")
    mask = loss_mask.bool().to(rewards.device)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if group_size is not None:
        r = normalize(r, "group", None, group_size)
    if kl is None:
        tok = torch.zeros(mask.shape, dtype=r.dtype, device=r.device)
    else:
        kl_t = kl.detach().to(device=r.device, dtype=r.dtype)
        tok = torch.where(mask, -float(kl_ctl) * kl_t, torch.zeros_like(kl_t))
    tok = tok.index_add(0, short1[1:].long() - 1, r)
    returns = discounted_returns(tok, short1, gamma)
    return normalize(returns, "batch", "batch", eps=eps, mask=mask)


# --------------------------------------------------------------------------- #
# DAPO helpers
# --------------------------------------------------------------------------- #
def overlong_penalty(gen_lengths: torch.Tensor, max_new_tokens: int, overlong_tokens: int,
                     overlong_penalty_factor: float) -> torch.Tensor:
    """DAPO soft overlong punishment, to be added to each sequence's reward.

    With ``L`` the generated length and ``s = max_new_tokens - overlong_tokens``::

        penalty = min(0, -(L - s) / overlong_tokens * overlong_penalty_factor)

    i.e. 0 up to ``s``, then linear down to ``-overlong_penalty_factor`` at
    ``L = max_new_tokens`` (generation cannot go further).
    """
    if not 0 < int(overlong_tokens) <= int(max_new_tokens):
        raise ValueError(f"overlong_tokens must be in (0, max_new_tokens={max_new_tokens}], got {overlong_tokens}.")
    if overlong_penalty_factor < 0:
        raise ValueError(f"overlong_penalty_factor must be >= 0, got {overlong_penalty_factor}.")
    lengths = gen_lengths.to(torch.promote_types(gen_lengths.dtype, torch.float32))
    exceed = lengths - float(max_new_tokens - overlong_tokens)
    return torch.clamp(-exceed / float(overlong_tokens) * float(overlong_penalty_factor), max=0.0)


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """DAPO dynamic sampling: bool ``[bs / group_size]``, True for groups whose
    rewards are not all identical (``max - min > atol``); the others have zero
    group-relative advantage and only dilute the batch.
    ``keep.repeat_interleave(group_size)`` gives the per-sequence mask."""
    g = _check_group_size(rewards.numel(), group_size)
    r = rewards.reshape(-1, g)
    return (r.max(dim=1).values - r.min(dim=1).values) > atol


def mask_no_eos_with_zero(x: torch.Tensor, no_eos: torch.Tensor,
                          short1cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero (or set False) what belongs to truncated sequences (no EOS).

    ``x`` is per-sequence (rewards ``[bs]``) or, with ``short1cu_seqlens``,
    per-token (a loss mask or advantages); masking the loss mask excludes
    truncated generations from training altogether.
    """
    no_eos = no_eos.bool().to(x.device)
    if short1cu_seqlens is not None:
        no_eos = no_eos[sequence_ids(short1cu_seqlens.to(x.device), x.numel())]
    elif no_eos.numel() != x.numel():
        raise ValueError(f"no_eos has {no_eos.numel()} entries for {x.numel()} values; "
                         "pass short1cu_seqlens for per-token tensors.")
    return torch.where(no_eos, torch.zeros_like(x), x)
