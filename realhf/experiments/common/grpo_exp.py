"""``grpo``: GRPO-family RL over three or four model function calls.

``actor_gen`` samples ``grpo.group_size`` answers per prompt and returns one
item per prompt holding the whole group, so every later split (dp ranks,
micro-batches, minibatches) keeps a group together. ``rew_inf`` scores every
sequence (a rule reward on a tokenizer-only model by default, or a reward
model), ``ref_inf`` gives reference log-probs when a KL term is on, and
``actor_train`` runs the ``grpo_actor`` update. For ReMax an item holds one
more sequence, the prompt's greedy answer (last), which the reward call
scores like the others and ``actor_train`` uses as baseline only.

DAPO's dynamic sampling is an input filter of ``actor_train``
(``grpo_dynamic_sampling`` on ``rewards``): the master re-runs ``actor_gen``
and ``rew_inf`` on further prompts until ``dataset.train_bs_n_seqs`` groups
have different rewards, then runs ``ref_inf`` and ``actor_train`` on those.

Replicas as in ppo: ``actor_gen`` on another layout than ``actor_train`` gets
its own actor replica, filled from the train replica before generation and
dropped after it; frozen networks (reference, reward model) are offloaded
after their call when their devices are shared.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.api.quickstart.grpo import GRPOConfig
from realhf.experiments.common import utils

ROLE = {"actor_gen": "actor", "actor_train": "actor", "ref_inf": "ref", "rew_inf": "reward"}
LOGITS_MASK = "packed_logits_mask"
GEN_KEYS = ["seq_no_eos_mask", "packed_input_ids", "packed_logprobs", "prompt_mask"]


def resolve_replicas(calls: List[str], ranks: Dict[str, List[int]], allocs) -> Dict[str, ModelName]:
    """Call -> replica: ``actor_train`` first (replica 0), then one per distinct (devices, layout)."""
    return utils.resolve_replicas(calls, ROLE, ["actor_train"], ranks, allocs)


def _sampler_truncates(cfg: GRPOConfig) -> bool:
    """Whether generation records a logits mask (top-k / top-p actually cut the vocabulary)."""
    g = cfg.grpo.gen
    if g.greedy or g.force_no_logits_mask:
        return False
    from realhf.api.quickstart.model import load_real_config

    return g.top_p < 1.0 or g.top_k < load_real_config(cfg.actor).vocab_size


def _reward(cfg: GRPOConfig) -> Tuple[sa.Model, sa.ModelBackend, dfg.ModelInterface, bool]:
    """(model, backend, interface, is a network) of the reward call."""
    p = cfg.grpo
    scale = dict(output_scaling=p.reward_output_scaling, output_bias=p.reward_output_bias)
    if cfg.rew_interface == "paired_rw":
        return (utils.real_model(cfg.rew), sa.ModelBackend("inference"),
                dfg.ModelInterface("paired_rw", args=dict(scale, enable_save=False)), True)
    r = cfg.rule_reward
    args = dict(scale, reward=r.reward, answer_key=r.answer_key, n_workers=r.n_workers, timeout_s=r.timeout_s,
                default_reward=r.default_reward)
    return (sa.Model("tokenizer", args=dict(tokenizer_path=cfg.tokenizer_path)), sa.ModelBackend("null"),
            dfg.ModelInterface("rule_reward", args=args), False)


def dynamic_sampling_filter(cfg: GRPOConfig) -> Optional[dfg.ItemFilter]:
    """The input filter of ``actor_train`` that drops and refills groups of equal rewards (None: off)."""
    p = cfg.grpo
    if not p.dynamic_sampling:
        return None
    keys = ["rewards"] + (["prompt_mask"] if p.overlong_tokens is not None else [])  # answer lengths
    args = dict(group_size=p.group_size, max_new_tokens=p.gen.max_new_tokens, overlong_tokens=p.overlong_tokens,
                overlong_penalty_factor=p.overlong_penalty_factor, max_reward_clip=p.max_reward_clip)
    return dfg.ItemFilter("grpo_dynamic_sampling", keys, args, max_rounds=p.dynamic_sampling_max_batches)


def build(cfg: GRPOConfig) -> sa.ExperimentConfig:
    """The ExperimentConfig of a GRPO run (replicas where the actor's layouts differ)."""
    calls = list(cfg.call_names)
    allocs = cfg.resolved_allocations()
    ranks = {c: utils.mesh_ranks(allocs[c], cfg.n_nodes, cfg.n_gpus_per_node) for c in calls}
    replica = resolve_replicas(calls, ranks, allocs)
    ds = cfg.dataset
    data = cfg.datasets[0]
    from realhf.experiments.common.data_checks import check_datasets, max_dp

    dp, dp_mfc = max_dp(allocs)
    check_datasets(data, cfg.actor.path, cfg.seed, train_key="dataset.path", batch_size=ds.train_bs_n_seqs,
                   batch_key="dataset.train_bs_n_seqs", dp=dp, dp_mfc=dp_mfc, length_key=None)

    rew_model, rew_backend, rew_iface, rew_is_net = _reward(cfg)
    shards: dict = {}
    made = set()
    for call in calls:
        name = replica[call]
        if name in made:
            continue
        made.add(name)
        if name.role == "reward":
            utils.add_shards(shards, name, utils.topology_of(allocs[call], cfg.rew, train=False), ranks[call],
                             rew_model, rew_backend)
            continue
        model = cfg.actor if name.role == "actor" else cfg.ref_model
        is_train = name == replica["actor_train"]
        holds_weights = name.role != "actor" or is_train
        backend = sa.ModelBackend("train", args=model.backend_args()) if is_train else sa.ModelBackend("inference")
        layout_call = "actor_train" if is_train else call
        utils.add_shards(shards, name, utils.topology_of(allocs[layout_call], model, train=is_train),
                         ranks[layout_call], utils.real_model(model, instantiate=holds_weights), backend,
                         should_instantiate=holds_weights)

    actor_args = cfg.grpo.interface_args()
    iface = {"actor": dfg.ModelInterface("grpo_actor", args=actor_args),
             "ref": dfg.ModelInterface("grpo_actor", args=dict(actor_args, enable_save=False)),
             "reward": rew_iface}
    logits_mask = [LOGITS_MASK] if _sampler_truncates(cfg) else []
    ref = ["packed_ref_logprobs"] if cfg.grpo.uses_ref else []
    rew_in = ["packed_input_ids"] + (["prompt_mask"] if not rew_is_net else [])
    spec = {
        "actor_gen": (ModelInterfaceType.GENERATE, ["packed_prompts"], GEN_KEYS + logits_mask),
        "rew_inf": (ModelInterfaceType.INFERENCE, rew_in, ["rewards"]),
        "ref_inf": (ModelInterfaceType.INFERENCE, ["packed_input_ids"] + logits_mask, ["packed_ref_logprobs"]),
        "actor_train": (ModelInterfaceType.TRAIN_STEP,
                        ["packed_input_ids", "packed_logprobs", "prompt_mask", "seq_no_eos_mask", "rewards"]
                        + ref + logits_mask, []),
    }
    frozen_nets = [c for c in calls if ROLE[c] == "ref" or (ROLE[c] == "reward" and rew_is_net)]
    rpcs = []
    for call in calls:
        kind, ins, outs = spec[call]
        name = replica[call]
        rpc = dfg.MFCDef(call, n_seqs=ds.train_bs_n_seqs, interface_type=kind, interface_impl=iface[name.role],
                         model_name=name, input_keys=ins, output_keys=outs, **utils.call_options(allocs[call]),
                         balanced_dp=call == "actor_gen", log_return_value=kind == ModelInterfaceType.TRAIN_STEP,
                         input_filter=dynamic_sampling_filter(cfg) if call == "actor_train" else None)
        utils.attach_layout_hooks(rpc, replica["actor_train"] if name.role == "actor" else None,
                                  frozen=call in frozen_nets, ranks=ranks)
        rpcs.append(rpc)
    workers = utils.workers_from_shards(cfg.n_workers, shards, cfg.seed, [data], cfg.actor.path, utils.device())
    return sa.ExperimentConfig(utils.exp_ctrl(cfg.exp_ctrl), rpcs, workers, dataset_keys=["packed_prompts"],
                               seed=cfg.seed)


register_quickstart_exp("grpo", GRPOConfig)

__all__ = ["GRPOConfig", "build", "resolve_replicas"]
