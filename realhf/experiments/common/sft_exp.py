"""``sft``: supervised fine-tuning, one train call (``trainDefault``) on prompt/answer data."""

from __future__ import annotations

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.api.quickstart.experiment import SFTConfig
from realhf.experiments.common import utils

SFT_KEYS = ["packed_input_ids", "prompt_mask"]


class SFTExperiment(SFTConfig):
    """:class:`SFTConfig` plus the ExperimentConfig it stands for."""

    def initial_setup(self) -> sa.ExperimentConfig:
        alloc = self.resolved_allocations()["trainDefault"]
        name = ModelName("default", 0)
        topo = utils.topology_of(alloc, self.model, train=True)
        ranks = utils.mesh_ranks(alloc, self.n_nodes, self.n_gpus_per_node)
        ds = self.dataset
        data_args = dict(max_length=ds.max_seqlen, pad_to_max_length=ds.pad_to_max_length)
        train = sa.Dataset("prompt_answer", args=dict(dataset_path=ds.train_path, **data_args))
        valid = sa.Dataset("prompt_answer", args=dict(dataset_path=ds.valid_path, **data_args)) if ds.valid_path else None
        utils.preflight_datasets([train, valid], self.model.path, self.seed)
        shards: dict = {}
        utils.add_shards(shards, name, topo, ranks, utils.real_model(self.model),
                         sa.ModelBackend("train", args=self.model.backend_args()),
                         eval_dataset=valid, eval_bs=ds.valid_bs_n_seqs)
        workers = utils.workers_from_shards(self.n_workers, shards, self.seed, [train], self.model.path,
                                            utils.device())
        rpc = dfg.MFCDef("trainDefault", n_seqs=ds.train_bs_n_seqs, interface_type=ModelInterfaceType.TRAIN_STEP,
                         interface_impl=dfg.ModelInterface("sft"), model_name=name, input_keys=SFT_KEYS,
                         n_mbs=alloc.n_mbs, log_return_value=True)
        return sa.ExperimentConfig(utils.exp_ctrl(self.exp_ctrl), [rpc], workers, dataset_keys=SFT_KEYS,
                                   seed=self.seed)


register_quickstart_exp("sft", SFTExperiment)
