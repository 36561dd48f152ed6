"""Per-process global state: experiment identity, paths and parallel state.

One model worker hosts shards of several models (actor, critic, ...), each
on its own 3D mesh, so parallel state is stored per model name and read
through the *active* model set by :func:`model_scope`::

    with constants.model_scope(actor_name):
        dp_rank = constants.data_parallel_rank()

Ranks are derived from the model's :class:`ModelParallelLayout` and this
process's global rank; process-group handles come from the model's grid,
which may be wired after the layout is known.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from typing import Any, Dict, Hashable, Iterator, List, Optional

from realhf.base.topology import (
    DATA_AXIS,
    PIPE_AXIS,
    TENSOR_AXIS,
    ModelParallelLayout,
    PipeDataModelParallelTopology,
)

FILEROOT_ENV_VAR = "REAL_FILEROOT"
DEFAULT_FILEROOT = os.path.join("~", ".cache", "realhf")

ModelName = Hashable

_NO_SCOPE = object()  # marks a scope opened by model_scope_disabled()

_experiment_name: Optional[str] = None
_trial_name: Optional[str] = None
_global_rank: Optional[int] = None
_global_world_size: Optional[int] = None
_rank_mappings: Dict[ModelName, ModelParallelLayout] = {}
_groups: Dict[ModelName, Any] = {}
_group_ranks: Dict[ModelName, List[int]] = {}
_grids: Dict[ModelName, Any] = {}
_scope_stack: List[Any] = []


def reset() -> None:
    """Forget all process-level state (for tests and worker reconfiguration)."""
    global _experiment_name, _trial_name, _global_rank, _global_world_size
    _experiment_name = _trial_name = None
    _global_rank = _global_world_size = None
    _rank_mappings.clear()
    _groups.clear()
    _group_ranks.clear()
    _grids.clear()
    _scope_stack.clear()


# ---------------------------------------------------------------------- #
# Experiment identity and paths.
# ---------------------------------------------------------------------- #
def set_experiment_trial_names(experiment_name: str, trial_name: str) -> None:
    global _experiment_name, _trial_name
    _experiment_name, _trial_name = experiment_name, trial_name


def experiment_name() -> str:
    if _experiment_name is None:
        raise RuntimeError("Experiment name is not set; call set_experiment_trial_names.")
    return _experiment_name


def trial_name() -> str:
    if _trial_name is None:
        raise RuntimeError("Trial name is not set; call set_experiment_trial_names.")
    return _trial_name


def get_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry inside some containers
        return str(os.getuid())


def get_fileroot() -> str:
    """Root of everything realhf writes to disk (``$REAL_FILEROOT``)."""
    root = os.environ.get(FILEROOT_ENV_VAR) or DEFAULT_FILEROOT
    return os.path.abspath(os.path.expanduser(root))


def _trial_path(kind: str, exp: Optional[str], trial: Optional[str]) -> str:
    exp = experiment_name() if exp is None else exp
    trial = trial_name() if trial is None else trial
    return os.path.join(get_fileroot(), kind, get_user(), exp, trial)


def get_log_path(exp: Optional[str] = None, trial: Optional[str] = None) -> str:
    """``<fileroot>/logs/<user>/<exp>/<trial>``; defaults to the current trial."""
    return _trial_path("logs", exp, trial)


def get_save_path(exp: Optional[str] = None, trial: Optional[str] = None) -> str:
    """``<fileroot>/checkpoints/<user>/<exp>/<trial>``."""
    return _trial_path("checkpoints", exp, trial)


def get_recover_path(exp: Optional[str] = None, trial: Optional[str] = None) -> str:
    """``<fileroot>/recover/<user>/<exp>/<trial>``."""
    return _trial_path("recover", exp, trial)


def get_param_realloc_path(
    exp: Optional[str] = None, trial: Optional[str] = None
) -> str:
    """``<fileroot>/param_realloc/<user>/<exp>/<trial>``."""
    return _trial_path("param_realloc", exp, trial)


# ---------------------------------------------------------------------- #
# This process in the global world.
# ---------------------------------------------------------------------- #
def set_global_rank(rank: int) -> None:
    global _global_rank
    _global_rank = int(rank)


def set_global_world_size(world_size: int) -> None:
    global _global_world_size
    _global_world_size = int(world_size)


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """Rank of this process in the global world; falls back to torch.distributed."""
    if _global_rank is not None:
        return _global_rank
    if _dist_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    raise RuntimeError("Global rank is unknown; call set_global_rank first.")


def global_world_size() -> int:
    if _global_world_size is not None:
        return _global_world_size
    if _dist_initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    raise RuntimeError(
        "Global world size is unknown; call set_global_world_size first."
    )


# ---------------------------------------------------------------------- #
# Registration of per-model parallel state.
# ---------------------------------------------------------------------- #
def set_rank_mapping(model_name: ModelName, layout: ModelParallelLayout) -> None:
    """Record which global rank hosts each shard of ``model_name``."""
    if not isinstance(layout, ModelParallelLayout):
        raise TypeError(f"Expected a ModelParallelLayout, got {type(layout).__name__}.")
    _rank_mappings[model_name] = layout


def set_parallelism_group(model_name: ModelName, group: Any, ranks: List[int]) -> None:
    """Record the process group spanning all shards of ``model_name``."""
    _groups[model_name] = group
    _group_ranks[model_name] = list(ranks)


def set_grid(model_name: ModelName, grid: Any) -> None:
    """Record the object holding the model's dp/tp/pp process groups.

    ``grid`` answers ``get_data_parallel_group()``,
    ``get_tensor_model_parallel_group()`` and ``get_pipe_parallel_group()``
    (or carries ``dp_group``/``tp_group``/``pp_group`` attributes). It may be
    None while groups are not created yet.
    """
    _grids[model_name] = grid


def has_model_name(model_name: ModelName) -> bool:
    return (
        model_name in _rank_mappings or model_name in _groups or model_name in _grids
    )


def registered_model_names() -> List[ModelName]:
    names = list(_rank_mappings)
    for mapping in (_groups, _grids):
        names += [n for n in mapping if n not in names]
    return names


# ---------------------------------------------------------------------- #
# Model scopes.
# ---------------------------------------------------------------------- #
@contextlib.contextmanager
def model_scope(model_name: ModelName) -> Iterator[None]:
    """Make ``model_name`` the active model; nests and restores on exit."""
    _scope_stack.append(model_name)
    try:
        yield
    finally:
        _scope_stack.pop()


@contextlib.contextmanager
def model_scope_disabled() -> Iterator[None]:
    """Run a block with no active model, e.g. code that must be model-agnostic."""
    _scope_stack.append(_NO_SCOPE)
    try:
        yield
    finally:
        _scope_stack.pop()


def in_model_scope() -> bool:
    """Whether a model scope (:func:`model_scope`) is active."""
    return bool(_scope_stack) and _scope_stack[-1] is not _NO_SCOPE


def model_name() -> ModelName:
    if not in_model_scope():
        raise RuntimeError(
            "No model scope is active; wrap the call in constants.model_scope(name)."
        )
    return _scope_stack[-1]


def _layout() -> ModelParallelLayout:
    name = model_name()
    try:
        return _rank_mappings[name]
    except KeyError:
        raise RuntimeError(
            f"No rank mapping for model {name!r}; call set_rank_mapping first."
        ) from None


def rank_mapping() -> ModelParallelLayout:
    return _layout()


def grid() -> Any:
    name = model_name()
    try:
        return _grids[name]
    except KeyError:
        raise RuntimeError(f"No grid set for model {name!r}; call set_grid first.") from None


def _coord():
    return _layout().coord(global_rank())


# ---------------------------------------------------------------------- #
# Whole-model parallelism.
# ---------------------------------------------------------------------- #
def parallelism_rank() -> int:
    """Rank of this process within the active model's topology."""
    return _layout().to_local(global_rank())


