"""System-level configuration: what each worker runs.

An :class:`ExperimentConfig` is everything a run needs once the user's
options are resolved: the model function calls (``model_rpcs``), one
:class:`ModelWorker` per device with the model shards it hosts, and the
save/evaluation schedule. Experiments (``realhf.experiments``) build it; the
customization idiom of the documentation edits it before launch::

    cfg = super().initial_setup()
    for mw in cfg.model_worker:
        for s in mw.shards:
            if s.id.model_name.role == "reward":
                s.model = config_api.Model("tokenizer", args=dict(tokenizer_path=...))
                s.backend = config_api.ModelBackend("null")

``__post_init__`` checks the whole description (every MFC's model has shards
on a complete mesh, the dataflow graph is valid, ...) so mistakes surface
before any worker starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from realhf.api.core.config import (  # noqa: F401  (re-exported API)
    DataLoader,
    DataLoaderAbstraction,
    Dataset,
    DatasetAbstraction,
    Model,
    ModelAbstraction,
    ModelBackend,
    ModelBackendAbstraction,
    ModelInterface,
    ModelInterfaceAbstraction,
    ModelName,
    ModelShardID,
)
from realhf.api.core.dfg import MFCDef, build_graph
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology


class ExperimentConfigError(ValueError):
    """The experiment description is inconsistent."""


@dataclasses.dataclass
class ExperimentSaveEvalControl:
    """When to save and evaluate; any trigger that is set fires. A step is one pass over the graph.

    :param benchmark_steps: stop after this many steps (None: run all epochs).
    """

    total_train_epochs: int = 1
    save_freq_epochs: Optional[int] = None
    save_freq_steps: Optional[int] = None
    save_freq_secs: Optional[int] = None
    eval_freq_epochs: Optional[int] = None
    eval_freq_steps: Optional[int] = None
    eval_freq_secs: Optional[int] = None
    benchmark_steps: Optional[int] = None

    def check(self) -> None:
        """Raise ExperimentConfigError naming a non-positive trigger (the CLI validates earlier)."""
        if self.total_train_epochs < 1:
            raise ExperimentConfigError(f"exp_ctrl.total_train_epochs must be >= 1, got {self.total_train_epochs}.")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "total_train_epochs" and v is not None and v <= 0:
                raise ExperimentConfigError(f"exp_ctrl.{f.name} must be positive or None, got {v}.")


@dataclasses.dataclass
class StandaloneModelShard:
    """One shard of a model replica hosted by a model worker.

    :param should_instantiate: False for replicas that only receive
        parameters on demand (a trainable role's non-train replicas).
    :param eval_dataset: dataset evaluated by this shard's interface.
    :param eval_bs: items per evaluation batch.
    """

    id: ModelShardID
    model: ModelAbstraction
    backend: ModelBackendAbstraction
    should_instantiate: bool = True
    eval_dataset: Optional[DatasetAbstraction] = None
    eval_bs: int = 128


@dataclasses.dataclass
class ModelWorker:
    """What one model worker (one device) runs.

    :param datasets: datasets loaded on this worker when it is a data head
        (dp rank of the first MFC's model, tp 0, last pipeline stage).
    """

    base_seed: int
    shards: List[StandaloneModelShard]
    datasets: List[DatasetAbstraction] = dataclasses.field(default_factory=list)
    tokenizer_name_or_path: Optional[str] = None
    device: str = "cpu"
    cuda_cache_cleanliness: bool = False


@dataclasses.dataclass
class ExperimentConfig:
    """A fully resolved experiment.

    :param model_rpcs: the model function calls.
    :param model_worker: one entry per device, index = global rank.
    :param exp_ctrl: save / evaluation / stop schedule.
    :param dataset_keys: keys the datasets provide (checked against the graph).
    :param cache_clear_freq: model workers empty the CUDA cache every N steps
        (None = never; nothing to do on CPU).
    :param wandb_mode: "online" or "offline" also logs step statistics to wandb;
        "disabled" does not.
    """

    exp_ctrl: ExperimentSaveEvalControl
    model_rpcs: List[MFCDef]
    model_worker: List[ModelWorker]
    dataset_keys: Optional[List[str]] = None
    seed: int = 1
    cache_clear_freq: Optional[int] = None
    wandb_mode: str = "disabled"

    def __post_init__(self):
        if not self.model_worker:
            raise ExperimentConfigError("An experiment needs at least one model worker.")
        self.exp_ctrl.check()
        self.resolve()

    # ---------------------------------------------------------------- derived
    def resolve(self) -> None:
        """(Re)compute the graph and per-model layouts; call after editing the config."""
        self.graph = build_graph(self.model_rpcs, self.dataset_keys)
        self.model_layouts: Dict[ModelName, ModelParallelLayout] = {}
        ranks: Dict[ModelName, Dict[Tuple[int, int, int], int]] = {}
        topos: Dict[ModelName, Any] = {}
        for rank, mw in enumerate(self.model_worker):
            for s in mw.shards:
                name = s.id.model_name
                topo = s.id.topo
                if name in topos and topos[name].get_dim_dict() != topo.get_dim_dict():
                    raise ExperimentConfigError(f"Shards of {name} disagree on its topology.")
                topos[name] = topo
                coord = (s.id.pp_rank, s.id.dp_rank, s.id.mp_rank)
                if coord in ranks.setdefault(name, {}):
                    raise ExperimentConfigError(f"Shard {s.id} of {name} appears on two workers.")
                ranks[name][coord] = rank
        for name, topo in topos.items():
            want = topo.world_size()
            if len(ranks[name]) != want:
                raise ExperimentConfigError(f"{name} has {len(ranks[name])} shards, its topology needs {want}.")
            order = [ranks[name][(c.pipe, c.data, c.model)] for c in (topo.get_coord(i) for i in range(want))]
            self.model_layouts[name] = ModelParallelLayout(topo, order)
        for rpc in self.model_rpcs:
            if rpc.model_name not in self.model_layouts:
                raise ExperimentConfigError(
                    f"MFC {rpc.name} runs on {rpc.model_name}, which no model worker hosts "
                    f"(hosted: {sorted(map(str, self.model_layouts))})."
                )
            dp = self.model_layouts[rpc.model_name].topology.get_dim("data")
            if rpc.n_seqs < dp:
                raise ExperimentConfigError(f"MFC {rpc.name}: n_seqs={rpc.n_seqs} is smaller than its dp size {dp}.")

    @property
    def n_model_workers(self) -> int:
        return len(self.model_worker)

    def shard_of(self, rank: int, name: ModelName) -> Optional[StandaloneModelShard]:
        for s in self.model_worker[rank].shards:
            if s.id.model_name == name:
                return s
        return None

    def trainable_roles(self) -> List[str]:
        return sorted({r.role for r in self.model_rpcs if r.is_train})


def make_layout_shards(
    name: ModelName,
    topo: PipeDataModelParallelTopology,
    ranks: List[int],
    model: ModelAbstraction,
    backend: ModelBackendAbstraction,
    **shard_kw,
) -> Dict[int, StandaloneModelShard]:
    """Shards of ``name`` placed on ``ranks`` in topology order: global rank -> shard."""
    if len(ranks) != topo.world_size():
        raise ExperimentConfigError(f"{name}: {topo.world_size()} shards need as many ranks, got {ranks}.")
    out = {}
    for local, rank in enumerate(ranks):
        c = topo.get_coord(local)
        sid = ModelShardID(model_name=name, dp_rank=c.data, mp_rank=c.model, pp_rank=c.pipe, topo=topo)
        out[rank] = StandaloneModelShard(id=sid, model=model, backend=backend, **shard_kw)
    return out


__all__ = [
    "DataLoader", "DataLoaderAbstraction", "Dataset", "DatasetAbstraction", "Model", "ModelAbstraction",
    "ModelBackend", "ModelBackendAbstraction", "ModelInterface", "ModelInterfaceAbstraction", "ModelName",
    "ModelShardID", "ExperimentConfig", "ExperimentConfigError", "ExperimentSaveEvalControl", "ModelWorker",
    "StandaloneModelShard", "make_layout_shards",
]
