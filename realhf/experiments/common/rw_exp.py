"""``rw``: reward modeling, one train call (``rwTrain``) on preference pairs.

:class:`RWConfig` is the registered experiment; its ``initial_setup()`` calls :func:`build`.
"""

from __future__ import annotations

from realhf.api.core import system_api as sa
from realhf.api.quickstart.algorithms import RWConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils

RW_KEYS = ["packed_input_ids", "prompt_lens"]


def build(cfg: RWConfig) -> sa.ExperimentConfig:
    """The ExperimentConfig of a reward-modeling run: one trained critic, one ``rwTrain`` call."""
    return utils.single_model_training(cfg, "rwTrain", cfg.datasets[0], interface="paired_rw",
                                       input_keys=["packed_input_ids"], dataset_keys=RW_KEYS)


RWExperiment = RWConfig  # earlier name of the same class

register_quickstart_exp("rw", RWConfig)

__all__ = ["RWConfig", "RWExperiment", "build"]
