"""``gen``: generate answers for a prompt file; one call ``gen`` writing JSONL in the log dir."""

from __future__ import annotations

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.algorithms import GenerationConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils


def build(cfg: GenerationConfig) -> sa.ExperimentConfig:
    """The ExperimentConfig of a generation run: one ``gen`` call writing ``output_file``."""
    alloc = cfg.resolved_allocations()["gen"]
    ds = cfg.dataset
    data = cfg.datasets[0]
    from realhf.experiments.common.data_checks import check_datasets, max_dp

    dp, dp_mfc = max_dp({"gen": alloc})
    check_datasets(data, cfg.model.path, cfg.seed, train_key="dataset.path", batch_size=ds.train_bs_n_seqs,
                   batch_key="dataset.train_bs_n_seqs", dp=dp, dp_mfc=dp_mfc, length_key=None)
    name = ModelName("default", 0)
    shards: dict = {}
    utils.add_shards(shards, name, utils.topology_of(alloc, cfg.model, train=False),
                     utils.mesh_ranks(alloc, cfg.n_nodes, cfg.n_gpus_per_node), utils.real_model(cfg.model),
                     sa.ModelBackend("inference"))
    workers = utils.workers_from_shards(cfg.n_workers, shards, cfg.seed, [data], cfg.model.path,
                                        utils.device())
    rpc = dfg.MFCDef("gen", n_seqs=ds.train_bs_n_seqs, interface_type=ModelInterfaceType.GENERATE,
                     interface_impl=dfg.ModelInterface("generation", args=dict(
                         generation_config=cfg.gen, output_file=cfg.output_file)),
                     model_name=name, input_keys=["packed_prompts"], **utils.call_options(alloc))
    return sa.ExperimentConfig(utils.exp_ctrl(cfg.exp_ctrl), [rpc], workers, dataset_keys=["packed_prompts"],
                               seed=cfg.seed)


GenerationExperiment = GenerationConfig  # earlier name of the same class

register_quickstart_exp("gen", GenerationConfig)

__all__ = ["GenerationConfig", "GenerationExperiment", "build"]
