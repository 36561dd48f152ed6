"""Built-in experiments; importing registers them with the quickstart CLI."""

from realhf.experiments.common import sft_exp  # noqa: F401