def parallelism_group_size() -> int:
    return _layout().world_size()


def parallelism_group() -> Any:
    name = model_name()
    try:
        return _groups[name]
    except KeyError:
        raise RuntimeError(
            f"No parallelism group for model {name!r}; call set_parallelism_group."
        ) from None


def parallelism_group_ranks() -> List[int]:
    name = model_name()
    if name in _group_ranks:
        return list(_group_ranks[name])
    return list(_layout().global_ranks)


def to_global_pg_rank(local_rank: int) -> int:
    """Global rank hosting local rank ``local_rank`` of the active model."""
    return _layout().to_global(local_rank)


# ---------------------------------------------------------------------- #
# Per-axis state.
# ---------------------------------------------------------------------- #
# How to fetch each axis' group from a grid: (method name, attribute name).
_GRID_ACCESSORS: Dict[str, tuple] = {
    DATA_AXIS: ("get_data_parallel_group", "dp_group"),
    TENSOR_AXIS: ("get_tensor_model_parallel_group", "tp_group"),
    PIPE_AXIS: ("get_pipe_parallel_group", "pp_group"),
}


def _axis_group(axis: str) -> Any:
    g = grid()
    if g is None:
        raise RuntimeError(
            f"Process groups of model {model_name()!r} are not created yet."
        )
    method, attr = _GRID_ACCESSORS[axis]
    if hasattr(g, method):
        return getattr(g, method)()
    if hasattr(g, attr):
        return getattr(g, attr)
    raise TypeError(f"Grid {type(g).__name__} exposes neither {method}() nor .{attr}.")


def _axis_rank(axis: str) -> int:
    return getattr(_coord(), axis)


def _axis_size(axis: str) -> int:
    return _layout().topology.get_dim(axis)


def data_parallel_rank() -> int:
    return _axis_rank(DATA_AXIS)


def data_parallel_world_size() -> int:
    return _axis_size(DATA_AXIS)


def data_parallel_group() -> Any:
    return _axis_group(DATA_AXIS)


def tensor_parallel_rank() -> int:
    return _axis_rank(TENSOR_AXIS)


def tensor_parallel_world_size() -> int:
    return _axis_size(TENSOR_AXIS)


def tensor_parallel_group() -> Any:
    return _axis_group(TENSOR_AXIS)


model_parallel_rank = tensor_parallel_rank
model_parallel_world_size = tensor_parallel_world_size
model_parallel_group = tensor_parallel_group


def pipe_parallel_rank() -> int:
    return _axis_rank(PIPE_AXIS)


def pipe_parallel_world_size() -> int:
    return _axis_size(PIPE_AXIS)


def pipe_parallel_group() -> Any:
    return _axis_group(PIPE_AXIS)


def is_first_pipe_stage() -> bool:
    return pipe_parallel_rank() == 0


def is_last_pipe_stage() -> bool:
    return pipe_parallel_rank() == pipe_parallel_world_size() - 1


# ---------------------------------------------------------------------- #
# Training options carried by the topology.
# ---------------------------------------------------------------------- #
def _topology_option(name: str, default: Any) -> Any:
    topo = _layout().topology
    if isinstance(topo, PipeDataModelParallelTopology):
        return getattr(topo, name)
    return default


def sequence_parallel() -> bool:
    return _topology_option("sequence_parallel", False)


def gradient_checkpointing() -> bool:
    return _topology_option("gradient_checkpointing", False)


def gradient_accumulation_fusion() -> bool:
    return _topology_option("gradient_accumulation_fusion", False)


def max_prompt_len() -> Optional[int]:
    return _topology_option("max_prompt_len", None)
