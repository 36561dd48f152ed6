"""PPO actor (``ppo_actor``) and critic (``ppo_critic``) interfaces.

Data keys (see the PPO dataflow graph): the actor's ``generate`` turns
``packed_prompts`` into ``packed_input_ids`` (prompt + answer),
``packed_logprobs`` (L - 1, zero on prompt labels), ``prompt_mask`` (L),
``seq_no_eos_mask`` (1 per item) and, when sampling truncated the
vocabulary, ``packed_logits_mask`` (L x vocab); ``inference`` of the actor
interface (the reference model) gives ``packed_ref_logprobs``; the critic's
``inference`` gives ``values`` (L). Both ``train_step`` methods recompute the
same shaped rewards, GAE advantages and returns from
``packed_input_ids, packed_logprobs, packed_ref_logprobs, rewards, values,
prompt_mask, seq_no_eos_mask`` (so their KL controllers and value
normalizers stay identical) and take ``n_minibatches`` optimizer steps.

Conventions: ``values`` are the critic's raw outputs, in normalized units
when ``value_norm`` is on; they are denormalized before GAE, the value after
a finished sequence's EOS is 0 and a truncated sequence bootstraps from its
last value. ``rewards`` are the reward model's scores; the experiment
passes ``reward_output_scaling/bias`` to the reward interface, so these
interfaces apply their own (identity by default) before clipping. The
networks run without dropout during training, like the reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import (
    GenerationHyperparameters,
    MicroBatchSpec,
    Model,
    ModelInterface,
    register_interface,
)
from realhf.base import logging
from realhf.impl.model.backend.inference import EngineModule, packed_inputs
from realhf.impl.model.interface.common import loss_rows, packed_shifted_log_probs, scatter_rows, shifted_answer_mask
from realhf.impl.model.utils import ppo_functional as F
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths, log_probs_at, shifted_label_indices

logger = logging.getLogger("ppo interface")

LOGITS_MASK = "packed_logits_mask"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _engine(model: Model) -> EngineModule:
    module = model.module
    return module if isinstance(module, EngineModule) else EngineModule(module)


def _vocab_size(net: torch.nn.Module) -> Optional[int]:
    return getattr(getattr(net, "config", None), "vocab_size", None)


def _seq_lens(sample: SequenceSample, key: str = "packed_input_ids") -> List[int]:
    return [n for item in sample.seqlens[key] for n in item]


def _temperature(gconfig: GenerationHyperparameters) -> float:
    """Temperature the sampler used (greedy decoding does not warp logits)."""
    return 1.0 if gconfig.greedy or gconfig.temperature <= 0 else float(gconfig.temperature)


def _mask_logits(logits: torch.Tensor, mask: Optional[torch.Tensor], tp_rank: int) -> torch.Tensor:
    """Remove tokens the sampler could not draw (``mask`` False); vocab shards take their slice."""
    if mask is None:
        return logits
    mask = mask.to(logits.device).bool()
    width = logits.shape[-1]
    if mask.shape[-1] != width:
        mask = mask[:, tp_rank * width:(tp_rank + 1) * width]
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def _policy_logits(logits: torch.Tensor, mb: SequenceSample, temperature: float, tp_rank: int,
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits as the sampler drew from them; ``rows``: ``logits`` hold these token rows only."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    mask = mb.data.get(LOGITS_MASK) if LOGITS_MASK in mb.keys else None
    if mask is not None and rows is not None:
        mask = mask.index_select(0, rows.to(mask.device))
    return _mask_logits(logits, mask, tp_rank)


def masked_logprobs_loss(loss_of_logp: Callable[[torch.Tensor, SequenceSample], Any], mask_key: str, vocab: int,
                         temperature: float, tp_rank: int, tp_size: int) -> Callable:
    """A training loss over shifted log-probs that reads only positions where ``mask_key`` is True.

    ``loss_of_logp(logp, mb)`` gets the log-probs in the shifted layout (``L - 1`` per
    sequence). Without tensor parallelism the loss asks the engine for the logits of the
    rows it reads only (``output_rows``): the last block and the head skip prompt rows,
    and positions outside the mask hold 0 (every loss masks them)."""
    if tp_size > 1:
        def full_loss(logits: torch.Tensor, mb: SequenceSample):
            ids, cu, _ = packed_inputs(mb)
            lg = _policy_logits(logits, mb, temperature, tp_rank)
            return loss_of_logp(packed_shifted_log_probs(lg, cu.to(lg.device), ids.to(lg.device), vocab), mb)

        return full_loss

    def loss_fn(logits: torch.Tensor, mb: SequenceSample):
        ids, _, _ = packed_inputs(mb)
        rows, index, n = loss_rows(mb, mask_key)
        lg = _policy_logits(logits, mb, temperature, tp_rank, rows)
        labels = ids.to(lg.device).index_select(0, rows.to(lg.device) + 1)
        return loss_of_logp(scatter_rows(log_probs_at(lg, labels), index, n), mb)

    loss_fn.output_rows = lambda mb: loss_rows(mb, mask_key)[0]
    return loss_fn


@contextlib.contextmanager
def _without_dropout(net: torch.nn.Module) -> Iterator[None]:
    """Keep submodules in eval mode while the engine switches the network to training.

    The network itself still reports ``training`` (gradient checkpointing
    depends on it); dropout and attention dropout live in submodules.
    """

    def train(mode: bool = True):
        torch.nn.Module.train(net, mode)
        for child in net.children():
            child.train(False)
        return net

    net.train = train  # instance attribute shadows the method
    try:
        yield
    finally:
        del net.train


def _dp_sum(par, values: List[float], device=None) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if par.dp_group is not None:
        par.all_reduce(t, par.dp_group)
    return t.cpu().tolist()


def _n_minibatches(par, requested: int, bs: int) -> int:
    """Same number of minibatches on every dp rank (ranks may hold different item counts)."""
    n = torch.tensor([min(requested, bs)], dtype=torch.float64)
    if par.dp_group is not None:
        par.all_reduce(n, par.dp_group, op=dist.ReduceOp.MIN)
    return max(1, int(n.item()))


def sample_answers(model: Model, prompts: SequenceSample, mb_spec: Optional[MicroBatchSpec],
                   gconfig: GenerationHyperparameters) -> Optional[Tuple[List[int], Dict[str, torch.Tensor]]]:
    """Sample one answer per prompt (``packed_input_ids`` holds the prompts).

    Returns the sequence lengths (prompt + answer) and the rollout keys
    (``packed_input_ids``, ``prompt_mask``, ``packed_logprobs``,
    ``seq_no_eos_mask`` and, when sampling truncated the vocabulary and
    ``gconfig`` keeps the mask, ``packed_logits_mask``), or None on
    non-last pipeline stages.
    """
    engine = _engine(model)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    out = engine.generate(prompts, mb_spec or MicroBatchSpec(), gconfig, eos)
    if out is None:
        return None
    ids, cu, _ = packed_inputs(prompts)
    ppo = out.packed_ppo_inputs(ids, cu.to(ids.device))
    lens = (ppo.cu_seqlens[1:] - ppo.cu_seqlens[:-1]).tolist()
    data = {
        "packed_input_ids": ppo.packed_input_ids,
        "prompt_mask": ppo.prompt_mask,
        "packed_logprobs": ppo.packed_logprobs.float(),
        "seq_no_eos_mask": ppo.seq_no_eos_mask.bool(),
    }
    if ppo.packed_logits_mask is not None and not gconfig.force_no_logits_mask:
        data[LOGITS_MASK] = ppo.packed_logits_mask
    return lens, data


# --------------------------------------------------------------------------- #
# Shared PPO hyperparameters and advantage computation
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class _PPOBase(ModelInterface):
    n_minibatches: int = 4
    generation_config: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    kl_ctl: float = 0.1
    adaptive_kl_ctl: bool = False
    adaptive_kl_target: float = 6.0
    adaptive_kl_horizon: float = 10000.0
    discount: float = 1.0
    gae_lambda: float = 1.0
    eps_clip: float = 0.2
    value_eps_clip: float = 0.2
    max_reward_clip: float = 20.0
    reward_output_scaling: float = 1.0
    reward_output_bias: float = 0.0
    early_stop_imp_ratio: Optional[float] = 5.0
    early_stop_kl: Optional[float] = None
    adv_norm: bool = True
    value_norm: bool = True
    value_norm_type: str = "exp"
    value_norm_beta: float = 0.99995
    value_norm_eps: float = 1e-5
    enable_save: bool = True
    hf_family: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.generation_config, dict):
            self.generation_config = GenerationHyperparameters(**self.generation_config)
        if self.n_minibatches < 1:
            raise ValueError(f"n_minibatches must be >= 1, got {self.n_minibatches}.")
        if self.adaptive_kl_ctl:
            self.kl_controller = F.AdaptiveKLController(self.kl_ctl, self.adaptive_kl_target,
                                                        self.adaptive_kl_horizon)
        else:
            self.kl_controller = F.FixedKLController(self.kl_ctl)
        self.rms = F.ValueNormalizer(self.value_norm_type, self.value_norm_beta, self.value_norm_eps) \
            if self.value_norm else None

    def _advantages(self, sample: SequenceSample, par) -> Dict[str, Any]:
        """Shaped rewards, GAE and the batch statistics shared by actor and critic."""
        data = sample.data
        lens = _seq_lens(sample)
        device = data["packed_input_ids"].device
        cu = cu_seqlens_from_lengths(lens).to(device)
        short1 = F.short1_cu_seqlens(cu)
        prompt_mask = data["prompt_mask"].bool()
        loss_mask = shifted_answer_mask(prompt_mask, cu)
        old_logp = data["packed_logprobs"].float() * loss_mask
        ref_logp = data["packed_ref_logprobs"].float().to(device) * loss_mask
        no_eos = data["seq_no_eos_mask"].bool().to(device).view(-1)
        score = data["rewards"].float().to(device).view(-1)
        values = data["values"].float().to(device)
        den_values = self.rms.denormalize(values) if self.rms is not None else values.clone()
        ends = cu[1:] - 1
        den_values[ends[~no_eos]] = 0.0

        kl_rewards, rewards = F.shaped_rewards(
            self.kl_controller.value, old_logp, ref_logp, score, short1, no_eos, self.max_reward_clip,
            loss_mask=loss_mask, reward_scaling=self.reward_output_scaling, reward_bias=self.reward_output_bias)
        adv, returns = F.get_packed_advantages_and_returns(self.discount, self.gae_lambda, den_values, rewards,
                                                           short1, no_eos)
        reduce = par.dp_group is not None and dist.is_initialized()
        if self.rms is not None:
            self.rms.group, self.rms.all_reduce = par.dp_group, reduce
            self.rms.update(returns, loss_mask)

        # Batch statistics over all dp ranks.
        n_seqs = len(lens)
        n_answer = float(loss_mask.sum())
        seq_kl = torch.zeros(n_seqs, dtype=torch.float64, device=device)
        seq_ids = torch.repeat_interleave(torch.arange(n_seqs, device=device),
                                          torch.as_tensor([n - 1 for n in lens], device=device))
        seq_kl.index_add_(0, seq_ids, (old_logp - ref_logp).double())
        prompt_lens = [int(p.sum()) for p in torch.split(prompt_mask, lens)]
        pred, _ = shifted_label_indices(cu)
        (tot_seqs, tot_answer, s_score, s_klr, s_kl, s_adv, s_len, s_plen, s_ret, s_val) = _dp_sum(par, [
            n_seqs, n_answer, float(score.sum()), float(kl_rewards.sum()), float(seq_kl.sum()),
            float((adv * loss_mask).sum()), float(sum(lens)), float(sum(prompt_lens)),
            float((returns * loss_mask).sum()),
            float((den_values[pred] * loss_mask).sum()),
        ])
        tot_seqs, tot_answer = max(tot_seqs, 1.0), max(tot_answer, 1.0)
        stats = {
            "task_reward": s_score / tot_seqs,
            "kl_reward": s_klr / tot_seqs,
            "ref_kl": s_kl / tot_seqs,
            "advantage": s_adv / tot_answer,
            "returns": s_ret / tot_answer,
            "denormalized_values": s_val / tot_answer,
            "avg_seq_len": s_len / tot_seqs,
            "avg_prompt_len": s_plen / tot_seqs,
            "kl_ctl": self.kl_controller.value,
        }
        self.kl_controller.update(s_kl / tot_seqs, int(tot_seqs))

        if self.adv_norm:
            adv = F.masked_advantage_normalization(adv, loss_mask, all_reduce=reduce, group=par.dp_group)
        return dict(lens=lens, cu=cu, loss_mask=loss_mask, old_logp=old_logp, adv=adv, returns=returns,
                    values=values, stats=stats)

    def _train_minibatches(self, model: Model, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec],
                           loss_fn, weight_key: str) -> Dict[str, float]:
        module = model.module
        if not hasattr(module, "train_batch"):
            raise TypeError(f"train_step needs a training engine in model.module, got {type(module).__name__}.")
        n = _n_minibatches(module.par, self.n_minibatches, sample.bs)
        sums: Dict[str, float] = {}
        with _without_dropout(module.module):
            for mb in sample.split(n, key="packed_input_ids"):
                st = module.train_batch(mb, mb_spec or MicroBatchSpec(), loss_fn=loss_fn,
                                        loss_weight_fn=lambda m: float(m.data[weight_key].sum()))
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / n for k, v in sums.items()}

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"kl_controller": self.kl_controller.state_dict()}
        if self.rms is not None:
            state["value_normalizer"] = self.rms.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not state:  # a recover state written before interfaces kept theirs
            logger.warning("the recover state holds no PPO running state; the KL coefficient and the value "
                           "normalizer start afresh, so the resumed run will differ from an uninterrupted one.")
            return
        self.kl_controller.load_state_dict(state["kl_controller"])
        if (self.rms is None) != ("value_normalizer" not in state):
            raise ValueError(f"ppo.value_norm={self.rms is not None} in this run, but the saved state "
                             f"{'lacks' if self.rms is not None else 'has'} value normalizer statistics.")
        if self.rms is not None:
            self.rms.load_state_dict(state["value_normalizer"])

    def save(self, model: Model, save_dir: str) -> None:
        if not self.enable_save:
            return
        from realhf.impl.model.conversion.parallel_save import save_hf_checkpoint

        net = _engine(model).module
        family = getattr(net, "hf_family", None) or self.hf_family
        if family is None:
            raise ValueError("ppo save: the model records no HF family; set the interface's hf_family argument.")
        save_hf_checkpoint(net, family, model.tokenizer, save_dir)


# --------------------------------------------------------------------------- #
# Actor
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class PPOActorInterface(_PPOBase):
    """The ``ppo_actor`` interface (also the reference model's ``inference``)."""

    force_no_logits_mask: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.force_no_logits_mask:
            self.generation_config = dataclasses.replace(self.generation_config, force_no_logits_mask=True)

    @torch.no_grad()
    def generate(self, model: Model, input_: SequenceSample,
                 mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """Sample one answer per prompt. Returns None on non-last pipeline stages
        (the model worker stores last-stage outputs only)."""
        prompts = input_.select(["packed_prompts"])
        prompts.remap_keys_({"packed_prompts": "packed_input_ids"})
        rollout = sample_answers(model, prompts, mb_spec, self.generation_config)
        if rollout is None:
            return None
        lens, data = rollout
        return SequenceSample.from_default(lens, list(input_.ids), data)

    @torch.no_grad()
    def inference(self, model: Model, input_: SequenceSample,
                  mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``packed_ref_logprobs`` (L - 1 per sequence) of ``packed_input_ids``
        under the sampler's temperature and logits mask; None on non-last stages."""
        engine = _engine(model)
        net = engine.module
        vocab, temp, tp_rank = _vocab_size(net), _temperature(self.generation_config), engine.par.tp_rank

        def hook(logits: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
            ids, cu, _ = packed_inputs(mb)
            lg = _policy_logits(logits, mb, temp, tp_rank)
            return packed_shifted_log_probs(lg, cu.to(lg.device), ids.to(lg.device), vocab).float()

        logp = engine.forward(input_, mb_spec or MicroBatchSpec(), post_hook=hook)
        if logp is None:
            return None
        return SequenceSample.from_default(_seq_lens(input_), list(input_.ids), {"packed_ref_logprobs": logp})

    def train_step(self, model: Model, input_: SequenceSample,
                   mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, float]:
        """One PPO update (``n_minibatches`` optimizer steps); every rank returns the same stats."""
        module = model.module
        par = module.par
        prep = self._advantages(input_, par)
        data = {
            "packed_input_ids": input_.data["packed_input_ids"],
            "ppo_loss_mask": prep["loss_mask"],
            "old_logp": prep["old_logp"],
            "advantages": prep["adv"].float(),
        }
        stats = dict(prep["stats"])
        lmask = input_.data.get(LOGITS_MASK) if LOGITS_MASK in input_.keys else None
        if lmask is not None and not self.generation_config.force_no_logits_mask:
            data[LOGITS_MASK] = lmask
            pred, _ = shifted_label_indices(prep["cu"])
            rows = lmask[pred][prep["loss_mask"]]
            vv = _dp_sum(par, [float(rows.float().mean(-1).sum()), float(rows.shape[0])])
            stats["valid_vocab_ratio"] = vv[0] / max(vv[1], 1.0)
        sample = SequenceSample.from_default(prep["lens"], list(input_.ids), data)

        vocab, temp, tp_rank = _vocab_size(module.module), _temperature(self.generation_config), par.tp_rank

        def loss_of_logp(logp: torch.Tensor, mb: SequenceSample):
            dev = logp.device
            return F.actor_loss(logp, mb.data["old_logp"].to(dev), mb.data["advantages"].to(dev), self.eps_clip,
                                mb.data["ppo_loss_mask"].to(dev), self.early_stop_imp_ratio, self.early_stop_kl)

        loss_fn = masked_logprobs_loss(loss_of_logp, "ppo_loss_mask", vocab, temp, tp_rank, par.tp_size)
        train = self._train_minibatches(model, sample, mb_spec, loss_fn, "ppo_loss_mask")
        stats["actor_loss"] = train.pop("loss")
        stats["actor_clip_ratio"] = train.pop("clip_ratio")
        stats["ppo_approx_kl"] = train.pop("approx_kl")
        stats.update(train)
        return stats


# --------------------------------------------------------------------------- #
# Critic
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class PPOCriticInterface(_PPOBase):
    """The ``ppo_critic`` interface."""

    value_loss_type: str = "mse"
    huber_delta: float = 10.0

    @torch.no_grad()
    def inference(self, model: Model, input_: SequenceSample,
                  mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``values`` (one per token) of ``packed_input_ids``; None on non-last stages."""
        engine = _engine(model)
        values = engine.forward(input_, mb_spec or MicroBatchSpec(),
                                post_hook=lambda out, mb: out.float().reshape(-1))
        if values is None:
            return None
        return SequenceSample.from_default(_seq_lens(input_), list(input_.ids), {"values": values})

    def train_step(self, model: Model, input_: SequenceSample,
                   mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, float]:
        """One value-function update (``n_minibatches`` optimizer steps); same stats on every rank."""
        par = model.module.par
        prep = self._advantages(input_, par)
        returns = self.rms.normalize(prep["returns"]) if self.rms is not None else prep["returns"]
        data = {
            "packed_input_ids": input_.data["packed_input_ids"],
            "ppo_loss_mask": prep["loss_mask"],
            "values": prep["values"],
            "returns": returns.float(),
        }
        sample = SequenceSample.from_default(prep["lens"], list(input_.ids), data)

        def loss_fn(out: torch.Tensor, mb: SequenceSample):
            # Values of the rows the loss reads only (see ``output_rows``); 0 at masked positions.
            rows, index, n = loss_rows(mb, "ppo_loss_mask")
            v = scatter_rows(out.float().reshape(-1), index, n)
            dev = v.device
            old = mb.data["values"].to(dev)[rows.to(dev)]
            old = scatter_rows(old, index, n)
            return F.critic_loss(v, old, mb.data["returns"].to(dev), self.value_eps_clip,
                                 mb.data["ppo_loss_mask"].to(dev), self.value_loss_type, self.huber_delta)

        loss_fn.output_rows = lambda mb: loss_rows(mb, "ppo_loss_mask")[0]

        train = self._train_minibatches(model, sample, mb_spec, loss_fn, "ppo_loss_mask")
        stats = dict(prep["stats"])
        stats["value_loss"] = train.pop("loss")
        stats.update(train)
        return stats


register_interface("ppo_actor", PPOActorInterface)
register_interface("ppo_critic", PPOCriticInterface)
