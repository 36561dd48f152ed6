"""Creating and registering the process groups of every model.

Several models (actor, critic, ...) live on the same global world, each on
its own (pipe, data, tensor) mesh. ``torch.distributed.new_group`` is a
collective over the *whole* world: every rank must call it for every group,
in the same order, even for groups it is not a member of. This module
derives that order from the layouts alone, so any rank holding the same
layouts creates the same groups, and then wires the groups into
:mod:`realhf.base.constants` so ``constants.model_scope(name)`` exposes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from realhf.base import constants
from realhf.base.topology import PIPE_AXIS, ModelParallelLayout

ModelName = Hashable
RankKey = Tuple[int, ...]

# Groups created so far, keyed by their sorted global ranks. Creating the same
# group twice would waste communicator resources (NCCL) and, worse, break the
# "same calls on every rank" contract if only some ranks knew about it.
_group_cache: Dict[RankKey, Any] = {}


def _key(ranks: Iterable[int]) -> RankKey:
    key = tuple(sorted(int(r) for r in ranks))
    if len(set(key)) != len(key):
        raise ValueError(f"Group ranks must be distinct, got {list(ranks)}.")
    if not key:
        raise ValueError("A process group needs at least one rank.")
    return key


_local_links: Any = None  # this process's LocalLinks (sockets to the ranks of its host), if any


def set_local_links(links: Any) -> None:
    """Register the worker's ``LocalLinks`` for collectives that can use them (dp gradient sums)."""
    global _local_links
    _local_links = links


def local_links() -> Any:
    return _local_links


_LINK_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MIN: "min", dist.ReduceOp.MAX: "max"}


