"""``ppo``: RLHF with PPO over six model function calls (reference §4).

Replicas: calls of one role with the same devices and 3D layout share a
replica; a different layout makes a new replica ``ModelName(role, k)``. The
train call's replica (id 0) of a trainable role (actor, critic) holds the
weights and the optimizer; its other replicas are empty handles filled by
parameter reallocation before their call and dropped after it. Frozen
roles (ref, reward) are offloaded after their call when their devices are
shared with another call.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

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
    seen: Dict[str, List[Tuple[Tuple[int, ...], object]]] = {}
    out: Dict[str, ModelName] = {}
    for call in sorted(calls, key=lambda c: (c not in TRAIN_CALL.values(), PPO_MFCS.index(c))):
        role = ROLE[call]
        key = (tuple(ranks[call]), allocs[call].parallel)  # ParallelismConfig equality ignores SP
        slots = seen.setdefault(role, [])
        if key not in slots:
            slots.append(key)
        out[call] = ModelName(role, slots.index(key))
    return out


class PPOExperiment(PPOConfig):
    """:class:`PPOConfig` plus the ExperimentConfig it stands for."""

    def _models(self):
        return {"actor": self.actor, "critic": self.critic, "ref": self.ref, "reward": self.rew}

    def _interfaces(self) -> Dict[str, dfg.ModelInterface]:
        p = self.ppo
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

    def _heuristic_rpc_allocation(self):
        """Layouts sized for the devices present: generation and the reference on all of them
        (data parallel), actor and critic training on one half each, reward and critic
        inference on one half each. Odd device counts put every call on all devices."""
        from realhf.api.quickstart.model import MFCConfig, ParallelismConfig

        n = self.n_nodes * self.n_gpus_per_node
        host = "localhost" if self.n_nodes == 1 else None

        def on(call, ranks):
            mesh = None if host is None or len(ranks) == n else f"{host}:" + ",".join(map(str, ranks))
            return MFCConfig(n_mbs=getattr(self, call).n_mbs,
                             parallel=ParallelismConfig(data_parallel_size=len(ranks)), device_mesh=mesh)

        every = list(range(n))
        if n < 2 or n % 2 or host is None:
            halves = (every, every)
        else:
            halves = (every[: n // 2], every[n // 2:])
        plan = {"actor_gen": every, "ref_inf": every, "actor_train": halves[0], "rew_inf": halves[0],
                "critic_train": halves[1], "critic_inf": halves[1]}
        return {call: on(call, ranks) for call, ranks in plan.items()}

    def _sampler_truncates(self) -> bool:
        """Whether generation records a logits mask (top-k / top-p actually cut the vocabulary)."""
        g = self.ppo.gen
        if g.greedy or g.force_no_logits_mask:
            return False
        from realhf.api.quickstart.model import load_real_config

        vocab = load_real_config(self.actor).vocab_size
        return g.top_p < 1.0 or g.top_k < vocab

    def initial_setup(self) -> sa.ExperimentConfig:
        allocs = self.resolved_allocations()
        ranks = {c: utils.mesh_ranks(allocs[c], self.n_nodes, self.n_gpus_per_node) for c in PPO_MFCS}
        replica = resolve_replicas(list(PPO_MFCS), ranks, allocs)
        models = self._models()
        ds = self.dataset
        data = sa.Dataset("prompt", args=dict(dataset_path=ds.path, max_length=ds.max_prompt_len,
                                              pad_to_max_length=ds.pad_to_max_length))
        utils.preflight_datasets([data], self.actor.path, self.seed)

        shards: dict = {}
        made = set()
        for call in PPO_MFCS:
            name = replica[call]
            if name in made:
                continue
            made.add(name)
            cfg = models[name.role]
            is_train_replica = name.role in TRAIN_CALL and name == replica[TRAIN_CALL[name.role]]
            holds_weights = name.role not in TRAIN_CALL or is_train_replica
            backend = (sa.ModelBackend("train", args=cfg.backend_args()) if is_train_replica
                       else sa.ModelBackend("inference"))
            layout_call = TRAIN_CALL[name.role] if is_train_replica else call
            utils.add_shards(shards, name, utils.topology_of(allocs[layout_call], cfg, train=is_train_replica),
                             ranks[layout_call],
                             utils.real_model(cfg, instantiate=holds_weights), backend,
                             should_instantiate=holds_weights)

        iface = self._interfaces()
        logits_mask = ["packed_logits_mask"] if self._sampler_truncates() else []
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
                             model_name=name, input_keys=ins, output_keys=outs, n_mbs=allocs[call].n_mbs,
                             balanced_dp=call == "actor_gen", log_return_value=kind == ModelInterfaceType.TRAIN_STEP)
            train_replica = ModelName(name.role, 0)
            if name.role in TRAIN_CALL and name != train_replica:
                rpc.pre_hooks.append(dfg.ParamReallocHook(source=train_replica))
                rpc.post_hooks.append(dfg.ParamReallocHook(target=train_replica))
            if name.role not in TRAIN_CALL:
                others = set().union(*(set(ranks[c]) for c in PPO_MFCS if c != call))
                if others & set(ranks[call]):
                    rpc.post_hooks.append(dfg.OffloadHook())
            rpcs.append(rpc)
        workers = utils.workers_from_shards(self.n_workers, shards, self.seed, [data], self.actor.path,
                                            utils.device())
        return sa.ExperimentConfig(utils.exp_ctrl(self.exp_ctrl), rpcs, workers, dataset_keys=["packed_prompts"],
                                   seed=self.seed)


register_quickstart_exp("ppo", PPOExperiment)
