"""``allocation_mode=search`` for quickstart experiments: workload from the config, search, MFCConfigs.

The dataflow graph is read off the experiment's calls: calls whose name
contains ``gen`` generate, ``train_mfc_names`` train, the rest run
inference; inference calls read the generations and train calls read
everything before them (the shape of PPO, GRPO and DPO graphs). Calls
without a model (a rule-based reward) run data-parallel on every device.
On CPU the profile is this machine's (measured once, cached in
``~/.cache/realhf/machine_profile.json`` or ``$REALHF_SEARCH_PROFILE``); on
CUDA the H100 preset with the local device memory. Several nodes: every
call keeps the whole cluster as its mesh (other meshes cannot be named
across nodes yet) and the search picks layouts only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from realhf.api.quickstart.base import ConfigError
from realhf.api.quickstart.model import MFCConfig, ParallelismConfig, load_real_config
from realhf.search.hardware import DeviceProfile, cached_profile, h100_profile
from realhf.search.plan import INF, format_plan
from realhf.search.search import PlanSearch, SearchResult
from realhf.search.workload import GENERATE, INFERENCE, TRAIN, Assignment, CallSpec, Layout, Mesh, ModelShape

logger = logging.getLogger("realhf.search")
SEARCH_ITERS = 1500
SEARCH_BUDGET_S = 20.0
_CACHE: Dict[Tuple, Tuple[Dict[str, MFCConfig], SearchResult]] = {}


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def workload_of(cfg: Any, mfc_names: Sequence[str], train_mfc_names: Sequence[str]) -> List[CallSpec]:
    """The calls of ``cfg`` with their model shapes and batch sizes."""
    n_seqs = _get(cfg, "dataset.train_bs_n_seqs")
    if not isinstance(n_seqs, int) or n_seqs < 1:
        raise ConfigError("allocation_mode='search' needs dataset.train_bs_n_seqs (a positive batch size).")
    prompt = _get(cfg, "dataset.max_prompt_len") or _get(cfg, "dataset.max_seqlen") or 256
    gen = (_get(cfg, "ppo.max_new_tokens") or _get(cfg, "ppo.gen.max_new_tokens")
           or _get(cfg, "grpo.gen.max_new_tokens") or _get(cfg, "gen.max_new_tokens"))
    minibatches = _get(cfg, "ppo.ppo_n_minibatches") or _get(cfg, "grpo.n_minibatches") or 1
    n_seqs *= int(_get(cfg, "grpo.group_size") or 1)  # GRPO: every prompt yields a group of answers
    gen_names = [n for n in mfc_names if "gen" in n]
    gen_len = int(gen or 0) if gen_names else 0
    calls, done = [], []
    kinds = {n: (GENERATE if n in gen_names else TRAIN if n in train_mfc_names else INFERENCE) for n in mfc_names}
    order = sorted(mfc_names, key=lambda n: ({GENERATE: 0, INFERENCE: 1, TRAIN: 2}[kinds[n]], list(mfc_names).index(n)))
    roles_trained = {cfg.mfc_models[n][0] for n in train_mfc_names if n in cfg.mfc_models}
    for n in order:
        if n not in cfg.mfc_models:  # no model (e.g. a rule-based reward): nothing to place
            continue
        key, model = cfg.mfc_models[n]
        try:
            real = load_real_config(model)
        except Exception as e:  # reported by validation too
            raise ConfigError(f"allocation_mode='search' cannot read the config of {key}.path: {e}") from None
        if real is None:
            raise ConfigError(f"allocation_mode='search' needs the shape of {key}: set {key}.path to a model "
                              "directory with a config.json.")
        kind = kinds[n]
        deps = tuple(d for d in done if kinds[d] != TRAIN and (kind == TRAIN or kinds[d] == GENERATE))
        calls.append(CallSpec(n, key, kind, ModelShape.from_real_config(real), deps, n_seqs=n_seqs,
                              prompt_len=int(prompt), gen_len=gen_len,
                              n_minibatches=int(minibatches) if kind == TRAIN else 1,
                              grad_ckpt=bool(model.gradient_checkpointing) and kind == TRAIN,
                              trained_role=key in roles_trained))
        done.append(n)
    return calls


def machine_profile(n_gpus_per_node: int) -> DeviceProfile:
    from realhf.api.quickstart.base import cuda_available

    if cuda_available():
        import torch

        mem = torch.cuda.get_device_properties(0).total_memory
        return dataclasses.replace(h100_profile(n_gpus_per_node), memory_bytes=float(mem))
    return cached_profile(n_gpus_per_node)


def to_mfc_config(a: Assignment, base: Optional[MFCConfig], train: bool, n_nodes: int, per_node: int) -> MFCConfig:
    lay = a.layout
    p = ParallelismConfig(model_parallel_size=lay.tp, pipeline_parallel_size=lay.pp, data_parallel_size=lay.dp,
                          use_sequence_parallel=train and lay.tp > 1)
    mesh = None
    if a.mesh.size != n_nodes * per_node:
        mesh = "localhost:" + ",".join(str(d) for d in a.mesh.devices)
    return MFCConfig(n_mbs=lay.n_mbs, max_tokens_per_mb=base.max_tokens_per_mb if base is not None else None,
                     parallel=p, device_mesh=mesh, cpu_threads=base.cpu_threads if base is not None else None)


def search_allocations(cfg: Any, mfc_names: Sequence[str], train_mfc_names: Sequence[str], *,
                       seed: Optional[int] = None, profile: Optional[DeviceProfile] = None,
                       ) -> Tuple[Dict[str, MFCConfig], SearchResult]:
    """Search a plan for ``cfg`` on its cluster; MFC name -> MFCConfig, and the search result."""
    n_nodes, per_node = cfg.n_nodes, cfg.n_gpus_per_node
    calls = workload_of(cfg, mfc_names, train_mfc_names)
    prof = profile or machine_profile(per_node)
    key = (tuple(calls), n_nodes, per_node, seed if seed is not None else getattr(cfg, "seed", 0), prof)
    if key in _CACHE:
        return _CACHE[key]
    meshes = [Mesh(0, n_nodes * per_node)] if n_nodes > 1 else None
    try:
        space = PlanSearch(calls, prof, n_nodes, meshes=meshes)
    except ValueError as e:
        raise ConfigError(f"allocation_mode='search': {e} ({n_nodes} x {per_node} devices of "
                          f"{prof.memory_bytes / 2**30:.1f} GiB).") from None
    res = space.run(seed=key[3], iters=SEARCH_ITERS, time_budget_s=SEARCH_BUDGET_S)
    if res.seconds == INF:
        raise ConfigError(f"allocation_mode='search' found no plan that fits in memory on {n_nodes} x {per_node} "
                          "devices; use more devices or smaller models/batches.")
    allocs = dict(getattr(cfg, "allocations", {}) or {})
    everywhere = Assignment(Mesh(0, n_nodes * per_node), Layout(n_nodes * per_node, 1, 1))
    out = {n: to_mfc_config(res.plan.get(n, everywhere), allocs.get(n), n in train_mfc_names, n_nodes, per_node)
           for n in mfc_names}
    msg = (f"allocation_mode=search: predicted step time {res.seconds:.3f} s on {prof.name} "
           f"({res.iters} iterations, {res.elapsed_s:.1f} s): {format_plan(res.plan)}")
    logger.info(msg)
    print(msg, flush=True)
    _CACHE[key] = (out, res)
    return out, res


__all__ = ["search_allocations", "workload_of", "machine_profile", "to_mfc_config"]
