"""The ``grpo`` quickstart experiment: critic-free RL with groups of samples per prompt.

One config covers GRPO, Dr.GRPO, RLOO, REINFORCE++(-baseline), ReMax (a
greedy baseline per prompt), DAPO (clip higher, dynamic sampling, overlong
penalty, token-mean loss) and GSPO (sequence-level ratio); the building blocks are those of
:mod:`realhf.impl.model.utils.rl_functional` and the actor interface is
``grpo_actor`` (:mod:`realhf.impl.model.interface.grpo_interface`).

Calls: ``actor_gen`` (``group_size`` answers per prompt), ``rew_inf`` (a
rule reward on decoded text by default, or a reward model), ``ref_inf``
(only when a KL term is on) and ``actor_train``. With
``grpo.adv_estimator=remax`` ``actor_gen`` also decodes one greedy answer
per prompt, which travels as the last sequence of the prompt's item: the
reward call scores it and ``actor_train`` subtracts its reward from the
sampled ones and then drops it (never trained on, never in a statistic of
the sampled answers).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from realhf.api.core.model_api import GenerationHyperparameters
from realhf.api.core.system_api import Dataset, ExperimentConfig
from realhf.api.quickstart.algorithms import _critic_model, _prompt_dataset
from realhf.api.quickstart.base import ConfigError, check_choice, check_positive_int, check_range, join_key
from realhf.api.quickstart.checks import check_batch_covers_dp, check_language_model, check_prompt_room
from realhf.api.quickstart.dataset import PromptOnlyDatasetConfig
from realhf.api.quickstart.experiment import CommonExperimentConfig
from realhf.api.quickstart.model import MFCConfig, ModelTrainEvalConfig
from realhf.api.quickstart.ppo import PPOHyperparameters, validate_generation

ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax")
# Estimators whose baseline is the prompt's other samples: they need at least two per group.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")
NORM_LEVELS = ("batch", "group", "none")
REW_INTERFACES = ("rule_reward", "paired_rw")
GRPO_MFCS = ("actor_gen", "rew_inf", "ref_inf", "actor_train")


@dataclasses.dataclass
class NormConfig:
    """Centre (``mean_level``) and scale (``std_level``) over the batch, each group, or not ("none")."""

    mean_level: str = "none"
    std_level: str = "none"

    def levels(self) -> Tuple[Optional[str], Optional[str]]:
        """As :func:`rl_functional.normalize` takes them ("none" -> None)."""
        return tuple(None if x == "none" else x for x in (self.mean_level, self.std_level))  # type: ignore

    def validate(self, prefix: str, group_size: int) -> None:
        for name in ("mean_level", "std_level"):
            key = join_key(prefix, name)
            value = getattr(self, name)
            check_choice(key, value, NORM_LEVELS)
            if value == "group" and group_size < 2:
                raise ConfigError(f"{key}='group' needs groups of at least 2 samples; grpo.group_size={group_size}.")


@dataclasses.dataclass
class GRPOHyperparameters:
    """GRPO-family settings.

    :param gen: rollout sampling (shortcuts below as in ppo).
    :param group_size: answers sampled per prompt (>= 2 for group baselines).
    :param n_minibatches: optimizer steps per update (one pass; groups are never split).
    :param adv_estimator: "grpo", "dr_grpo" (no std division, loss_agg_mode
        seq-mean-token-sum-norm unless set), "rloo", "reinforce_plus_plus",
        "reinforce_plus_plus_baseline", "remax" (``r_i - r(greedy answer)``: one
        more, greedy, answer per prompt is generated and scored, and its reward
        with the overlong penalty but no KL term is the baseline; works with
        group_size=1; not with greedy sampling, dynamic_sampling or reward_norm).
    :param norm_adv_by_std: grpo/dr_grpo only: divide by the group std (None: by estimator).
    :param eps_clip: ratio clip (lower side, and upper unless eps_clip_higher).
    :param eps_clip_higher: DAPO clip-higher upper bound (None: symmetric).
    :param c_clip: dual clip bound for negative advantages (None: off; > 1).
    :param importance_sampling_level: "token" or "sequence" (GSPO: one length-normalised ratio per sequence).
    :param loss_agg_mode: token-mean, seq-mean-token-sum, seq-mean-token-mean,
        seq-mean-token-sum-norm (normaliser gen.max_new_tokens); None: token-mean
        (dr_grpo: seq-mean-token-sum-norm).
    :param kl_ctl: KL in the reward: k1 per answer token against the reference
        (summed per sequence for the group estimators, per token for REINFORCE++).
    :param kl_loss_coef: KL as a loss term with ``kl_estimator``.
    :param kl_estimator: k1/kl, k2/mse, k3/low_var_kl, abs (the KL loss term).
    :param reward_norm: normalise rewards before the estimator.
    :param adv_norm: normalise advantages after the estimator (over trained tokens).
    :param dynamic_sampling: DAPO: groups whose rewards are all equal are
        dropped and the batch is refilled: ``actor_gen`` and ``rew_inf`` run
        again on further batches of ``dataset.train_bs_n_seqs`` prompts until
        that many groups have different rewards, and ``ref_inf`` and
        ``actor_train`` get exactly those (the first ones drawn). Statistics of
        ``actor_train``: ``filter_rounds`` (batches generated), ``filter_passed``
        / ``filter_dropped`` (groups kept / dropped over all rounds),
        ``filter_items`` (groups trained on). Refills draw prompts from the
        dataloader, so an epoch ends in fewer steps.
    :param dynamic_sampling_max_batches: cap on the batches generated per step,
        the first included (verl's ``max_num_gen_batches``); 0: no cap (the
        refill still stops when a whole batch holds only prompts this step has
        drawn). At the cap the update uses the groups that passed (at least
        one per dp rank: flat groups pad, with no weight in the loss).
    :param overlong_tokens: DAPO soft overlong penalty over the last this many
        generation tokens (None: off).
    :param overlong_penalty_factor: the penalty at gen.max_new_tokens tokens.
    :param mask_no_eos_with_zero: truncated answers (no EOS) are not trained on.
    :param use_decoupled_loss: AReaL decoupled loss; the proximal policy is
        recomputed before the update, which in this synchronous system equals
        the behaviour policy up to numerics (generation vs training kernels).
    :param behav_imp_weight_cap: drop tokens whose behaviour weight exceeds this (> 1; decoupled loss only).
    :param reward_output_scaling: reward = (score - bias) * scaling (applied by the reward call).
    :param reward_output_bias: see reward_output_scaling.
    :param max_reward_clip: rewards (with the overlong penalty) clipped to +-this.
    :param reuse_rollout_products: the training forward takes the matrix products the
        generation computed for the same sequences (CPU decoding, unchanged weights) instead of
        recomputing them; equal up to float rounding (see ``linear_replay``).
    """

    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    group_size: int = 8
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
    reward_norm: NormConfig = dataclasses.field(default_factory=NormConfig)
    adv_norm: NormConfig = dataclasses.field(default_factory=NormConfig)
    dynamic_sampling: bool = False
    dynamic_sampling_max_batches: int = 0
    overlong_tokens: Optional[int] = None
    overlong_penalty_factor: Optional[float] = None
    mask_no_eos_with_zero: bool = False
    use_decoupled_loss: bool = False
    behav_imp_weight_cap: Optional[float] = None
    reward_output_scaling: float = 1.0
    reward_output_bias: float = 0.0
    max_reward_clip: float = 20.0
    reuse_rollout_products: bool = True
    max_new_tokens: Optional[int] = None
    min_new_tokens: Optional[int] = None
    greedy: Optional[bool] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    temperature: Optional[float] = None

    def __post_init__(self):
        self.apply_gen_shortcuts()

    def apply_gen_shortcuts(self, prefix: str = "grpo") -> None:
        """Copy the shortcut fields that are set into ``gen`` (the ppo rule)."""
        PPOHyperparameters.apply_gen_shortcuts(self, prefix)  # type: ignore[arg-type]

    @property
    def answers_per_prompt(self) -> int:
        """Sequences of one item: the group, plus the greedy answer for ReMax."""
        return self.group_size + (1 if self.adv_estimator == "remax" else 0)

    @property
    def uses_ref(self) -> bool:
        """Whether a reference model is needed (a KL term is on)."""
        return self.kl_ctl > 0 or self.kl_loss_coef > 0

    def interface_args(self) -> Dict[str, Any]:
        """Arguments of the ``grpo_actor`` interface."""
        rn, an = self.reward_norm.levels(), self.adv_norm.levels()
        names = ("group_size", "n_minibatches", "adv_estimator", "norm_adv_by_std", "eps_clip", "eps_clip_higher",
                 "c_clip", "importance_sampling_level", "loss_agg_mode", "kl_ctl", "kl_loss_coef", "kl_estimator",
                 "dynamic_sampling", "overlong_tokens", "overlong_penalty_factor", "mask_no_eos_with_zero",
                 "use_decoupled_loss", "behav_imp_weight_cap", "max_reward_clip", "reuse_rollout_products")
        return dict({n: getattr(self, n) for n in names}, generation_config=self.gen,
                    force_no_logits_mask=self.gen.force_no_logits_mask,
                    reward_norm_mean_level=rn[0], reward_norm_std_level=rn[1],
                    adv_norm_mean_level=an[0], adv_norm_std_level=an[1])

    def validate(self, prefix: str = "grpo") -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        validate_generation(self.gen, k("gen"))
        check_choice(k("adv_estimator"), self.adv_estimator, ADV_ESTIMATORS)
        check_positive_int(k("group_size"), self.group_size)
        if self.adv_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ConfigError(f"{k('group_size')}={self.group_size}: {k('adv_estimator')}={self.adv_estimator!r} "
                              "takes its baseline from the other samples of a prompt; use at least 2.")
        if self.gen.greedy and (self.adv_estimator in GROUP_ESTIMATORS or self.dynamic_sampling):
            what = (f"{k('dynamic_sampling')}=True would drop every group" if self.adv_estimator not in GROUP_ESTIMATORS
                    else f"{k('adv_estimator')}={self.adv_estimator!r} would give every answer advantage 0")
            raise ConfigError(f"{k('gen.greedy')}=True (or {k('greedy')}, or temperature 0): the {self.group_size} "
                              f"answers of a prompt would all be its one greedy answer, so {what}; sample "
                              f"(a {k('temperature')} above 0).")
        check_positive_int(k("n_minibatches"), self.n_minibatches)
        if self.norm_adv_by_std is not None and self.adv_estimator not in ("grpo", "dr_grpo"):
            raise ConfigError(f"{k('norm_adv_by_std')}={self.norm_adv_by_std} only applies to grpo and dr_grpo; "
                              f"{self.adv_estimator!r} does not divide by a group std: set it to null "
                              f"(or use {k('adv_norm')}).")
        check_range(k("eps_clip"), self.eps_clip, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.eps_clip_higher is not None:
            check_range(k("eps_clip_higher"), self.eps_clip_higher, 0.0, lo_open=True)
        if self.c_clip is not None:
            check_range(k("c_clip"), self.c_clip, 1.0, lo_open=True)
        check_choice(k("importance_sampling_level"), self.importance_sampling_level, ("token", "sequence"))
        if self.loss_agg_mode is not None:
            check_choice(k("loss_agg_mode"), self.loss_agg_mode, LOSS_AGG_MODES)
        check_range(k("kl_ctl"), self.kl_ctl, 0.0)
        check_range(k("kl_loss_coef"), self.kl_loss_coef, 0.0)
        check_choice(k("kl_estimator"), self.kl_estimator, KL_ESTIMATORS)
        self.reward_norm.validate(k("reward_norm"), self.group_size)
        self.adv_norm.validate(k("adv_norm"), self.group_size)
        if self.dynamic_sampling and self.group_size < 2:
            raise ConfigError(f"{k('dynamic_sampling')}=True drops groups whose rewards are all equal, which a "
                              f"single sample always is; {k('group_size')}={self.group_size} must be at least 2.")
        check_range(k("dynamic_sampling_max_batches"), self.dynamic_sampling_max_batches, 0)
        if self.dynamic_sampling_max_batches and not self.dynamic_sampling:
            raise ConfigError(f"{k('dynamic_sampling_max_batches')}={self.dynamic_sampling_max_batches} caps the "
                              f"refill of dynamic sampling; set {k('dynamic_sampling')}=True or leave it 0.")
        if (self.overlong_tokens is None) != (self.overlong_penalty_factor is None):
            raise ConfigError(f"{k('overlong_tokens')}={self.overlong_tokens} and {k('overlong_penalty_factor')}="
                              f"{self.overlong_penalty_factor}: set both (the penalty is on) or neither.")
        if self.overlong_tokens is not None:
            check_range(k("overlong_tokens"), self.overlong_tokens, 1, self.gen.max_new_tokens)
            check_range(k("overlong_penalty_factor"), self.overlong_penalty_factor, 0.0)
        if self.behav_imp_weight_cap is not None:
            if not self.use_decoupled_loss:
                raise ConfigError(f"{k('behav_imp_weight_cap')}={self.behav_imp_weight_cap} caps the weight of the "
                                  f"decoupled loss; set {k('use_decoupled_loss')}=True or leave it null.")
            check_range(k("behav_imp_weight_cap"), self.behav_imp_weight_cap, 1.0, lo_open=True)
        if self.reward_output_scaling == 0:
            raise ConfigError(f"{k('reward_output_scaling')}=0 would zero every reward; use a non-zero value.")
        check_range(k("max_reward_clip"), self.max_reward_clip, 0.0, lo_open=True)
        if self.adv_estimator == "remax":
            self._validate_remax(k)

    def _validate_remax(self, k) -> None:
        """Options that contradict a greedy baseline."""
        est = f"{k('adv_estimator')}='remax'"
        if self.gen.greedy:
            raise ConfigError(f"{k('gen.greedy')}=True (or {k('greedy')}, or temperature 0) with {est}: every "
                              "sampled answer would be the greedy baseline and every advantage 0; sample.")
        if self.dynamic_sampling:
            raise ConfigError(f"{k('dynamic_sampling')}=True with {est}: it drops groups whose sampled rewards are "
                              "all equal, which still have advantages against their greedy answer; turn it off.")
        for name in ("mean_level", "std_level"):
            if getattr(self.reward_norm, name) != "none":
                raise ConfigError(f"{k('reward_norm.' + name)}={getattr(self.reward_norm, name)!r} with {est}: the "
                                  "greedy baseline's reward is not normalised alike; set it to 'none' (use "
                                  f"{k('adv_norm')} instead).")


@dataclasses.dataclass
class RuleRewardConfig:
    """Options of the ``rule_reward`` interface (``rew_interface=rule_reward``).

    :param reward: spec: "math", "format", an entry ``{name, weight, ...}``
        or a list of them (``{name: custom, path, function}`` for a user function).
    :param answer_key: dataset field with the reference answer ("math" needs it).
    :param n_workers: reward processes per reward rank (0: in-process, no timeout).
    :param timeout_s: limit of one reward call.
    :param default_reward: reward of a call that failed or timed out (null: stop the run).
    """

    reward: Any = "math"
    answer_key: str = "answer"
    n_workers: int = 2
    timeout_s: float = 10.0
    default_reward: Optional[float] = 0.0

    def validate(self, prefix: str = "rule_reward") -> List[Dict[str, Any]]:
        """Checks; returns the normalised spec entries."""
        from realhf.impl.reward.mixture import RewardSpecError, build_mixture, normalize_spec

        check_range(join_key(prefix, "n_workers"), self.n_workers, 0)
        check_range(join_key(prefix, "timeout_s"), self.timeout_s, 0.0, lo_open=True)
        if not self.answer_key:
            raise ConfigError(f"{join_key(prefix, 'answer_key')} is empty; name the dataset field of the answer.")
        try:
            entries = normalize_spec(self.reward)
            build_mixture(self.reward)  # loads user files now, not in a worker
        except (RewardSpecError, OSError, ImportError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"{join_key(prefix, 'reward')}={self.reward!r}: {e}") from None
        return entries


@dataclasses.dataclass
class GRPOConfig(CommonExperimentConfig):
    """GRPO-family RL: ``actor_gen`` -> ``rew_inf`` [-> ``ref_inf``] -> ``actor_train``.

    :param actor: the trained policy.
    :param ref: frozen reference for the KL terms; only built when
        grpo.kl_ctl > 0 or grpo.kl_loss_coef > 0 (empty path: the actor's checkpoint).
    :param rew: with rew_interface=paired_rw the reward model (a critic);
        with rule_reward only its tokenizer is read (empty path: the actor's).
    :param rew_interface: "rule_reward" (rewards from decoded text, see
        ``rule_reward``) or "paired_rw" (a trained reward model).
    :param rule_reward: options of the rule reward.
    :param dataset: prompts; extra fields (e.g. ``answer``) reach the reward.
    :param grpo: algorithm settings.
    """

    actor: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    ref: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    rew: ModelTrainEvalConfig = dataclasses.field(default_factory=_critic_model)
    rew_interface: str = "rule_reward"
    rule_reward: RuleRewardConfig = dataclasses.field(default_factory=RuleRewardConfig)
    actor_gen: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    rew_inf: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    ref_inf: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    actor_train: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    dataset: PromptOnlyDatasetConfig = dataclasses.field(default_factory=PromptOnlyDatasetConfig)
    grpo: GRPOHyperparameters = dataclasses.field(default_factory=GRPOHyperparameters)

    @property
    def call_names(self) -> Tuple[str, ...]:
        return tuple(n for n in GRPO_MFCS if n != "ref_inf" or self.grpo.uses_ref)

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        return {n: getattr(self, n) for n in self.call_names}

    @property
    def train_mfc_names(self) -> Sequence[str]:
        return ("actor_train",)

    @property
    def ref_model(self) -> ModelTrainEvalConfig:
        """The reference's config: ``ref``, or the actor's checkpoint when ``ref.path`` is empty."""
        return self.ref if self.ref.path else self.actor

    @property
    def tokenizer_path(self) -> str:
        """Tokenizer of the rule reward: ``rew.path`` or the actor's."""
        return self.rew.path or self.actor.path

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        out = {"actor_gen": ("actor", self.actor), "actor_train": ("actor", self.actor)}
        if self.grpo.uses_ref:
            out["ref_inf"] = ("ref" if self.ref.path else "actor", self.ref_model)
        if self.rew_interface == "paired_rw":  # a rule reward runs no network
            out["rew_inf"] = ("rew", self.rew)
        return out

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        """Items hold a whole group and are never split across micro-batches."""
        g, prompt = self.grpo.answers_per_prompt, self.dataset.max_prompt_len
        new = self.grpo.max_new_tokens if self.grpo.max_new_tokens is not None else self.grpo.gen.max_new_tokens
        size = "grpo.group_size" if g == self.grpo.group_size else "(grpo.group_size + 1 greedy answer)"
        full = (g * (prompt + new), f"{size} x (dataset.max_prompt_len + grpo.gen.max_new_tokens)")
        return {n: ((prompt, "dataset.max_prompt_len") if n == "actor_gen" else full) for n in self.call_names}

    @property
    def datasets(self) -> List[Dataset]:
        return [_prompt_dataset(self.dataset)]

    def validate(self, *, check_paths: bool = True) -> None:
        super().validate()
        check_choice("rew_interface", self.rew_interface, REW_INTERFACES)
        check_language_model("actor", self.actor, "GRPO")
        self.actor.validate("actor", check_path=check_paths)
        if self.grpo.uses_ref and self.ref.path:
            check_language_model("ref", self.ref, "the KL reference")
            self.ref.validate("ref", check_path=check_paths)
        self.dataset.validate("dataset", check_paths=check_paths)  # before the reward's look at its records
        if self.rew_interface == "paired_rw":
            if not self.rew.type.is_critic:
                raise ConfigError("rew.type.is_critic=False: rew_interface=paired_rw scores with a reward model, "
                                  "which is a critic; set rew.type.is_critic=True.")
            self.rew.validate("rew", check_path=check_paths)
        else:
            if self.rew.path and check_paths and not os.path.isdir(self.rew.path):
                raise ConfigError(f"rew.path={self.rew.path!r} is not an existing local directory "
                                  "(rule_reward reads its tokenizer; leave it empty to use the actor's).")
            entries = self.rule_reward.validate("rule_reward")
            if check_paths and any(e["name"] == "math" for e in entries):
                self._check_answer_field()
        self.grpo.validate("grpo")
        for n in self.call_names:
            getattr(self, n).validate(n)
        allocs = self.resolved_allocations()
        check_batch_covers_dp("dataset.train_bs_n_seqs", self.dataset.train_bs_n_seqs, allocs, self.allocation_keys)
        check_prompt_room("dataset.max_prompt_len", self.dataset.max_prompt_len, "actor", self.actor)

    def _check_answer_field(self) -> None:
        """The math reward compares with a reference answer: the prompts must carry one."""
        from realhf.base.json_records import DatasetFormatError, load_records

        try:
            records, _ = load_records(self.dataset.path, None, {})
        except DatasetFormatError as e:
            raise ConfigError(f"dataset.path: {e}") from None
        key = self.rule_reward.answer_key
        if not any(key in r for r in records):
            raise ConfigError(f"rule_reward.answer_key={key!r}: no record of dataset.path={self.dataset.path!r} has "
                              f"that field, which the 'math' reward compares with; add it to the data or choose "
                              "another rule_reward.reward.")

    def initial_setup(self) -> ExperimentConfig:
        """The workers and dataflow graph of this run (built by :mod:`realhf.experiments.common.grpo_exp`)."""
        from realhf.experiments.common import grpo_exp

        return grpo_exp.build(self)


__all__ = ["GRPOConfig", "GRPOHyperparameters", "NormConfig", "RuleRewardConfig"]
