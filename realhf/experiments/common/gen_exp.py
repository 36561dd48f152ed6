"""``gen``: generate answers for a prompt file; one call ``gen`` writing JSONL in the log dir."""

from __future__ import annotations

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.algorithms import GenerationConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils


class GenerationExperiment(GenerationConfig):
    def initial_setup(self) -> sa.ExperimentConfig:
        alloc = self.resolved_allocations()["gen"]
        ds = self.dataset
        data = sa.Dataset("prompt", args=dict(dataset_path=ds.path, max_length=ds.max_prompt_len,
                                              pad_to_max_length=ds.pad_to_max_length))
        utils.preflight_datasets([data], self.model.path, self.seed)
        name = ModelName("default", 0)
        shards: dict = {}
        utils.add_shards(shards, name, utils.topology_of(alloc, self.model, train=False),
                         utils.mesh_ranks(alloc, self.n_nodes, self.n_gpus_per_node), utils.real_model(self.model),
                         sa.ModelBackend("inference"))
        workers = utils.workers_from_shards(self.n_workers, shards, self.seed, [data], self.model.path,
                                            utils.device())
        rpc = dfg.MFCDef("gen", n_seqs=ds.train_bs_n_seqs, interface_type=ModelInterfaceType.GENERATE,
                         interface_impl=dfg.ModelInterface("generation", args=dict(
                             generation_config=self.gen, output_file=self.output_file)),
                         model_name=name, input_keys=["packed_prompts"], n_mbs=alloc.n_mbs)
        return sa.ExperimentConfig(utils.exp_ctrl(self.exp_ctrl), [rpc], workers, dataset_keys=["packed_prompts"],
                                   seed=self.seed)


register_quickstart_exp("gen", GenerationExperiment)
