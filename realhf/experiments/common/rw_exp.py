"""``rw``: reward modeling, one train call (``rwTrain``) on preference pairs."""

from __future__ import annotations

from realhf.api.core import system_api as sa
from realhf.api.quickstart.algorithms import RWConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils

RW_KEYS = ["packed_input_ids", "prompt_lens"]


class RWExperiment(RWConfig):
    def initial_setup(self) -> sa.ExperimentConfig:
        ds = self.dataset
        return utils.single_model_training(
            self, "rwTrain", "rw_pair", dict(max_length=ds.max_seqlen, max_pairs_per_prompt=ds.max_pairs_per_prompt),
            interface="paired_rw", input_keys=["packed_input_ids"], dataset_keys=RW_KEYS)


register_quickstart_exp("rw", RWExperiment)
