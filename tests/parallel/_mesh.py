"""Helpers for tests that run one model on a (dp, tp, pp) mesh of all ranks."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from realhf.api.core.model_api import ReaLModelConfig
from realhf.base import constants
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.comm import global_comm
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.tp_partition import merge_state_dicts

MODEL = "mesh_model"


def setup_mesh(dp: int, tp: int, pp: int, name: str = MODEL, **topology_kw) -> ModelParallelLayout:
    """Register ``name`` on ranks ``0 .. dp*tp*pp - 1`` (call on every rank)."""
    constants.reset()
    global_comm.clear_group_cache()
    layout = ModelParallelLayout.contiguous(PipeDataModelParallelTopology(pp, dp, tp, **topology_kw))
    global_comm.setup_global_comm({name: layout})
    return layout


def stage_from_full(config: ReaLModelConfig, full_sd: Dict[str, torch.Tensor], **kw) -> ReaLModel:
    """This rank's stage and tensor-parallel shard (inside the model scope), loaded from ``full_sd``."""
    model = ReaLModel(config, pp_size=constants.pipe_parallel_world_size(),
                      pp_rank=constants.pipe_parallel_rank(), **kw).instantiate(init=False)
    model.load_state_dict({k: v for k, v in full_sd.items() if k in model.param_spec})
    return model


def coords() -> Dict[str, int]:
    return dict(dp=constants.data_parallel_rank(), tp=constants.tensor_parallel_rank(),
                pp=constants.pipe_parallel_rank())


def merge_mesh_state(results: List[Dict], key: str, config: ReaLModelConfig, dp_rank: int = 0) -> Dict[str, torch.Tensor]:
    """Whole-model tensors from per-rank ``{"coords":..., key: {param_key: shard}}`` results of one dp rank."""
    by_stage: Dict[int, Dict[int, Dict[str, torch.Tensor]]] = {}
    for r in results:
        c = r["coords"]
        if c["dp"] == dp_rank:
            by_stage.setdefault(c["pp"], {})[c["tp"]] = r[key]
    merged: Dict[str, torch.Tensor] = {}
    for pp in sorted(by_stage):
        shards = [by_stage[pp][t] for t in sorted(by_stage[pp])]
        merged.update(merge_state_dicts(shards, config))
    return merged


def last_stage_outputs(results: List[Dict], key: str, dp_rank: Optional[int] = None) -> List:
    """``key`` of every last-stage rank (optionally of one dp rank), ordered by (dp, tp)."""
    n_pp = 1 + max(r["coords"]["pp"] for r in results)
    rows = [r for r in results if r["coords"]["pp"] == n_pp - 1 and (dp_rank is None or r["coords"]["dp"] == dp_rank)]
    rows.sort(key=lambda r: (r["coords"]["dp"], r["coords"]["tp"]))
    return rows