def all_reduce(t: torch.Tensor, group: Any = None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``dist.all_reduce(t, op, group)`` in place, through the local links when every rank of
    ``group`` is a worker of this host and ``t`` is a CPU tensor: the small collectives of a call
    (loss weights, statistics, norms) then skip gloo's thread hand-offs, which cost 0.3-4 ms
    each right after a compute phase. Every rank of the group takes the same route."""
    ranks = link_ranks(t, group)
    name = _LINK_OPS.get(op)
    if ranks is not None and name is not None:
        return _local_links.all_reduce(t, ranks, name)
    dist.all_reduce(t, op=op, group=group)
    return t


def all_gather(parts: List[torch.Tensor], t: torch.Tensor, group: Any = None) -> None:
    """``dist.all_gather(parts, t, group)``, through the local links under the rule of
    :func:`all_reduce` (a ZeRO step's parameter gather: ~20 ms through gloo for 7 MB a rank,
    a plain copy through the links)."""
    ranks = link_ranks(t, group)
    if ranks is not None and all(p.device.type == "cpu" and p.is_contiguous() for p in parts):
        _local_links.all_gather(parts, t, ranks)
        return
    dist.all_gather(parts, t, group=group)


def reduce_scatter_over_links(t: torch.Tensor, bounds: Sequence[int], group: Any = None) -> bool:
    """Sum chunk i of ``t`` (``bounds[i]:bounds[i + 1]``) over ``group`` into its i-th rank's
    ``t`` in place, through the local links; False (nothing done) where they do not reach the
    group (the caller then all-reduces)."""
    ranks = link_ranks(t, group)
    if ranks is None:
        return False
    _local_links.reduce_scatter(t, ranks, bounds)
    return True


def link_ranks(t: torch.Tensor, group: Any = None) -> Optional[List[int]]:
    """The ranks of ``group`` (in its order) when a collective on ``t`` may run over the local
    links (a contiguous CPU tensor, every rank of the group a worker of this host), else None."""
    if _local_links is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    return ranks if _local_links.reaches(ranks) else None


def new_or_get_group(ranks: Sequence[int], backend: Optional[str] = None) -> Any:
    """Return the cached group over ``ranks``, creating it collectively if new.

    Must be called by every rank of the global world with the same arguments
    in the same order. Non-members get torch's non-member placeholder.
    """
    key = _key(ranks)
    group = _group_cache.get(key)
    if group is None:
        group = dist.new_group(ranks=list(key), backend=backend)
        _group_cache[key] = group
        if dist.get_rank() in key:
            warm_up_group(group)
    return group


def warm_up_group(group: Any) -> bool:
    """Run one all-reduce over ``group`` if its backend is NCCL; True if it did.

    NCCL creates a group's communicator lazily, and a ``batch_isend_irecv``
    that is the group's first collective must involve every rank of the group.
    Worker data transfers and parameter reallocation batch p2p ops between
    only some ranks, so each NCCL group runs one collective with all members
    right after creation. Must be called by every member; gloo needs nothing.
    """
    if dist.get_backend(group) != "nccl":
        return False
    flag = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flag, group=group)
    return True


def cached_group(ranks: Sequence[int]) -> Any:
    """The already-created group over ``ranks``; KeyError if it does not exist."""
    return _group_cache[_key(ranks)]


def clear_group_cache() -> None:
    """Forget cached groups (after the default process group is destroyed)."""
    _group_cache.clear()


@dataclasses.dataclass
class ParallelGrid:
    """This rank's dp/tp/pp process groups for one model.

    Implements the accessor protocol read by :func:`constants.set_grid`.
    Ranks lists hold global ranks, ordered as inside the torch group
    (ascending), which is also the order of the mesh coordinate.
    """

    layout: ModelParallelLayout
    global_rank: int
    dp_ranks: List[int]
    tp_ranks: List[int]
    pp_ranks: List[int]
    dp_group: Any
    tp_group: Any
    pp_group: Any
    mesh_group: Any

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_tensor_model_parallel_group(self) -> Any:
        return self.tp_group

    get_model_parallel_group = get_tensor_model_parallel_group

    def get_pipe_parallel_group(self) -> Any:
        return self.pp_group

    def get_parallelism_group(self) -> Any:
        return self.mesh_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_ranks.index(self.global_rank)

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_ranks.index(self.global_rank)

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_ranks.index(self.global_rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.dp_ranks)

    def get_tensor_model_parallel_world_size(self) -> int:
        return len(self.tp_ranks)

    def get_pipe_parallel_world_size(self) -> int:
        return len(self.pp_ranks)


def _axis_lists(layout: ModelParallelLayout) -> List[List[int]]:
    return [*layout.dp_groups(), *layout.tp_groups(), *layout.pp_groups()]


def _check_ordered(name: ModelName, kind: str, groups: List[List[int]]) -> None:
    # torch orders group members by global rank, while collectives such as
    # all_gather place shards by group rank. If the mesh coordinate order
    # disagreed with that, shards would be silently permuted.
    for ranks in groups:
        if list(ranks) != sorted(ranks):
            raise ValueError(
                f"Model {name!r}: {kind} group {ranks} is not in ascending global "
                "rank order; place the mesh on increasing global ranks."
            )


def required_groups(layouts: Dict[ModelName, ModelParallelLayout]) -> List[RankKey]:
    """All groups the layouts need, deduplicated, in a rank-independent order."""
    keys = set()
    for layout in layouts.values():
        keys.add(_key(layout.global_ranks))
        keys.update(_key(r) for r in _axis_lists(layout))
    return sorted(keys, key=lambda k: (len(k), k))


def setup_global_comm(
    layouts: Dict[ModelName, ModelParallelLayout],
    backend: Optional[str] = None,
    global_rank: Optional[int] = None,
) -> Dict[ModelName, ParallelGrid]:
    """Create every model's groups and register them in ``constants``.

    Collective over the global world: all ranks must pass the same layouts.
    Returns the grids of the models this rank hosts. Rank mappings and mesh
    groups are registered for every model, so any rank can tell where a model
    lives; grids only for hosted models.
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized first.")
    me = dist.get_rank() if global_rank is None else int(global_rank)
    world = dist.get_world_size()
    for name, layout in layouts.items():
        if not isinstance(layout, ModelParallelLayout):
            raise TypeError(f"Model {name!r}: expected ModelParallelLayout.")
        bad = [r for r in layout.global_ranks if not 0 <= r < world]
        if bad:
            raise ValueError(f"Model {name!r} uses ranks {bad} outside world {world}.")
        _check_ordered(name, "tensor-parallel", layout.tp_groups())
        _check_ordered(name, "pipeline-parallel", layout.pp_groups())
        _check_ordered(name, "data-parallel", layout.dp_groups())

    for key in required_groups(layouts):
        new_or_get_group(key, backend=backend)

    grids: Dict[ModelName, ParallelGrid] = {}
    for name, layout in layouts.items():
        mesh_ranks = sorted(layout.global_ranks)
        constants.set_rank_mapping(name, layout)
        constants.set_parallelism_group(name, cached_group(mesh_ranks), mesh_ranks)
        if me not in layout:
            continue
        dp = layout.dp_group_of(me)
        tp = layout.tp_group_of(me)
        pp = layout.group_of(PIPE_AXIS, me)
        grid = ParallelGrid(
            layout=layout,
            global_rank=me,
            dp_ranks=dp,
            tp_ranks=tp,
            pp_ranks=pp,
            dp_group=cached_group(dp),
            tp_group=cached_group(tp),
            pp_group=cached_group(pp),
            mesh_group=cached_group(mesh_ranks),
        )
        constants.set_grid(name, grid)
        grids[name] = grid
    return grids
