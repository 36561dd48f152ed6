"""``ppo``: RLHF with PPO over six model function calls (reference §4).

Replicas: calls of one role with the same devices and 3D layout share a
replica; a different layout makes a new replica ``ModelName(role, k)``. The
train call's replica (id 0) of a trainable role (actor, critic) holds the
weights and the optimizer; its other replicas are empty handles filled by
parameter reallocation before their call and dropped after it. Frozen
roles (ref, reward) are offloaded after their call when their devices are
shared with another call.

:class:`PPOConfig` is the registered experiment; its ``initial_setup()``
calls :func:`build`.
"""

from __future__ import annotations

from typing import Dict, List

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.algorithms import PPO_MFCS, PPOConfig
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.experiments.common import utils

ROLE = {"actor_gen": "actor", "actor_train": "actor", "critic_inf": "critic", "critic_train": "critic",
        "ref_inf": "ref", "rew_inf": "reward"}
TRAIN_CALL = {"actor": "actor_train", "critic": "critic_train"}
TRAIN_KEYS = ["packed_input_ids", "packed_logprobs", "packed_ref_logprobs", "rewards", "values", "prompt_mask",
              "seq_no_eos_mask"]


def resolve_replicas(calls: List[str], ranks: Dict[str, List[int]], allocs) -> Dict[str, ModelName]:
    """Call -> replica: train calls first (replica 0), then one replica per distinct (devices, layout)."""
    return utils.resolve_replicas(calls, ROLE, list(TRAIN_CALL.values()), ranks, allocs)


def _models(cfg: PPOConfig):
    return {"actor": cfg.actor, "critic": cfg.critic, "ref": cfg.ref, "reward": cfg.rew}


def _interfaces(cfg: PPOConfig) -> Dict[str, dfg.ModelInterface]:
    p = cfg.ppo
    common = dict(
        n_minibatches=p.ppo_n_minibatches, kl_ctl=p.kl_ctl, adaptive_kl_ctl=p.use_adaptive_kl_ctl,
        discount=p.discount, gae_lambda=p.gae_lambda, eps_clip=p.eps_clip, value_eps_clip=p.value_eps_clip,
        max_reward_clip=p.max_reward_clip, early_stop_imp_ratio=p.early_stop_imp_ratio, adv_norm=p.adv_norm,
        value_norm=p.value_norm, value_norm_type=p.value_norm_type, value_norm_beta=p.value_norm_beta,
        value_norm_eps=p.value_norm_eps,
    )
    actor = dict(common, generation_config=p.gen, force_no_logits_mask=p.gen.force_no_logits_mask)
    return {
        "actor": dfg.ModelInterface("ppo_actor", args=actor),
        "ref": dfg.ModelInterface("ppo_actor", args=dict(actor, enable_save=False)),
        "critic": dfg.ModelInterface("ppo_critic", args=common),
        "reward": dfg.ModelInterface("paired_rw", args=dict(output_scaling=p.reward_output_scaling,
                                                           output_bias=p.reward_output_bias)),
    }


def _sampler_truncates(cfg: PPOConfig) -> bool:
    """Whether generation records a logits mask (top-k / top-p actually cut the vocabulary)."""
    g = cfg.ppo.gen
    if g.greedy or g.force_no_logits_mask:
        return False
    from realhf.api.quickstart.model import load_real_config

    vocab = load_real_config(cfg.actor).vocab_size
    return g.top_p < 1.0 or g.top_k < vocab


def build(cfg: PPOConfig) -> sa.ExperimentConfig:
    """The ExperimentConfig of a PPO run: four models, six calls (replicas where layouts differ)."""
    allocs = cfg.resolved_allocations()
    ranks = {c: utils.mesh_ranks(allocs[c], cfg.n_nodes, cfg.n_gpus_per_node) for c in PPO_MFCS}
    replica = resolve_replicas(list(PPO_MFCS), ranks, allocs)
    models = _models(cfg)
    ds = cfg.dataset
    data = cfg.datasets[0]
    from realhf.experiments.common.data_checks import check_datasets, max_dp

    dp, dp_mfc = max_dp(allocs)
    check_datasets(data, cfg.actor.path, cfg.seed, train_key="dataset.path", batch_size=ds.train_bs_n_seqs,
                   batch_key="dataset.train_bs_n_seqs", dp=dp, dp_mfc=dp_mfc, length_key=None)

    shards: dict = {}
    made = set()
    for call in PPO_MFCS:
        name = replica[call]
        if name in made:
            continue
        made.add(name)
        model = models[name.role]
        is_train_replica = name.role in TRAIN_CALL and name == replica[TRAIN_CALL[name.role]]
        holds_weights = name.role not in TRAIN_CALL or is_train_replica
        backend = (sa.ModelBackend("train", args=model.backend_args()) if is_train_replica
                   else sa.ModelBackend("inference"))
        layout_call = TRAIN_CALL[name.role] if is_train_replica else call
        utils.add_shards(shards, name, utils.topology_of(allocs[layout_call], model, train=is_train_replica),
                         ranks[layout_call],
                         utils.real_model(model, instantiate=holds_weights), backend,
                         should_instantiate=holds_weights)

    iface = _interfaces(cfg)
    logits_mask = ["packed_logits_mask"] if _sampler_truncates(cfg) else []
    spec = {
        "actor_gen": (ModelInterfaceType.GENERATE, ["packed_prompts"],
                      ["seq_no_eos_mask", "packed_input_ids", "packed_logprobs", "prompt_mask"] + logits_mask),
        "rew_inf": (ModelInterfaceType.INFERENCE, ["packed_input_ids"], ["rewards"]),
        "ref_inf": (ModelInterfaceType.INFERENCE, ["packed_input_ids"] + logits_mask, ["packed_ref_logprobs"]),
        "critic_inf": (ModelInterfaceType.INFERENCE, ["packed_input_ids", "seq_no_eos_mask"], ["values"]),
        "actor_train": (ModelInterfaceType.TRAIN_STEP, TRAIN_KEYS + logits_mask, []),
        "critic_train": (ModelInterfaceType.TRAIN_STEP, TRAIN_KEYS, []),
    }
    rpcs = []
    for call in PPO_MFCS:
        kind, ins, outs = spec[call]
        name = replica[call]
        rpc = dfg.MFCDef(call, n_seqs=ds.train_bs_n_seqs, interface_type=kind, interface_impl=iface[name.role],
                         model_name=name, input_keys=ins, output_keys=outs, **utils.call_options(allocs[call]),
                         balanced_dp=call == "actor_gen", log_return_value=kind == ModelInterfaceType.TRAIN_STEP)
        trained = name.role in TRAIN_CALL
        utils.attach_layout_hooks(rpc, ModelName(name.role, 0) if trained else None, frozen=not trained,
                                  ranks=ranks)
        rpcs.append(rpc)
    workers = utils.workers_from_shards(cfg.n_workers, shards, cfg.seed, [data], cfg.actor.path,
                                        utils.device())
    return sa.ExperimentConfig(utils.exp_ctrl(cfg.exp_ctrl), rpcs, workers, dataset_keys=["packed_prompts"],
                               seed=cfg.seed)


PPOExperiment = PPOConfig  # earlier name of the same class

register_quickstart_exp("ppo", PPOConfig)

__all__ = ["PPOConfig", "PPOExperiment", "build", "resolve_replicas"]
