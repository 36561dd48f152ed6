"""Cartesian process meshes and their communication groups.

A :class:`ProcessTopology` numbers the points of an N-dimensional mesh in
row-major order over its axes (the last axis varies fastest). Models use the
pipe-major ``("pipe", "data", "model")`` mesh of
:class:`PipeDataModelParallelTopology`, where "model" is the tensor-parallel
axis. :class:`ModelParallelLayout` places such a mesh on a list of global
ranks, which is how one model's shards map onto the workers that host them.
Process groups are created elsewhere; everything here is pure bookkeeping.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

PIPE_AXIS = "pipe"
DATA_AXIS = "data"
TENSOR_AXIS = "model"


class ProcessTopology:
    """Bijection between ranks ``0..world_size-1`` and mesh coordinates."""

    def __init__(self, axes: Sequence[str], dims: Sequence[int]):
        axes = list(axes)
        dims = [int(d) for d in dims]
        if len(axes) != len(dims):
            raise ValueError(f"Got {len(axes)} axes but {len(dims)} dims.")
        if len(set(axes)) != len(axes):
            raise ValueError(f"Axis names must be unique, got {axes}.")
        if any(d < 1 for d in dims):
            raise ValueError(f"Every dim must be positive, got {dims}.")
        self.axes: List[str] = axes
        self.dims: List[int] = dims
        self.ProcessCoord = collections.namedtuple("ProcessCoord", axes)
        # Row-major strides: the stride of an axis is the product of the
        # dims after it.
        self._strides: List[int] = [math.prod(dims[i + 1 :]) for i in range(len(dims))]
        self._world_size = math.prod(dims)

    # The coordinate namedtuple class is made per instance, so it cannot be
    # pickled by reference; rebuild it when a topology crosses processes.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("ProcessCoord", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ProcessCoord = collections.namedtuple("ProcessCoord", self.axes)

    # ------------------------------------------------------------------ #
    # Basic maps.
    # ------------------------------------------------------------------ #
    def world_size(self) -> int:
        return self._world_size

    def get_axis_names(self) -> List[str]:
        return list(self.axes)

    def get_dim(self, axis: str) -> int:
        return self.dims[self._axis_index(axis)]

    def get_dim_dict(self) -> Dict[str, int]:
        return dict(zip(self.axes, self.dims))

    def get_rank(self, **coord: int) -> int:
        """Rank of the process at ``coord``; every axis must be given."""
        if set(coord) != set(self.axes):
            raise ValueError(
                f"get_rank needs exactly the axes {self.axes}, got {sorted(coord)}."
            )
        rank = 0
        for axis, dim, stride in zip(self.axes, self.dims, self._strides):
            idx = coord[axis]
            if not 0 <= idx < dim:
                raise ValueError(f"Coordinate {axis}={idx} outside [0, {dim}).")
            rank += idx * stride
        return rank

    def get_coord(self, rank: int):
        """Coordinates of ``rank`` as a namedtuple with one field per axis."""
        self._check_rank(rank)
        return self.ProcessCoord(
            *((rank // stride) % dim for dim, stride in zip(self.dims, self._strides))
        )

    def all_coords(self) -> List[Tuple[int, ...]]:
        return [self.get_coord(r) for r in range(self._world_size)]

    # ------------------------------------------------------------------ #
    # Groups.
    # ------------------------------------------------------------------ #
    def get_axis_comm_lists(self, axis: str) -> List[List[int]]:
        """Rank lists of all groups along ``axis``.

        A group holds the ranks that differ only in ``axis``; groups are
        ordered row-major by the remaining coordinates.
        """
        a = self._axis_index(axis)
        others = [i for i in range(len(self.axes)) if i != a]
        lists = []
        for fixed in itertools.product(*(range(self.dims[i]) for i in others)):
            base = sum(idx * self._strides[i] for i, idx in zip(others, fixed))
            lists.append([base + k * self._strides[a] for k in range(self.dims[a])])
        return lists

    def filter_match(self, **coord: int) -> List[int]:
        """Ascending ranks whose coordinates equal every given ``axis=value``."""
        for axis in coord:
            self._axis_index(axis)
        return [
            r
            for r in range(self._world_size)
            if all(getattr(self.get_coord(r), ax) == v for ax, v in coord.items())
        ]

    def get_axis_list(self, axis: str, idx: int) -> List[int]:
        """Ascending ranks whose coordinate along ``axis`` is ``idx``."""
        return self.filter_match(**{axis: idx})

    def get_rank_repr(
        self,
        rank: int,
        omit_axes: Sequence[str] = (DATA_AXIS, PIPE_AXIS),
        inner_sep: str = "_",
        outer_sep: str = "-",
    ) -> str:
        """Readable tag such as ``"model_01"`` naming ``rank``'s coordinates."""
        coord = self.get_coord(rank)
        return outer_sep.join(
            f"{axis}{inner_sep}{getattr(coord, axis):02d}"
            for axis in self.axes
            if axis not in omit_axes
        )

    # ------------------------------------------------------------------ #
    # Identity.
    # ------------------------------------------------------------------ #
    def __eq__(self, other) -> bool:
        if not isinstance(other, ProcessTopology):
            return NotImplemented
        return self.axes == other.axes and self.dims == other.dims

    def __hash__(self) -> int:
        return hash((tuple(self.axes), tuple(self.dims)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{a}={d}" for a, d in zip(self.axes, self.dims))
        return f"{type(self).__name__}({inner})"

    def _axis_index(self, axis: str) -> int:
        try:
            return self.axes.index(axis)
        except ValueError:
            raise ValueError(f"Unknown axis {axis!r}; axes are {self.axes}.") from None

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self._world_size:
            raise ValueError(f"Rank {rank} outside [0, {self._world_size}).")


class PipeDataModelParallelTopology(ProcessTopology):
    """The ``(pipe, data, model)`` mesh used for every model in realhf.

    Pipe-major ordering keeps the ranks of one pipeline stage contiguous, so
    tensor-parallel peers are neighbours and data-parallel peers are strided
    by the tensor-parallel size. Training options that depend on the mesh
    (sequence parallelism, checkpointing, ...) travel with it.
    """

    def __init__(
        self,
        num_pp: int,
        num_dp: int,
        num_mp: Optional[int] = None,
        sequence_parallel: bool = False,
        gradient_checkpointing: bool = False,
        max_prompt_len: Optional[int] = None,
        gradient_accumulation_fusion: bool = False,
        *,
        num_tp: Optional[int] = None,
    ):
        if num_mp is None and num_tp is None:
            raise TypeError("Pass the tensor-parallel size as num_mp or num_tp.")
        if num_mp is not None and num_tp is not None and num_mp != num_tp:
            raise ValueError(f"num_mp={num_mp} and num_tp={num_tp} disagree.")
        size = num_mp if num_mp is not None else num_tp
        super().__init__([PIPE_AXIS, DATA_AXIS, TENSOR_AXIS], [num_pp, num_dp, size])
        self.sequence_parallel = bool(sequence_parallel)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.max_prompt_len = max_prompt_len
        self.gradient_accumulation_fusion = bool(gradient_accumulation_fusion)

    @property
    def num_pp(self) -> int:
        return self.dims[0]

    @property
    def num_dp(self) -> int:
        return self.dims[1]

    @property
    def num_mp(self) -> int:
        return self.dims[2]

    num_tp = num_mp

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pp={self.num_pp}, dp={self.num_dp}, "
            f"tp={self.num_tp}, sequence_parallel={self.sequence_parallel}, "
            f"gradient_checkpointing={self.gradient_checkpointing})"
        )


@dataclasses.dataclass
class ModelParallelLayout:
    """A topology placed on concrete global ranks.

    ``global_ranks[i]`` hosts local topology rank ``i``. All group lists
    returned here hold global ranks.
    """

    topology: ProcessTopology
    global_ranks: List[int]

    def __post_init__(self):
        self.global_ranks = [int(r) for r in self.global_ranks]
        if len(self.global_ranks) != self.topology.world_size():
            raise ValueError(
                f"{self.topology} needs {self.topology.world_size()} ranks, "
                f"got {len(self.global_ranks)}."
            )
        if len(set(self.global_ranks)) != len(self.global_ranks):
            raise ValueError(f"Global ranks must be distinct: {self.global_ranks}.")
        self._local_of = {g: i for i, g in enumerate(self.global_ranks)}

    @classmethod
    def contiguous(cls, topology: ProcessTopology, offset: int = 0) -> "ModelParallelLayout":
        """Layout on ranks ``offset .. offset + world_size - 1``."""
        return cls(topology, list(range(offset, offset + topology.world_size())))

    def __contains__(self, global_rank: int) -> bool:
        return global_rank in self._local_of

    def world_size(self) -> int:
        return len(self.global_ranks)

    def to_global(self, local_rank: int) -> int:
        self.topology._check_rank(local_rank)
        return self.global_ranks[local_rank]

    def to_local(self, global_rank: int) -> int:
        try:
            return self._local_of[global_rank]
        except KeyError:
            raise ValueError(
                f"Global rank {global_rank} hosts no shard of this model "
                f"(ranks {self.global_ranks})."
            ) from None

    def coord(self, global_rank: int):
        return self.topology.get_coord(self.to_local(global_rank))

    def global_rank_of(self, **coord: int) -> int:
        return self.global_ranks[self.topology.get_rank(**coord)]

    def groups(self, axis: str) -> List[List[int]]:
        """Global rank lists of every group along ``axis``."""
        return [
            [self.global_ranks[r] for r in ranks]
            for ranks in self.topology.get_axis_comm_lists(axis)
        ]

    def group_of(self, axis: str, global_rank: int) -> List[int]:
        """The group along ``axis`` that contains ``global_rank``."""
        local = self.to_local(global_rank)
        for ranks in self.topology.get_axis_comm_lists(axis):
            if local in ranks:
                return [self.global_ranks[r] for r in ranks]
        raise AssertionError("every rank belongs to one group per axis")

    def dp_groups(self) -> List[List[int]]:
        return self.groups(DATA_AXIS)

    def tp_groups(self) -> List[List[int]]:
        return self.groups(TENSOR_AXIS)

    def pp_groups(self) -> List[List[int]]:
        return self.groups(PIPE_AXIS)

    def dp_group_of(self, global_rank: int) -> List[int]:
        return self.group_of(DATA_AXIS, global_rank)

    def tp_group_of(self, global_rank: int) -> List[int]:
        return self.group_of(TENSOR_AXIS, global_rank)

    def pp_group_of(self, global_rank: int) -> List[int]:
        return self.group_of(PIPE_AXIS, global_rank)
