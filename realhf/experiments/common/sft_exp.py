"""``sft``: supervised fine-tuning, one train call (``trainDefault``) on prompt/answer data.

:class:`SFTConfig` is the registered experiment; its ``initial_setup()`` calls
:func:`build` (this module is imported on first use, so parsing stays light).
"""

from __future__ import annotations

from realhf.api.core import system_api as sa
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.api.quickstart.experiment import SFTConfig
from realhf.experiments.common import utils

SFT_KEYS = ["packed_input_ids", "prompt_mask"]


def build(cfg: SFTConfig) -> sa.ExperimentConfig:
    """The ExperimentConfig of an SFT run: one trained model, one ``trainDefault`` call."""
    return utils.single_model_training(cfg, "trainDefault", cfg.datasets[0], interface="sft", input_keys=SFT_KEYS,
                                       dataset_keys=SFT_KEYS)


SFTExperiment = SFTConfig  # earlier name of the same class

register_quickstart_exp("sft", SFTConfig)

__all__ = ["SFTConfig", "SFTExperiment", "build"]
