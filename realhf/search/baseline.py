"""The ``allocation_mode=heuristic`` plan of PPO expressed in the search's terms, to compare against.

It calls the same rules as :mod:`realhf.api.quickstart.heuristic` (via a
config-shaped adapter of :class:`ModelShape`) and the mesh split of
``PPOConfig._heuristic_rpc_allocation`` (one node: generation and reference
on all devices, actor train + reward on one half, critic train + critic
inference on the other; several nodes: every call on every device).
Micro-batches are not set by the heuristic; each call gets its best count.
"""

from __future__ import annotations

import types
from typing import Dict, List, Optional

from realhf.search.hardware import DeviceProfile
from realhf.search.plan import PlanEvaluator
from realhf.search.workload import TRAIN, Assignment, CallSpec, Layout, Mesh, ModelShape


def real_config_like(m: ModelShape) -> types.SimpleNamespace:
    return types.SimpleNamespace(hidden_dim=m.hidden, head_dim=m.head_dim, n_q_heads=m.n_q_heads,
                                 n_kv_heads=m.n_kv_heads, intermediate_dim=m.intermediate, mlp_type="llama",
                                 vocab_size=m.vocab, n_layers=m.n_layers, tied_embedding=False,
                                 is_critic=m.is_critic, qk_layernorm=False)


def heuristic_plan(calls: List[CallSpec], prof: DeviceProfile, n_nodes: int,
                   evaluator: Optional[PlanEvaluator] = None) -> Dict[str, Assignment]:
    from realhf.api.quickstart.heuristic import choose_layout

    per_node = prof.devices_per_node
    n = n_nodes * per_node
    every = Mesh(0, n)
    if n_nodes > 1 or n < 2 or n % 2:
        halves = (every, every)
    else:
        halves = (Mesh(0, n // 2), Mesh(n // 2, n // 2))
    meshes = {"actor_gen": every, "ref_inf": every, "actor_train": halves[0], "rew_inf": halves[0],
              "critic_train": halves[1], "critic_inf": halves[1]}
    ev = evaluator or PlanEvaluator(calls, prof, n)
    plan: Dict[str, Assignment] = {}
    for c in calls:
        mesh = meshes.get(c.name, every)
        p = choose_layout(real_config_like(c.model), mesh.size, min(per_node, mesh.size), train=c.kind == TRAIN,
                          gpu=prof.param_bytes == 2, memory_per_device=int(prof.memory_bytes))
        tp, pp, dp = p.model_parallel_size, p.pipeline_parallel_size, p.data_parallel_size
        options = [Assignment(mesh, Layout(dp, tp, pp, k)) for k in sorted({1, 2, pp, 2 * pp, 4 * pp})]
        plan[c.name] = min(options, key=lambda a: (ev.cost(c.name, a).oom, ev.cost(c.name, a).seconds))
    return plan


__all__ = ["best_uniform_plan", "heuristic_plan", "real_config_like"]


def best_uniform_plan(space) -> Optional[Dict[str, Assignment]]:
    """The best plan that gives every call the same (dp, tp, pp) on the whole cluster
    (``allocation_mode=d{D}p{P}m{M}`` with the best choice of D, P, M); None if none fits.

    :param space: a :class:`realhf.search.search.PlanSearch` (its candidates and evaluator).
    """
    ev = space.evaluator
    whole = Mesh(0, ev.n_devices)
    by_shape: Dict[tuple, Dict[str, Assignment]] = {}
    for name, cands in space.candidates.items():
        for a in cands:
            if a.mesh != whole:
                continue
            key = (a.layout.dp, a.layout.tp, a.layout.pp)
            cur = by_shape.setdefault(key, {}).get(name)
            if cur is None or ev.cost(name, a).seconds < ev.cost(name, cur).seconds:
                by_shape[key][name] = a
    plans = [p for p in by_shape.values() if len(p) == len(space.candidates)]
    feasible = [p for p in plans if not ev.evaluate(p).oom]
    return min(feasible, key=ev.seconds) if feasible else None
