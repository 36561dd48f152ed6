"""PPO hyperparameters (``realhf-reference.md`` section 2, PPOHyperparameters).

Kept apart from the other quickstart configs because its ``gen`` field is
``GenerationHyperparameters`` from ``realhf.api.core.model_api`` (which
imports torch); SFT parsing does not need it.
"""

import dataclasses
from typing import Optional

from realhf.api.core.model_api import GenerationHyperparameters
from realhf.api.quickstart.base import ConfigError, check_choice, check_positive_int, check_range, join_key

VALUE_NORM_TYPES = ("exp", "ma")
# Sampling options PPOHyperparameters also accepts directly (``ppo.top_p`` = ``ppo.gen.top_p``).
GEN_SHORTCUTS = ("max_new_tokens", "min_new_tokens", "greedy", "top_p", "top_k", "temperature")


def validate_generation(gen: GenerationHyperparameters, prefix: str = "gen") -> None:
    """Checks of GenerationHyperparameters naming dotted keys."""
    k = lambda name: join_key(prefix, name)  # noqa: E731
    check_positive_int(k("max_new_tokens"), gen.max_new_tokens)
    check_range(k("min_new_tokens"), gen.min_new_tokens, 0, gen.max_new_tokens)
    check_range(k("top_p"), gen.top_p, 0.0, 1.0, lo_open=True)
    check_positive_int(k("top_k"), gen.top_k)
    check_range(k("temperature"), gen.temperature, 0.0)
    if gen.use_cuda_graph:
        raise ConfigError(
            f"{k('use_cuda_graph')}=True is not supported: decoding runs eagerly (no CUDA graph capture) "
            f"on every device; set {k('use_cuda_graph')}=False."
        )


@dataclasses.dataclass
class PPOHyperparameters:
    """PPO algorithm settings.

    :param gen: rollout sampling.
    :param ppo_n_minibatches: optimizer steps per PPO update (one pass).
    :param kl_ctl: KL reward coefficient.
    :param discount: gamma.
    :param gae_lambda: GAE lambda.
    :param eps_clip: policy ratio clip.
    :param value_eps_clip: value clip.
    :param max_reward_clip: rewards clipped to +-this after scaling and bias.
    :param reward_output_scaling: reward = (r - bias) * scaling.
    :param reward_output_bias: see reward_output_scaling.
    :param early_stop_imp_ratio: zero a minibatch loss whose mean importance ratio exceeds this.
    :param use_adaptive_kl_ctl: adaptive KL controller.
    :param adv_norm: normalize advantages.
    :param value_norm: running normalization of returns.
    :param value_norm_type: "exp" (EMA) or "ma" (moving average).
    :param value_norm_beta: EMA decay.
    :param value_norm_eps: normalization epsilon.
    :param max_new_tokens: shortcut for ``gen.max_new_tokens`` (None: keep ``gen``'s value).
    :param min_new_tokens: shortcut for ``gen.min_new_tokens``.
    :param greedy: shortcut for ``gen.greedy``.
    :param top_p: shortcut for ``gen.top_p``.
    :param top_k: shortcut for ``gen.top_k``.
    :param temperature: shortcut for ``gen.temperature``.

    A shortcut that is set is copied into ``gen``. Setting both a shortcut and
    its ``gen`` field to different values (the ``gen`` one not its default) is
    refused, naming both keys.
    """

    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    ppo_n_minibatches: int = 4
    kl_ctl: float = 0.1
    discount: float = 1.0
    gae_lambda: float = 1.0
    eps_clip: float = 0.2
    value_eps_clip: float = 0.2
    max_reward_clip: float = 20.0
    reward_output_scaling: float = 1.0
    reward_output_bias: float = 0.0
    early_stop_imp_ratio: float = 5.0
    use_adaptive_kl_ctl: bool = False
    adv_norm: bool = True
    value_norm: bool = True
    value_norm_type: str = "exp"
    value_norm_beta: float = 0.99995
    value_norm_eps: float = 1e-5
    max_new_tokens: Optional[int] = None
    min_new_tokens: Optional[int] = None
    greedy: Optional[bool] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    temperature: Optional[float] = None

    def __post_init__(self):
        self.apply_gen_shortcuts()

    def apply_gen_shortcuts(self, prefix: str = "ppo") -> None:
        """Copy the shortcut fields that are set into ``gen`` (ConfigError on a conflict)."""
        k = lambda name: join_key(prefix, name)  # noqa: E731
        default = GenerationHyperparameters()
        updates = {}
        for name in GEN_SHORTCUTS:
            value = getattr(self, name)
            if value is None:
                continue
            current = getattr(self.gen, name)
            if current != value and current != getattr(default, name):
                raise ConfigError(
                    f"{k(name)}={value!r} and {k('gen.' + name)}={current!r} disagree; {k(name)} is a shortcut "
                    f"for {k('gen.' + name)}: set only one of them.")
            updates[name] = value
        if updates:
            try:
                self.gen = dataclasses.replace(self.gen, **updates)
            except ValueError as e:
                given = ", ".join(f"{k(n)}={v!r}" for n, v in updates.items())
                raise ConfigError(f"{k('gen')} after applying {given}: {e}") from None

    def validate(self, prefix: str = "ppo") -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        validate_generation(self.gen, k("gen"))
        check_positive_int(k("ppo_n_minibatches"), self.ppo_n_minibatches)
        check_range(k("kl_ctl"), self.kl_ctl, 0.0)
        check_range(k("discount"), self.discount, 0.0, 1.0)
        check_range(k("gae_lambda"), self.gae_lambda, 0.0, 1.0)
        check_range(k("eps_clip"), self.eps_clip, 0.0, lo_open=True)
        check_range(k("value_eps_clip"), self.value_eps_clip, 0.0, lo_open=True)
        check_range(k("max_reward_clip"), self.max_reward_clip, 0.0, lo_open=True)
        check_range(k("early_stop_imp_ratio"), self.early_stop_imp_ratio, 1.0)
        check_choice(k("value_norm_type"), self.value_norm_type, VALUE_NORM_TYPES)
        check_range(k("value_norm_beta"), self.value_norm_beta, 0.0, 1.0, hi_open=True)
        check_range(k("value_norm_eps"), self.value_norm_eps, 0.0, lo_open=True)
        if self.reward_output_scaling == 0:
            raise ConfigError(f"{k('reward_output_scaling')}=0 would zero every reward; use a non-zero value.")


__all__ = ["PPOHyperparameters", "validate_generation"]
