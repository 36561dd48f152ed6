"""Helpers shared by experiments: configs -> topologies, shards, workers."""

from __future__ import annotations

import dataclasses
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.quickstart.allocation import device_mesh_size
from realhf.api.quickstart.model import MFCConfig, ModelTrainEvalConfig
from realhf.base.topology import PipeDataModelParallelTopology


def topology_of(alloc: MFCConfig, model: ModelTrainEvalConfig, train: bool) -> PipeDataModelParallelTopology:
    p = alloc.parallel
    return PipeDataModelParallelTopology(
        num_pp=p.pipeline_parallel_size, num_dp=p.data_parallel_size, num_mp=p.model_parallel_size,
        sequence_parallel=p.use_sequence_parallel and p.model_parallel_size > 1,
        gradient_checkpointing=train and model.gradient_checkpointing,
    )


def mesh_ranks(alloc: MFCConfig, n_nodes: int, n_gpus_per_node: int) -> List[int]:
    """Global worker ranks of an allocation's device mesh (``host:i,j`` or whole nodes; None = all)."""
    n = device_mesh_size(alloc.device_mesh, n_nodes, n_gpus_per_node, "device_mesh")
    mesh = alloc.device_mesh
    if mesh is None:
        return list(range(n_nodes * n_gpus_per_node))
    if ":" in mesh:
        return [int(x) for x in mesh.partition(":")[2].split(",")]
    return list(range(n))


def call_options(alloc: MFCConfig) -> dict:
    """The MFCDef arguments an allocation sets beyond the layout: micro-batching and CPU threads."""
    return dict(n_mbs=alloc.n_mbs, max_tokens_per_mb=alloc.max_tokens_per_mb, cpu_threads=alloc.cpu_threads)


def real_model(model: ModelTrainEvalConfig, instantiate: bool = True) -> sa.Model:
    return sa.Model("real_model", args=dict(
        family=model.type._class, path=model.path, init_from_scratch=model.init_from_scratch,
        is_critic=model.type.is_critic, init_critic_from_actor=model.init_critic_from_actor,
        dtype=model.dtype, instantiate=instantiate,
    ))


def exp_ctrl(ctrl) -> sa.ExperimentSaveEvalControl:
    return sa.ExperimentSaveEvalControl(**dataclasses.asdict(ctrl))


def device() -> str:
    from realhf.api.quickstart.base import cuda_available

    return "cuda" if cuda_available() else "cpu"


def resolve_replicas(calls: Sequence[str], role: Dict[str, str], train_calls: Collection[str],
                     ranks: Dict[str, List[int]], allocs) -> Dict[str, ModelName]:
    """Call -> replica ``ModelName(role, k)``: train calls first (replica 0), then, in
    ``calls`` order, one replica per distinct (devices, layout) of a role."""
    seen: Dict[str, List[Tuple[Tuple[int, ...], object]]] = {}
    out: Dict[str, ModelName] = {}
    for call in sorted(calls, key=lambda c: (c not in train_calls, list(calls).index(c))):
        key = (tuple(ranks[call]), allocs[call].parallel)  # ParallelismConfig equality ignores SP
        slots = seen.setdefault(role[call], [])
        if key not in slots:
            slots.append(key)
        out[call] = ModelName(role[call], slots.index(key))
    return out


def frozen_offload_hooks() -> List[dfg.OffloadHook]:
    """Post-hooks of a frozen model's call when its devices are shared with other calls.

    Offloading frees accelerator memory for the calls that follow. On the CPU
    the weights already live in host memory: moving them to a memory-mapped
    file and back only costs a copy per step and slows the next call, which
    re-faults the memory the offload returned, so there is no hook.
    """
    return [dfg.OffloadHook()] if device().startswith("cuda") else []


