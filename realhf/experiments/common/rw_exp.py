"""``rw``: reward modeling, one train call (``rwTrain``) on preference pairs."""

from __future__ import annotations

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.algorithms import RWConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils

RW_KEYS = ["packed_input_ids", "prompt_lens"]


class RWExperiment(RWConfig):
    def initial_setup(self) -> sa.ExperimentConfig:
        alloc = self.resolved_allocations()["rwTrain"]
        name = ModelName("default", 0)
        ds = self.dataset
        args = dict(max_length=ds.max_seqlen, max_pairs_per_prompt=ds.max_pairs_per_prompt)
        train = sa.Dataset("rw_pair", args=dict(dataset_path=ds.train_path, **args))
        valid = sa.Dataset("rw_pair", args=dict(dataset_path=ds.valid_path, **args)) if ds.valid_path else None
        utils.preflight_datasets([train, valid], self.model.path, self.seed)
        shards: dict = {}
        utils.add_shards(shards, name, utils.topology_of(alloc, self.model, train=True),
                         utils.mesh_ranks(alloc, self.n_nodes, self.n_gpus_per_node), utils.real_model(self.model),
                         sa.ModelBackend("train", args=self.model.backend_args()),
                         eval_dataset=valid, eval_bs=ds.valid_bs_n_seqs)
        workers = utils.workers_from_shards(self.n_workers, shards, self.seed, [train], self.model.path,
                                            utils.device())
        rpc = dfg.MFCDef("rwTrain", n_seqs=ds.train_bs_n_seqs, interface_type=ModelInterfaceType.TRAIN_STEP,
                         interface_impl=dfg.ModelInterface("paired_rw"), model_name=name,
                         input_keys=["packed_input_ids"], n_mbs=alloc.n_mbs, log_return_value=True)
        return sa.ExperimentConfig(utils.exp_ctrl(self.exp_ctrl), [rpc], workers, dataset_keys=RW_KEYS,
                                   seed=self.seed)


register_quickstart_exp("rw", RWExperiment)
