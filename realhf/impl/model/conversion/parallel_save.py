"""Saving a ReaLModel held on a (dp, tp, pp) mesh as one HF checkpoint.

Every rank of the model's mesh calls :func:`save_hf_checkpoint`. Ranks of
data-parallel replica 0 collect the whole model on one writer (dp 0, tp 0,
stage 0): each stage first gathers its tensor-parallel shards onto its tp
rank 0, which merges them (:func:`merge_state_dicts`); then the merged
stages are gathered onto stage 0. The writer converts the state dict with
the family's converter and writes ``config.json``, safetensors weights and
tokenizer files into a temporary sibling of ``save_dir`` that is renamed
into place only when complete, so ``save_dir`` is either absent, the old
checkpoint, or the whole new one. Finally the writer's success or failure
is shared with every rank of the mesh, so all ranks return or all raise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from realhf.api.core.model_api import ReaLModelConfig, get_hf_family
from realhf.base import constants
from realhf.impl.model.conversion.hf_io import copy_hf_aux_files, save_hf_state_dict
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_base import head_key
from realhf.impl.model.nn.tp_partition import merge_state_dicts

StateDict = Dict[str, torch.Tensor]


def _cpu_state(module: ReaLModel) -> StateDict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _gather_objects(obj: Any, group: Any, ranks: List[int]) -> Optional[List[Any]]:
    """``obj`` of every member of ``group`` (ordered like ``ranks``) on ``ranks[0]``, else None."""
    if len(ranks) == 1:
        return [obj]
    me = dist.get_rank()
    out: Optional[List[Any]] = [None] * len(ranks) if me == ranks[0] else None
    dist.gather_object(obj, out, dst=ranks[0], group=group)
    return out


def gather_full_state_dict(module: ReaLModel) -> Optional[StateDict]:
    """Whole-model ReaLModel state dict (CPU, unsplit) on the writer rank, ``None`` elsewhere.

    Collective over the active model scope (only data-parallel replica 0
    communicates). Outside a scope the module must be the whole model.
    """
    if not (dist.is_initialized() and constants.in_model_scope()):
        _check_whole(module)
        return _cpu_state(module)
    if constants.data_parallel_rank() != 0:
        return None
    grid = constants.grid()
    shards = _gather_objects(_cpu_state(module), grid.tp_group, list(grid.tp_ranks))
    if shards is None:  # tp rank > 0
        return None
    stage_sd = merge_state_dicts(shards, module.config)
    stages = _gather_objects(stage_sd, grid.pp_group, list(grid.pp_ranks))
    if stages is None:  # stage > 0
        return None
    full: StateDict = {}
    for sd in stages:
        full.update(sd)
    return full


def _check_whole(module: ReaLModel) -> None:
    n = module.config.n_layers
    if getattr(module, "tp_size", 1) != 1 or list(module.layer_indices) != list(range(n + 2)):
        raise RuntimeError(
            "save_hf_checkpoint outside a model scope needs the whole model on one rank "
            f"(got tp_size={getattr(module, 'tp_size', 1)}, layers {module.layer_indices[0]}.."
            f"{module.layer_indices[-1]}); call it inside constants.model_scope on every rank of the mesh."
        )


def full_model_keys(config: ReaLModelConfig) -> List[str]:
    """Keys of the unsplit, unpipelined ReaLModel of ``config`` (no memory allocated)."""
    return list(ReaLModel(config, tp_size=1, tp_rank=0).param_spec)


def to_hf_state_dict(full_sd: StateDict, config: ReaLModelConfig, family: str) -> StateDict:
    """Whole-model ReaLModel tensors -> HF tensors of ``family`` (a tied head is left to the embedding)."""
    missing = [k for k in full_model_keys(config) if k not in full_sd]
    if config.tied_embedding:
        missing = [k for k in missing if k != head_key(config)]
    if missing:
        raise KeyError(f"Gathered state dict misses {len(missing)} keys, e.g. {missing[:5]}.")
    sd = dict(full_sd)
    if config.tied_embedding:
        sd.pop(head_key(config), None)
    return get_hf_family(family).sd_to_hf_converter(sd, config)


def write_hf_files(full_sd: StateDict, config: ReaLModelConfig, family: str, tokenizer: Any,
                   dtype: torch.dtype, out_dir: str) -> None:
    """config.json, safetensors weights and tokenizer files of the whole model into ``out_dir``."""
    fam = get_hf_family(family)
    hf_config = fam.config_to_hf_converter(config)
    hf_config.dtype = str(dtype).removeprefix("torch.")
    hf_config.save_pretrained(out_dir)
    save_hf_state_dict(to_hf_state_dict(full_sd, config, family), out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    elif config.base_model_path and os.path.isdir(config.base_model_path):
        copy_hf_aux_files(config.base_model_path, out_dir)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def atomic_directory_write(save_dir: str, fill: Callable[[str], None]) -> None:
    """Run ``fill(tmp_dir)`` on a temporary sibling of ``save_dir``, then move it into place.

    An existing ``save_dir`` is replaced (moved aside, then deleted after the
    new directory is in place; restored if the move fails). On any error the
    temporary directory is removed and ``save_dir`` is left as it was.
    """
    save_dir = os.path.abspath(os.fspath(save_dir))
    parent, name = os.path.split(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        fill(tmp)
        if os.path.lexists(save_dir):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(save_dir, old)
            try:
                os.rename(tmp, save_dir)
            except BaseException:
                os.rename(old, save_dir)
                raise
            _remove(old)
        else:
            os.rename(tmp, save_dir)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _status_group():
    """Group over which the writer's outcome is shared: the model's mesh, or the world."""
    if constants.in_model_scope():
        return constants.parallelism_group()
    return None  # default group


def save_hf_checkpoint(module: ReaLModel, family: str, tokenizer: Any, save_dir: str) -> None:
    """Write the whole model as a HF checkpoint at ``save_dir``, atomically.

    Collective over the active model scope's mesh (all dp, tp and pp ranks
    call it); outside a scope with torch.distributed initialized, over the
    default group with global rank 0 writing (the module must then be the
    whole model), and without torch.distributed simply writes. Raises on
    every rank if the writer failed.
    """
    full = gather_full_state_dict(module)
    writer = full is not None and (not dist.is_initialized() or constants.in_model_scope() or dist.get_rank() == 0)
    error: Optional[BaseException] = None
    if writer:
        try:
            atomic_directory_write(
                save_dir, lambda d: write_hf_files(full, module.config, family, tokenizer, module.dtype, d))
        except BaseException as e:  # reported to the other ranks below
            error = e
    if dist.is_initialized():
        dev = module.device if dist.get_backend(_status_group()) == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if error is not None else 0.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_status_group())
        failed = bool(flag.item() > 0)
    else:
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"Saving the HF checkpoint {save_dir!r} failed on the writer rank.")