def attach_layout_hooks(rpc: dfg.MFCDef, train_replica: Optional[ModelName], frozen: bool,
                        ranks: Dict[str, List[int]]) -> None:
    """Hooks a call needs because of where it runs.

    A call on another replica of a trained model pulls the trained weights
    before it and drops them after (``train_replica``: that model's train
    replica, None for frozen models); a frozen model whose devices other
    calls (``ranks``: call -> mesh ranks) also use is offloaded after its call.
    """
    if train_replica is not None and rpc.model_name != train_replica:
        rpc.pre_hooks.append(dfg.ParamReallocHook(source=train_replica))
        rpc.post_hooks.append(dfg.ParamReallocHook(target=train_replica))
    if frozen:
        others = set().union(*(set(r) for c, r in ranks.items() if c != rpc.name))
        if others & set(ranks[rpc.name]):
            rpc.post_hooks += frozen_offload_hooks()


def workers_from_shards(n_workers: int, shards: Dict[int, List[sa.StandaloneModelShard]], seed: int,
                        datasets: List[sa.Dataset], tokenizer: Optional[str], dev: str) -> List[sa.ModelWorker]:
    return [sa.ModelWorker(base_seed=seed, shards=shards.get(r, []), datasets=datasets,
                           tokenizer_name_or_path=tokenizer, device=dev) for r in range(n_workers)]


def add_shards(out: Dict[int, List[sa.StandaloneModelShard]], name: ModelName, topo, ranks: List[int],
               model: sa.Model, backend: sa.ModelBackend, **kw) -> None:
    for rank, shard in sa.make_layout_shards(name, topo, ranks, model, backend, **kw).items():
        out.setdefault(rank, []).append(shard)


def with_path(ds: sa.Dataset, path: str) -> sa.Dataset:
    """The same registered dataset and arguments, reading ``path``."""
    return sa.Dataset(ds.type_, args=dict(ds.args, dataset_path=path))


def single_model_training(exp, rpc_name: str, train: sa.Dataset, interface: str,
                          input_keys: List[str], dataset_keys: List[str]) -> sa.ExperimentConfig:
    """One trained model and one ``train_step`` call on ``train`` (SFT, reward modeling).

    ``exp`` is the quickstart config (``model``, ``dataset`` with train/valid
    paths and batch sizes, allocations, seed); the valid set, when
    ``dataset.valid_path`` is set, is ``train`` with that path.
    """
    alloc = exp.resolved_allocations()[rpc_name]
    name = ModelName("default", 0)
    ds = exp.dataset
    valid = with_path(train, ds.valid_path) if ds.valid_path else None
    from realhf.experiments.common.data_checks import check_datasets

    check_datasets(train, exp.model.path, exp.seed, train_key="dataset.train_path",
                   batch_size=ds.train_bs_n_seqs, batch_key="dataset.train_bs_n_seqs",
                   dp=alloc.parallel.data_parallel_size, dp_mfc=rpc_name, valid=valid,
                   valid_key="dataset.valid_path", eval_dp=alloc.parallel.data_parallel_size,
                   length_key="dataset.max_seqlen")
    shards: Dict[int, List[sa.StandaloneModelShard]] = {}
    add_shards(shards, name, topology_of(alloc, exp.model, train=True),
               mesh_ranks(alloc, exp.n_nodes, exp.n_gpus_per_node), real_model(exp.model),
               sa.ModelBackend("train", args=exp.model.backend_args()), eval_dataset=valid, eval_bs=ds.valid_bs_n_seqs)
    workers = workers_from_shards(exp.n_workers, shards, exp.seed, [train], exp.model.path, device())
    rpc = dfg.MFCDef(rpc_name, n_seqs=ds.train_bs_n_seqs, interface_type=ModelInterfaceType.TRAIN_STEP,
                     interface_impl=dfg.ModelInterface(interface), model_name=name, input_keys=list(input_keys),
                     **call_options(alloc), log_return_value=True)
    return sa.ExperimentConfig(exp_ctrl(exp.exp_ctrl), [rpc], workers, dataset_keys=list(dataset_keys),
                               seed=exp.seed)
