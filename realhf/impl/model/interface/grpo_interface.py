"""GRPO-family actor (``grpo_actor``): critic-free RL with groups of samples per prompt.

Layout: one *item* is one prompt with its ``group_size`` samples. ``generate``
repeats every prompt ``group_size`` times and regroups the answers, so each
output key holds ``group_size`` sequences per item (as the paired reward
data hold several answers per item). The master and the engines split
batches by items only, so a data-parallel or minibatch split never cuts a
group and group statistics stay on one rank.

Keys: ``generate`` turns ``packed_prompts`` into ``packed_input_ids``,
``prompt_mask``, ``packed_logprobs`` (behaviour log-probs, zero on prompt
labels), ``seq_no_eos_mask`` and, when sampling truncated the vocabulary,
``packed_logits_mask``; ``inference`` (the reference model) gives
``packed_ref_logprobs``; ``train_step`` also reads ``rewards`` (one per
sequence) and, when a KL term is on, ``packed_ref_logprobs``.

``train_step``: reward = clip(score + overlong penalty, +-max_reward_clip)
[- kl_ctl * sum of k1 over the answer]; DAPO dynamic sampling drops groups
whose rewards are all equal (their loss mask is cleared). In the experiment
the master filters with the same rule before this call and refills the
batch (:func:`dynamic_sampling_filter`, registered as the item filter
``grpo_dynamic_sampling``), so such groups only get here as padding when
too few groups passed; optional no-EOS masking; reward
normalisation; advantages by estimator (grpo, dr_grpo, rloo,
reinforce_plus_plus(_baseline)); optional advantage normalisation; then
``n_minibatches`` optimizer steps on the clipped surrogate of
:func:`realhf.impl.model.utils.rl_functional.ppo_policy_loss` (+
``kl_loss_coef`` x KL loss). Rewards and advantages are computed from the
whole global batch, gathered over data parallel ranks, so every rank gets
the result a single process would (batch-level statistics included).

``use_decoupled_loss``: the proximal policy is recomputed by a forward pass
of the trained weights before the first minibatch. In this synchronous
system those are the weights that generated the batch, so the behaviour
weight ``exp(prox - behav)`` only corrects the numerical mismatch between
generation and training (KV-cache decoding, other kernels, bf16); it matters
more once batches are stale.

ReMax (``adv_estimator="remax"``): ``generate`` also decodes one greedy
(argmax) answer per prompt, same ``max_new_tokens``, and appends it to the
item as its last sequence, so an item holds ``group_size + 1`` sequences and
the reward call scores the greedy answer with the others (the reference
call computes its log-probs too, which nobody reads). ``train_step`` cuts the
greedy answer off every item first (:func:`split_greedy`): it is never
trained on and never counts in a statistic of the sampled answers. Its
reward (with the same overlong penalty and clip) is the baseline:
``A_i = r_i - r_greedy`` (:func:`rl_functional.remax_advantages`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import (
    GenerationHyperparameters,
    MicroBatchSpec,
    Model,
    ModelInterface,
    register_interface,
    register_item_filter,
)
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.interface.common import packed_shifted_log_probs, shifted_answer_mask
from realhf.impl.model.interface.ppo_interface import (
    LOGITS_MASK,
    _engine,
    _policy_logits,
    _temperature,
    _vocab_size,
    _without_dropout,
    masked_logprobs_loss,
    sample_answers,
)
from realhf.impl.model.interface.rw_interface import save_model
from realhf.impl.model.nn import linear_replay
from realhf.impl.model.utils import rl_functional as rl
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
from realhf.impl.model.utils.ppo_functional import short1_cu_seqlens

ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")


# --------------------------------------------------------------------------- #
# Group layout helpers
# --------------------------------------------------------------------------- #
def seq_lens(sample: SequenceSample, key: str = "packed_input_ids") -> List[int]:
    """Lengths of every sequence of ``key``, items in order."""
    return [n for item in sample.seqlens[key] for n in item]


def grouped_sample(ids: List, group_size: int, data: Dict[str, torch.Tensor],
                   lens: Dict[str, List[int]]) -> SequenceSample:
    """A sample whose item ``i`` holds sequences ``i * group_size .. (i + 1) * group_size - 1``."""
    g = group_size
    return SequenceSample(
        keys=set(data),
        trailing_shapes={k: tuple(v.shape[1:]) for k, v in data.items()},
        dtypes={k: v.dtype for k, v in data.items()},
        ids=list(ids),
        seqlens={k: [list(lens[k][i * g:(i + 1) * g]) for i in range(len(ids))] for k in data},
        data=dict(data),
    )


def check_groups(sample: SequenceSample, group_size: int, key: str = "packed_input_ids") -> None:
    """Every item must hold exactly ``group_size`` sequences (one prompt's group)."""
    bad = [(i, len(s)) for i, s in zip(sample.ids, sample.seqlens[key]) if len(s) != group_size]
    if bad:
        raise ValueError(f"grpo_actor: items must hold group_size={group_size} sequences of {key!r}; "
                         f"got (id, count) {bad[:4]}.")


def append_greedy(group_size: int, sampled: Tuple[List[int], Dict[str, torch.Tensor]],
                  greedy: Tuple[List[int], Dict[str, torch.Tensor]]) -> Tuple[List[int], Dict[str, torch.Tensor]]:
    """Interleave rollouts so that prompt ``i``'s ``group_size`` samples are followed by its greedy answer.

    ``sampled`` / ``greedy`` are :func:`sample_answers` results (lengths, keys).
    A logits mask only the sampled rollout has is filled with all-True rows
    for the greedy answers (argmax removes no token from the distribution).
    """
    g = group_size
    s_lens, s_data = sampled
    g_lens, g_data = greedy
    if len(s_lens) != g * len(g_lens):
        raise ValueError(f"{len(s_lens)} sampled answers for {len(g_lens)} greedy ones and group_size={g}.")
    if LOGITS_MASK in s_data and LOGITS_MASK not in g_data:
        m = s_data[LOGITS_MASK]
        g_data = dict(g_data, **{LOGITS_MASK: torch.ones(sum(g_lens), m.shape[-1], dtype=m.dtype, device=m.device)})
    lens = [n for i in range(len(g_lens)) for n in (*s_lens[i * g:(i + 1) * g], g_lens[i])]
    data = {}
    for k, t in s_data.items():
        s_parts = torch.split(t, [_rollout_len(k, n) for n in s_lens])
        g_parts = torch.split(g_data[k].to(t.dtype), [_rollout_len(k, n) for n in g_lens])
        data[k] = torch.cat([p for i in range(len(g_lens)) for p in (*s_parts[i * g:(i + 1) * g], g_parts[i])])
    return lens, data


def _rollout_len(key: str, n: int) -> int:
    """Entries of rollout key ``key`` for a sequence of ``n`` tokens."""
    if key == "packed_logprobs":
        return n - 1
    return 1 if key == "seq_no_eos_mask" else n


def split_greedy(sample: SequenceSample, group_size: int) -> Tuple[SequenceSample, Dict[str, torch.Tensor]]:
    """Cut the greedy answer (each item's last sequence) off a ReMax batch.

    Returns the sampled answers (``group_size`` per item, every key) and, per
    item, the greedy answer's ``score`` (``rewards``), ``gen_len`` and
    ``no_eos`` (float64 ``[bs]``). A key holds either one entry per sequence
    (``group_size + 1`` entries per item) or, like ``rewards``, one entry
    counting the item's sequences (``[[group_size + 1]]``).
    """
    g = group_size
    check_groups(sample, g + 1)
    data: Dict[str, torch.Tensor] = {}
    seqlens: Dict[str, List[List[int]]] = {}
    tail: Dict[str, List[torch.Tensor]] = {}
    for k in sample.keys:
        t, parts, tails, new_lens, off = sample.data[k], [], [], [], 0
        for item in sample.seqlens[k]:
            n = sum(item)
            if len(item) == g + 1:
                cut, new = n - item[-1], list(item[:-1])
            elif len(item) == 1 and item[0] == g + 1:
                cut, new = g, [g]
            else:
                raise ValueError(f"grpo_actor (remax): key {k!r} holds sequences {item} per item; expected "
                                 f"group_size + 1 = {g + 1} sequences (the last one greedy).")
            parts.append(t[off:off + cut])
            tails.append(t[off + cut:off + n])
            new_lens.append(new)
            off += n
        data[k] = torch.cat(parts) if parts else t[:0]
        seqlens[k] = new_lens
        tail[k] = tails
    out = SequenceSample(keys=set(sample.keys), trailing_shapes=dict(sample.trailing_shapes),
                         dtypes=dict(sample.dtypes), ids=list(sample.ids), seqlens=seqlens, data=data,
                         metadata={m: list(v) for m, v in sample.metadata.items()})
    greedy = {
        "score": torch.stack([x.double().view(-1)[0] for x in tail["rewards"]]),
        "gen_len": torch.tensor([float((~x.bool()).sum()) for x in tail["prompt_mask"]], dtype=torch.float64),
        "no_eos": torch.stack([x.double().view(-1)[0] for x in tail["seq_no_eos_mask"]]),
    }
    return out, greedy


def _spans_dp(par) -> bool:
    return par.dp_group is not None and dist.is_initialized() and dist.get_world_size(par.dp_group) > 1


def dp_all_reduce(par, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small host tensor over dp (through the device when the group is NCCL)."""
    if not _spans_dp(par):
        return t
    dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(par.dp_group) == "nccl"
           else torch.device("cpu"))
    x = t.to(dev)
    par.all_reduce(x, par.dp_group, op=op)
    return x.to(t.device)


def gather_dp(par, local: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Rows of ``local`` (float64 ``[n, k]``) of all dp ranks, in dp order, and this rank's row offset.

    Two sum all-reduces (sizes, then rows placed at their offsets): exact for
    integers and float32 values, and cheap next to a forward pass.
    """
    local = local.double().cpu()
    if not _spans_dp(par):
        return local, 0
    rank, size = dist.get_rank(par.dp_group), dist.get_world_size(par.dp_group)
    sizes = torch.zeros(size, dtype=torch.float64)
    sizes[rank] = local.shape[0]
    sizes = dp_all_reduce(par, sizes)
    offset, total = int(sizes[:rank].sum()), int(sizes.sum())
    buf = torch.zeros(total, *local.shape[1:], dtype=torch.float64)
    buf[offset:offset + local.shape[0]] = local
    return dp_all_reduce(par, buf), offset


def n_minibatches(par, requested: int, bs: int) -> int:
    """The same minibatch count on every dp rank (ranks may hold different item counts)."""
    n = dp_all_reduce(par, torch.tensor([float(min(requested, bs))], dtype=torch.float64), op=dist.ReduceOp.MIN)
    return max(1, int(n.item()))


# --------------------------------------------------------------------------- #
# Rewards -> advantages (pure, on the whole batch)
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class GroupBatch:
    """Per-sequence and per-token (shifted) tensors of a whole batch of groups."""

    score: torch.Tensor       # [n] reward-model / rule score
    gen_len: torch.Tensor     # [n] answer tokens
    no_eos: torch.Tensor      # [n] bool, truncated
    short1: torch.Tensor      # [n + 1] shifted boundaries
    loss_mask: torch.Tensor   # [T] bool, answer labels
    kl: Optional[torch.Tensor] = None  # [T] k1 = logp_behav - logp_ref (None: no reference)
    greedy_score: Optional[torch.Tensor] = None    # [n / g] ReMax: score of each prompt's greedy answer
    greedy_gen_len: Optional[torch.Tensor] = None  # [n / g] its answer tokens (for the overlong penalty)


def group_advantages(b: GroupBatch, cfg: "GRPOActorInterface") -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
    """(advantages [T], trained-token mask [T], statistics) of a whole batch."""
    g = cfg.group_size
    n = b.score.numel()
    seq_of = rl.sequence_ids(b.short1, b.loss_mask.numel())
    r, penalty = _clipped_reward(b.score, b.gen_len, cfg)
    keep = (rl.dynamic_sampling_keep(r, g) if cfg.dynamic_sampling
            else torch.ones(n // g, dtype=torch.bool))
    seq_keep = keep.repeat_interleave(g)
    mask = b.loss_mask.bool() & seq_keep[seq_of]
    if cfg.mask_no_eos_with_zero:
        mask = rl.mask_no_eos_with_zero(mask, b.no_eos, b.short1)
    seq_kl = (rl.segment_sum(torch.where(b.loss_mask, b.kl.double(), torch.zeros_like(b.kl.double())), seq_of, n)
              if b.kl is not None else None)
    shaped = r
    if cfg.kl_ctl > 0 and not cfg.adv_estimator.startswith("reinforce"):  # REINFORCE++: per token, below
        shaped = r - cfg.kl_ctl * seq_kl
    in_reward = shaped
    mean_l, std_l = cfg.reward_norm_mean_level, cfg.reward_norm_std_level
    if mean_l is not None or std_l is not None:
        in_reward = rl.normalize(shaped, mean_l, std_l, g, mask=seq_keep).double()

    est = cfg.adv_estimator
    if est == "remax":
        if b.greedy_score is None or b.greedy_gen_len is None:
            raise ValueError("grpo_actor: adv_estimator='remax' needs the greedy answers' scores and lengths.")
        greedy_r, _ = _clipped_reward(b.greedy_score, b.greedy_gen_len, cfg)
        adv = rl.remax_advantages(in_reward, greedy_r, b.short1, g, mask)
    elif est in ("grpo", "dr_grpo"):
        adv = rl.grpo_advantages(in_reward, b.short1, g, mask, norm_adv_by_std=cfg.norm_by_std)
    elif est == "rloo":
        adv = rl.rloo_advantages(in_reward, b.short1, g, mask)
    else:
        adv = rl.reinforce_plus_plus_advantages(
            in_reward, b.short1, mask, kl=b.kl if cfg.kl_ctl > 0 else None, kl_ctl=cfg.kl_ctl,
            group_size=g if est == "reinforce_plus_plus_baseline" else None)
    mean_l, std_l = cfg.adv_norm_mean_level, cfg.adv_norm_std_level
    if mean_l is not None or std_l is not None:
        adv = rl.normalize(adv, mean_l, std_l, g, mask=mask, short1cu_seqlens=b.short1)
    adv = torch.where(mask, adv.float(), torch.zeros_like(adv, dtype=torch.float32))

    n_tok = max(float(mask.sum()), 1.0)
    stats = {
        "task_reward": float(b.score.double().mean()),
        "reward": float(shaped.mean()),
        "overlong_penalty": float(penalty.mean()),
        "advantage": float(adv.double().sum()) / n_tok,
        "kept_group_frac": float(keep.double().mean()),
        "trained_token_frac": float(mask.sum()) / max(float(b.loss_mask.sum()), 1.0),
        "no_eos_ratio": float(b.no_eos.double().mean()),
        "avg_gen_len": float(b.gen_len.double().mean()),
        "n_seqs": float(n),
    }
    if seq_kl is not None:
        stats["ref_kl"] = float(seq_kl.mean())
    if b.greedy_score is not None:
        stats["greedy_task_reward"] = float(b.greedy_score.double().mean())
        stats["greedy_avg_gen_len"] = float(b.greedy_gen_len.double().mean())
    return adv, mask, stats


def clipped_reward(score: torch.Tensor, gen_len: torch.Tensor, max_new_tokens: int,
                   overlong_tokens: Optional[int] = None, overlong_penalty_factor: Optional[float] = None,
                   max_reward_clip: float = 20.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clip(score + overlong penalty, +-max_reward_clip), penalty) in float64: the one rule for
    sampled and greedy answers and for the dynamic-sampling filter, so they all see the same rewards."""
    r = score.double()
    penalty = torch.zeros_like(r)
    if overlong_tokens is not None:
        penalty = rl.overlong_penalty(gen_len, max_new_tokens, overlong_tokens, overlong_penalty_factor).double()
    return (r + penalty).clamp(-max_reward_clip, max_reward_clip), penalty


def _clipped_reward(score: torch.Tensor, gen_len: torch.Tensor,
                    cfg: "GRPOActorInterface") -> Tuple[torch.Tensor, torch.Tensor]:
    return clipped_reward(score, gen_len, cfg.generation_config.max_new_tokens, cfg.overlong_tokens,
                          cfg.overlong_penalty_factor, cfg.max_reward_clip)


def dynamic_sampling_filter(sample: SequenceSample, group_size: int, max_new_tokens: int,
                            overlong_tokens: Optional[int] = None, overlong_penalty_factor: Optional[float] = None,
                            max_reward_clip: float = 20.0) -> List[bool]:
    """DAPO's dynamic sampling as the master's input filter (``grpo_dynamic_sampling``): keep an
    item (a group) unless its rewards, as ``train_step`` computes them, are all equal.

    Reads ``rewards`` and, with the overlong penalty, ``prompt_mask`` (answer lengths).
    """
    score = sample.data["rewards"].double().view(-1)
    if score.numel() != sample.bs * group_size:
        raise ValueError(f"grpo_dynamic_sampling: {score.numel()} rewards for {sample.bs} groups of {group_size}.")
    gen_len = torch.zeros_like(score)
    if overlong_tokens is not None:
        lens = [n for item in sample.seqlens["prompt_mask"] for n in item]
        prompt = torch.stack([m.sum() for m in torch.split(sample.data["prompt_mask"].long(), lens)])
        gen_len = torch.tensor(lens, dtype=torch.float64) - prompt.double()
    r, _ = clipped_reward(score, gen_len, max_new_tokens, overlong_tokens, overlong_penalty_factor, max_reward_clip)
    return rl.dynamic_sampling_keep(r, group_size).tolist()


# --------------------------------------------------------------------------- #
# Interface
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class GRPOActorInterface(ModelInterface):
    """The ``grpo_actor`` interface (also the reference model's ``inference``).

    Fields mirror ``GRPOHyperparameters`` (see
    :mod:`realhf.api.quickstart.grpo` for their meaning); ``*_level`` fields
    take "batch", "group" or None.
    """

    generation_config: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    group_size: int = 4
    n_minibatches: int = 1
    adv_estimator: str = "grpo"
    norm_adv_by_std: Optional[bool] = None
    eps_clip: float = 0.2
    eps_clip_higher: Optional[float] = None
    c_clip: Optional[float] = None
    importance_sampling_level: str = "token"
    loss_agg_mode: Optional[str] = None
    kl_ctl: float = 0.0
    kl_loss_coef: float = 0.0
    kl_estimator: str = "k3"
    reward_norm_mean_level: Optional[str] = None
    reward_norm_std_level: Optional[str] = None
    adv_norm_mean_level: Optional[str] = None
    adv_norm_std_level: Optional[str] = None
    dynamic_sampling: bool = False
    overlong_tokens: Optional[int] = None
    overlong_penalty_factor: Optional[float] = None
    mask_no_eos_with_zero: bool = False
    use_decoupled_loss: bool = False
    behav_imp_weight_cap: Optional[float] = None
    max_reward_clip: float = 20.0
    force_no_logits_mask: bool = False
    enable_save: bool = True
    hf_family: Optional[str] = None
    # Generations on a trainable CPU model keep their products for the training forward
    # (linear_replay): it then skips a third of its arithmetic.
    reuse_rollout_products: bool = True

    def __post_init__(self):
        if isinstance(self.generation_config, dict):
            self.generation_config = GenerationHyperparameters(**self.generation_config)
        if self.force_no_logits_mask:
            self.generation_config = dataclasses.replace(self.generation_config, force_no_logits_mask=True)
        if self.adv_estimator not in ADV_ESTIMATORS:
            raise ValueError(f"adv_estimator={self.adv_estimator!r}; allowed: {ADV_ESTIMATORS}.")
        if self.group_size < 1 or (self.adv_estimator in GROUP_ESTIMATORS and self.group_size < 2):
            raise ValueError(f"group_size={self.group_size} is too small for {self.adv_estimator}.")
        if self.n_minibatches < 1:
            raise ValueError(f"n_minibatches must be >= 1, got {self.n_minibatches}.")
        if self.overlong_tokens is not None and self.overlong_penalty_factor is None:
            raise ValueError("overlong_tokens needs overlong_penalty_factor.")
        rl.kl_estimate(torch.zeros(1), torch.zeros(1), self.kl_estimator)  # refuses unknown kinds
        if self.adv_estimator == "remax":
            if self.generation_config.greedy:
                raise ValueError("adv_estimator='remax' with greedy sampling: every answer would be the greedy "
                                 "baseline and every advantage 0.")
            if self.dynamic_sampling:
                raise ValueError("adv_estimator='remax' with dynamic_sampling: a group of equal sampled rewards "
                                 "still has advantages against its greedy answer.")
            if self.reward_norm_mean_level is not None or self.reward_norm_std_level is not None:
                raise ValueError("adv_estimator='remax' with reward normalisation: the greedy rewards would not be "
                                 "normalised alike; use the advantage normalisation.")

    @property
    def answers_per_item(self) -> int:
        """Sequences per item from ``generate``: the group, plus the greedy answer for ReMax."""
        return self.group_size + (1 if self.adv_estimator == "remax" else 0)

    @property
    def norm_by_std(self) -> bool:
        """GRPO divides by the group std, Dr.GRPO does not (unless set explicitly)."""
        if self.norm_adv_by_std is not None:
            return bool(self.norm_adv_by_std)
        return self.adv_estimator != "dr_grpo"

    @property
    def agg_mode(self) -> str:
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return "seq-mean-token-sum-norm" if self.adv_estimator == "dr_grpo" else "token-mean"

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, model: Model, input_: SequenceSample,
                 mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``group_size`` answers per prompt (then the greedy one for ReMax), one item per prompt;
        None on non-last pipeline stages."""
        g = self.group_size
        p_lens = seq_lens(input_, "packed_prompts")
        toks = torch.split(input_.data["packed_prompts"], p_lens)
        rep_lens = [n for n in p_lens for _ in range(g)]
        rep = torch.cat([t for t in toks for _ in range(g)]) if toks else input_.data["packed_prompts"]
        prompts = SequenceSample.from_default(rep_lens, list(range(len(rep_lens))), {"packed_input_ids": rep})
        engine = _engine(model)
        keep = self.reuse_rollout_products and hasattr(engine, "train_batch")
        linear_replay.drop(engine.module)  # an earlier rollout's, never trained on (this call's micro-batches add up)
        with linear_replay.capturing(engine.module, keep):
            rollout = sample_answers(model, prompts, mb_spec, self.generation_config)
        if self.adv_estimator == "remax":  # after sampling: the sampled answers draw the same random numbers
            single = SequenceSample.from_default(p_lens, list(range(len(p_lens))),
                                                 {"packed_input_ids": input_.data["packed_prompts"]})
            greedy = sample_answers(model, single, mb_spec,
                                    dataclasses.replace(self.generation_config, greedy=True))
            rollout = None if rollout is None else append_greedy(g, rollout, greedy)
        if rollout is None:
            return None
        lens, data = rollout
        per_key = {"packed_input_ids": lens, "prompt_mask": lens, "packed_logprobs": [n - 1 for n in lens],
                   "seq_no_eos_mask": [1] * len(lens)}
        if LOGITS_MASK in data:
            per_key[LOGITS_MASK] = lens
        return grouped_sample(list(input_.ids), self.answers_per_item, data, per_key)

    # ----------------------------------------------------------- inference
    def _logp_hook(self, engine):
        vocab, temp, tp_rank = _vocab_size(engine.module), _temperature(self.generation_config), engine.par.tp_rank

        def hook(logits: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
            ids, cu, _ = packed_inputs(mb)
            lg = _policy_logits(logits, mb, temp, tp_rank)
            return packed_shifted_log_probs(lg, cu.to(lg.device), ids.to(lg.device), vocab).float()

        return hook

    @torch.no_grad()
    def inference(self, model: Model, input_: SequenceSample,
                  mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``packed_ref_logprobs`` (L - 1 per sequence, items kept whole) under the sampler's
        temperature and logits mask; None on non-last stages."""
        engine = _engine(model)
        logp = engine.forward(input_, mb_spec or MicroBatchSpec(), post_hook=self._logp_hook(engine))
        if logp is None:
            return None
        key = "packed_ref_logprobs"
        return SequenceSample(keys={key}, trailing_shapes={key: ()}, dtypes={key: torch.float32},
                              ids=list(input_.ids),
                              seqlens={key: [[n - 1 for n in s] for s in input_.seqlens["packed_input_ids"]]},
                              data={key: logp.float()})

    # ---------------------------------------------------------- train step
    def _prepare(self, input_: SequenceSample, par, greedy: Optional[Dict[str, torch.Tensor]] = None
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """Local loss mask, behaviour log-probs and advantages; global statistics.
        ``greedy``: per-item greedy ``score`` / ``gen_len`` (ReMax, from :func:`split_greedy`)."""
        check_groups(input_, self.group_size)
        data = input_.data
        lens = seq_lens(input_)
        cu = cu_seqlens_from_lengths(lens)
        prompt_mask = data["prompt_mask"].bool().cpu()
        loss_mask = shifted_answer_mask(prompt_mask, cu)
        old_logp = data["packed_logprobs"].float().cpu()
        has_ref = "packed_ref_logprobs" in input_.keys
        p_lens = torch.tensor([int(p.sum()) for p in torch.split(prompt_mask, lens)], dtype=torch.float64)
        per_seq = torch.stack([
            data["rewards"].float().cpu().view(-1).double(),
            torch.tensor(lens, dtype=torch.float64) - p_lens,
            data["seq_no_eos_mask"].cpu().view(-1).double(),
            torch.tensor(lens, dtype=torch.float64) - 1,
            p_lens,
        ], dim=1)
        cols = [loss_mask.double()]
        if has_ref:
            ref = data["packed_ref_logprobs"].float().cpu()
            k1 = rl.kl_estimate(old_logp, ref, "k1")
            cols.append(torch.where(loss_mask, k1, torch.zeros_like(k1)).double())
        seqs, _ = gather_dp(par, per_seq)
        toks, tok_off = gather_dp(par, torch.stack(cols, dim=1))
        batch = GroupBatch(score=seqs[:, 0], gen_len=seqs[:, 1], no_eos=seqs[:, 2] > 0.5,
                           short1=cu_seqlens_from_lengths(seqs[:, 3].long()), loss_mask=toks[:, 0] > 0.5,
                           kl=toks[:, 1] if has_ref else None)
        if greedy is not None:
            rows, _ = gather_dp(par, torch.stack([greedy["score"], greedy["gen_len"]], dim=1))
            batch.greedy_score, batch.greedy_gen_len = rows[:, 0], rows[:, 1]
        adv, mask, stats = group_advantages(batch, self)
        mine = slice(tok_off, tok_off + loss_mask.numel())
        stats["avg_prompt_len"] = float(seqs[:, 4].mean())
        stats["avg_seq_len"] = float((seqs[:, 3] + 1).mean())
        local = {"mask": mask[mine], "adv": adv[mine], "old_logp": old_logp}
        if has_ref:
            local["ref_logp"] = data["packed_ref_logprobs"].float().cpu()
        return local, stats

    def _mb_weight(self, mask: torch.Tensor, short1: torch.Tensor) -> float:
        """Loss weight of a (mini/micro) batch: what its aggregated loss is a mean over."""
        if self.agg_mode == "token-mean":
            return float(mask.sum())
        ids = rl.sequence_ids(short1, mask.numel())
        return float((rl.segment_sum(mask.double(), ids, short1.numel() - 1) > 0).sum())

    def train_step(self, model: Model, input_: SequenceSample,
                   mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, float]:
        """One GRPO-family update (``n_minibatches`` optimizer steps); the same stats on every rank."""
        module = model.module
        if not hasattr(module, "train_batch"):
            raise TypeError(f"train_step needs a training engine in model.module, got {type(module).__name__}.")
        par = module.par
        greedy = None
        if self.adv_estimator == "remax":  # the greedy answers are only a baseline: never trained on
            input_, greedy = split_greedy(input_, self.group_size)
        prep, stats = self._prepare(input_, par, greedy)
        dev = input_.data["packed_input_ids"].device
        data = {"packed_input_ids": input_.data["packed_input_ids"], "ppo_loss_mask": prep["mask"].to(dev),
                "old_logp": prep["old_logp"].to(dev), "advantages": prep["adv"].to(dev)}
        lens = seq_lens(input_)
        keys = {"packed_input_ids": lens, "ppo_loss_mask": [n - 1 for n in lens],
                "old_logp": [n - 1 for n in lens], "advantages": [n - 1 for n in lens]}
        if self.kl_loss_coef > 0:
            if "ref_logp" not in prep:
                raise KeyError("grpo_actor: kl_loss_coef > 0 needs packed_ref_logprobs in the input.")
            data["ref_logp"], keys["ref_logp"] = prep["ref_logp"].to(dev), keys["old_logp"]
        if LOGITS_MASK in input_.keys and not self.generation_config.force_no_logits_mask:
            data[LOGITS_MASK], keys[LOGITS_MASK] = input_.data[LOGITS_MASK], lens
        sample = grouped_sample(list(input_.ids), self.group_size, data, keys)
        if self.use_decoupled_loss:
            prox = module.forward(sample, mb_spec or MicroBatchSpec(), post_hook=self._logp_hook(module))
            if prox is None:  # not the last pipeline stage: it never evaluates the loss
                prox = torch.zeros_like(data["old_logp"])
            sample.update_(grouped_sample(list(input_.ids), self.group_size, {"prox_logp": prox.float().to(dev)},
                                          {"prox_logp": keys["old_logp"]}))

        n = n_minibatches(par, self.n_minibatches, sample.bs)
        minibatches = sample.split(n, key="packed_input_ids")
        weights = torch.tensor([self._mb_weight(mb.data["ppo_loss_mask"].cpu(), short1_cu_seqlens(
            packed_inputs(mb)[1].long())) for mb in minibatches], dtype=torch.float64)
        weights = dp_all_reduce(par, weights)
        sums: Dict[str, float] = {}
        n_steps = 0
        with _without_dropout(module.module):
            for mb, w in zip(minibatches, weights.tolist()):
                if w <= 0:  # no trained token on any rank (e.g. every group dropped): no step
                    continue
                st = module.train_batch(mb, mb_spec or MicroBatchSpec(), loss_fn=self._loss_fn(module),
                                        loss_weight_fn=lambda m: self._mb_weight(
                                            m.data["ppo_loss_mask"].cpu(),
                                            short1_cu_seqlens(packed_inputs(m)[1].long())))
                n_steps += 1
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in sums.items():
            stats["actor_loss" if k == "loss" else k] = v / n_steps
        for k in ("actor_loss", "grad_norm"):  # no step (nothing to train on): nothing moved
            stats.setdefault(k, 0.0)
        stats["n_updates"] = float(n_steps)
        return stats

    def _loss_fn(self, module):
        vocab, temp, tp_rank = _vocab_size(module.module), _temperature(self.generation_config), module.par.tp_rank

        def loss_of_logp(logp: torch.Tensor, mb: SequenceSample):
            _, cu, _ = packed_inputs(mb)
            d = logp.device
            short1 = short1_cu_seqlens(cu.to(d).long())
            mask = mb.data["ppo_loss_mask"].to(d)
            prox = mb.data["prox_logp"].to(d) if "prox_logp" in mb.keys else None
            loss, st = rl.ppo_policy_loss(
                logp, mb.data["old_logp"].to(d), mb.data["advantages"].to(d), mask, short1,
                eps_clip=self.eps_clip, eps_clip_higher=self.eps_clip_higher, c_clip=self.c_clip,
                importance_sampling_level=self.importance_sampling_level, prox_logprobs=prox,
                behav_imp_weight_cap=self.behav_imp_weight_cap if prox is not None else None,
                loss_agg_mode=self.agg_mode, max_len_norm=float(self.generation_config.max_new_tokens))
            stats = {k: float(v) for k, v in st.items()}
            stats["pg_loss"] = float(loss.detach())
            if self.kl_loss_coef > 0:
                kl_loss, kst = rl.kl_penalty_loss(logp, mb.data["ref_logp"].to(d), mask, short1, self.kl_estimator,
                                                  self.agg_mode, float(self.generation_config.max_new_tokens))
                loss = loss + self.kl_loss_coef * kl_loss
                stats["kl_loss"], stats["kl"] = float(kl_loss.detach()), float(kst["kl"])
            return loss, stats

        return masked_logprobs_loss(loss_of_logp, "ppo_loss_mask", vocab, temp, tp_rank, module.par.tp_size)

    def save(self, model: Model, save_dir: str) -> None:
        if self.enable_save:
            save_model(model, save_dir, self.hf_family, "grpo_actor")


register_interface("grpo_actor", GRPOActorInterface)
register_item_filter("grpo_dynamic_sampling", dynamic_sampling_filter)

__all__ = ["ADV_ESTIMATORS", "GRPOActorInterface", "GroupBatch", "gather_dp", "group_advantages"]
