"""``dpo``: a frozen reference scores the pairs (``ref_inf``), then the actor trains (``actor_train``)."""

from __future__ import annotations

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.algorithms import DPOConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils


def same_weights(a, b) -> bool:
    """Whether two model configs load identical weights (same checkpoint and family, or the
    same from-scratch initialization, which depends only on the config and the seed)."""
    return (a.path == b.path and a.type._class == b.type._class and a.init_from_scratch == b.init_from_scratch
            and a.type.is_critic == b.type.is_critic)


def build(cfg: DPOConfig) -> sa.ExperimentConfig:
    """The ExperimentConfig of a DPO run: ``ref_inf`` on the frozen reference, then ``actor_train``."""
    allocs = cfg.resolved_allocations()
    ds = cfg.dataset
    train = cfg.datasets[0]
    # The valid set is evaluated by the actor (``actor_train``'s interface): pair-mean DPO loss, margin and
    # accuracy. When ref and actor load the same weights, the actor's valid log-probs before its first step
    # are the reference's (recorded once); otherwise the reference counts as uniform (DPOInterface.evaluate).
    valid = utils.with_path(train, ds.valid_path) if ds.valid_path else None
    from realhf.experiments.common.data_checks import check_datasets, max_dp

    dp, dp_mfc = max_dp(allocs)
    check_datasets(train, cfg.actor.path, cfg.seed, train_key="dataset.train_path", batch_size=ds.train_bs_n_seqs,
                   batch_key="dataset.train_bs_n_seqs", dp=dp, dp_mfc=dp_mfc, length_key="dataset.max_seqlen",
                   valid=valid, valid_key="dataset.valid_path",
                   eval_dp=allocs["actor_train"].parallel.data_parallel_size)
    actor, ref = ModelName("actor", 0), ModelName("ref", 0)
    shards: dict = {}
    a_ranks = utils.mesh_ranks(allocs["actor_train"], cfg.n_nodes, cfg.n_gpus_per_node)
    r_ranks = utils.mesh_ranks(allocs["ref_inf"], cfg.n_nodes, cfg.n_gpus_per_node)
    utils.add_shards(shards, actor, utils.topology_of(allocs["actor_train"], cfg.actor, train=True), a_ranks,
                     utils.real_model(cfg.actor), sa.ModelBackend("train", args=cfg.actor.backend_args()),
                     eval_dataset=valid, eval_bs=ds.valid_bs_n_seqs)
    utils.add_shards(shards, ref, utils.topology_of(allocs["ref_inf"], cfg.ref, train=False), r_ranks,
                     utils.real_model(cfg.ref), sa.ModelBackend("inference"))
    workers = utils.workers_from_shards(cfg.n_workers, shards, cfg.seed, [train], cfg.actor.path,
                                        utils.device())
    ref_inf = dfg.MFCDef("ref_inf", n_seqs=ds.train_bs_n_seqs, interface_type=ModelInterfaceType.INFERENCE,
                         interface_impl=dfg.ModelInterface("dpo", args=dict(beta=cfg.beta, enable_save=False)),
                         model_name=ref, input_keys=["packed_input_ids", "prompt_lens"],
                         output_keys=["seqlogp"], **utils.call_options(allocs["ref_inf"]))
    if set(a_ranks) & set(r_ranks):
        ref_inf.post_hooks += utils.frozen_offload_hooks()  # the frozen reference shares devices
    actor_train = dfg.MFCDef("actor_train", n_seqs=ds.train_bs_n_seqs,
                             interface_type=ModelInterfaceType.TRAIN_STEP,
                             interface_impl=dfg.ModelInterface("dpo", args=dict(
                                 beta=cfg.beta, enable_save=True,
                                 reference_is_initial_policy=valid is not None and same_weights(cfg.actor, cfg.ref))),
                             model_name=actor, input_keys=["packed_input_ids", "seqlogp", "prompt_lens"],
                             **utils.call_options(allocs["actor_train"]), log_return_value=True)
    return sa.ExperimentConfig(utils.exp_ctrl(cfg.exp_ctrl), [ref_inf, actor_train], workers,
                               dataset_keys=["packed_input_ids", "prompt_lens"], seed=cfg.seed)


DPOExperiment = DPOConfig  # earlier name of the same class

register_quickstart_exp("dpo", DPOConfig)

__all__ = ["DPOConfig", "DPOExperiment", "build"]
