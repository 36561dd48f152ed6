"""``sft``: supervised fine-tuning, one train call (``trainDefault``) on prompt/answer data."""

from __future__ import annotations

from realhf.api.core import system_api as sa
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.api.quickstart.experiment import SFTConfig
from realhf.experiments.common import utils

SFT_KEYS = ["packed_input_ids", "prompt_mask"]


class SFTExperiment(SFTConfig):
    """:class:`SFTConfig` plus the ExperimentConfig it stands for."""

    def initial_setup(self) -> sa.ExperimentConfig:
        ds = self.dataset
        return utils.single_model_training(
            self, "trainDefault", "prompt_answer", dict(max_length=ds.max_seqlen, pad_to_max_length=ds.pad_to_max_length),
            interface="sft", input_keys=SFT_KEYS, dataset_keys=SFT_KEYS)


register_quickstart_exp("sft", SFTExperiment)
