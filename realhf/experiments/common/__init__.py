"""Built-in experiments; importing registers them with the quickstart CLI."""

from realhf.experiments.common import dpo_exp, gen_exp, grpo_exp, ppo_exp, rw_exp, sft_exp  # noqa: F401
