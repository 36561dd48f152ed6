"""Planning parameter reallocation between two 3D-parallel layouts (pure Python).

See :mod:`realhf.impl.model.comm.param_realloc` for the design. This module
turns (config, source layout, destination layout) into a
:class:`ReallocPlan`: for every destination global rank, which intervals of
its flat buffer come from which source rank's flat buffer, and where. Plans
are deterministic (every rank computes the same one) and cached.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from realhf.api.core.model_api import ReaLModelConfig
from realhf.base.topology import ModelParallelLayout
from realhf.impl.model.nn.flat_param import ParamSlot, build_param_spec
from realhf.impl.model.nn.real_llm_base import layer_param_shapes, partition_layers
from realhf.impl.model.nn.tp_partition import COL, KV, ROW, check_tp_supported, param_kind, shard_config
from realhf.impl.model.parallelism.tensor_parallel.layers import kv_heads_partition
from realhf.impl.ops import merge_intervals

__all__ = [
    "ReallocError",
    "Segment",
    "Transfer",
    "ReallocPlan",
    "check_configs",
    "check_layouts",
    "layout_dims",
    "stage_layout",
    "make_realloc_plan",
    "clear_plan_cache",
]


class ReallocError(ValueError):
    """The two layouts or configs cannot be reallocated into each other."""


# ----------------------------------------------------------------------------
# Plan data
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """Packed run: ``src_intervals`` of the sender's buffer, in order, fill ``dst_intervals``.

    Both are sorted, non-overlapping int64 arrays [N, 2] of equal total length.
    """

    src_intervals: np.ndarray
    dst_intervals: np.ndarray
    numel: int


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Everything one sender gives one receiver (sender == receiver: a local copy)."""

    sender: int
    receiver: int
    src_stage: Tuple[int, int]  # (pp, tp) of the sender in the source layout
    dst_stage: Tuple[int, int]  # (pp, tp) of the receiver in the destination layout
    segments: Tuple[Segment, ...]
    numel: int

    @property
    def is_local(self) -> bool:
        return self.sender == self.receiver


@dataclasses.dataclass
class ReallocPlan:
    """All transfers from ``src_layout`` to ``dst_layout`` for ``config``.

    ``transfers`` is in a rank-independent order; ``dst_flat_size[rank]`` is
    the size of each destination rank's flat buffer (which the transfers
    cover exactly, tied slots counted once) and ``sender_load[rank]`` the
    elements each source rank sends to other ranks.
    """

    config: ReaLModelConfig
    src_layout: ModelParallelLayout
    dst_layout: ModelParallelLayout
    transfers: List[Transfer]
    dst_flat_size: Dict[int, int]
    src_flat_size: Dict[int, int]
    sender_load: Dict[int, int]

    def sends_of(self, rank: int) -> List[Transfer]:
        return [t for t in self.transfers if t.sender == rank and not t.is_local]

    def recvs_of(self, rank: int) -> List[Transfer]:
        return [t for t in self.transfers if t.receiver == rank and not t.is_local]

    def locals_of(self, rank: int) -> List[Transfer]:
        return [t for t in self.transfers if t.receiver == rank and t.is_local]

    def to_rank(self, rank: int) -> List[Transfer]:
        return [t for t in self.transfers if t.receiver == rank]

    @property
    def ranks(self) -> List[int]:
        return sorted(set(self.src_layout.global_ranks) | set(self.dst_layout.global_ranks))

    def total_numel(self, local: Optional[bool] = None) -> int:
        return sum(t.numel for t in self.transfers if local is None or t.is_local == local)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def layout_dims(layout: ModelParallelLayout) -> Tuple[int, int, int]:
    """(pp, dp, tp) sizes of a layout."""
    topo = layout.topology
    try:
        return topo.get_dim("pipe"), topo.get_dim("data"), topo.get_dim("model")
    except Exception as e:  # noqa: BLE001
        raise ReallocError(f"Layout {topo!r} is not a (pipe, data, model) topology.") from e


# Where the weights were loaded from, not what they are: a replica loaded from
# a checkpoint and an empty replica of the same model differ only here.
_PROVENANCE_FIELDS = frozenset({"base_model_path"})


def _config_diff(a: ReaLModelConfig, b: ReaLModelConfig) -> List[str]:
    return [
        f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
        for f in dataclasses.fields(a)
        if f.name not in _PROVENANCE_FIELDS and getattr(a, f.name) != getattr(b, f.name)
    ]


def check_configs(src_config: ReaLModelConfig, dst_config: ReaLModelConfig) -> None:
    """Source and destination must describe the same model (``is_critic`` included)."""
    if src_config is dst_config:
        return
    diff = _config_diff(src_config, dst_config)
    if diff:
        raise ReallocError(
            "Parameter reallocation needs identical model configs; they differ in " + "; ".join(diff) + "."
        )


def check_layouts(
    config: ReaLModelConfig,
    src_layout: ModelParallelLayout,
    dst_layout: ModelParallelLayout,
    world_size: Optional[int] = None,
) -> None:
    """Raise :class:`ReallocError` naming what prevents reallocating between the layouts."""
    (src_pp, _, src_tp), (dst_pp, _, dst_tp) = layout_dims(src_layout), layout_dims(dst_layout)
    if src_tp % dst_tp != 0 and dst_tp % src_tp != 0:
        raise ReallocError(
            f"Tensor-parallel sizes must divide each other: source tp={src_tp}, destination tp={dst_tp}."
        )
    for name, tp in (("source", src_tp), ("destination", dst_tp)):
        try:
            check_tp_supported(config, tp)
        except (ValueError, NotImplementedError) as e:
            raise ReallocError(f"The {name} layout's tp={tp} does not fit the model: {e}") from e
    for name, pp in (("source", src_pp), ("destination", dst_pp)):
        if not 1 <= pp <= config.n_layers + 2:
            raise ReallocError(f"The {name} layout's pp={pp} exceeds the model's {config.n_layers + 2} layers.")
    if world_size is not None:
        for name, layout in (("source", src_layout), ("destination", dst_layout)):
            bad = [r for r in layout.global_ranks if not 0 <= r < world_size]
            if bad:
                raise ReallocError(
                    f"The {name} layout uses global ranks {bad} outside the world of size {world_size}; "
                    "both layouts must live in the same world."
                )


# ----------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------


def stage_layout(config: ReaLModelConfig, pp_size: int, pp_rank: int, tp_size: int) -> Tuple[Dict[str, ParamSlot], int]:
    """(param_spec, flat size) of one (pp stage, tp shard), as ``ReaLModel`` lays it out."""
    layers = partition_layers(config, pp_size)[pp_rank]
    return build_param_spec(shard_config(config, tp_size), layers)


def _split_dim(kind: str) -> Optional[int]:
    """The dimension a tp layout may split (K/V rows are split unless their heads are replicated)."""
    if kind in (COL, KV):
        return 0
    if kind == ROW:
        return 1
    return None


def _held_range(extent: int, kind: str, replicated_kv: bool, tp: int, tp_size: int) -> Tuple[int, int]:
    """(first index, width) along the split dimension that tp rank ``tp`` holds.

    A rank whose K/V heads are replicated holds all of them, so it can serve
    any destination shard of K/V, and a destination that replicates them
    gathers every source shard.
    """
    if kind == KV and replicated_kv:
        return 0, extent
    width = extent // tp_size
    return tp * width, width


def _key_chunks(
    shape: Tuple[int, ...],
    dim: Optional[int],
    src_slot: ParamSlot,
    dst_slot: ParamSlot,
    src_range: Tuple[int, int],
    dst_range: Tuple[int, int],
) -> Optional[np.ndarray]:
    """Chunks [N, 3] (src offset, dst offset, length) of one key from one source tp rank, or None.

    ``src_range`` / ``dst_range``: (first index, width) held along ``dim``.
    """
    if dim is None:
        if dst_slot.numel != src_slot.numel:
            raise AssertionError(f"Replicated slot sizes differ: {src_slot} vs {dst_slot}.")
        return np.array([[src_slot.start, dst_slot.start, dst_slot.numel]], dtype=np.int64)
    (s_lo, s_w), (d_lo, d_w) = src_range, dst_range
    lo, hi = max(s_lo, d_lo), min(s_lo + s_w, d_lo + d_w)
    if lo >= hi:
        return None
    if dim == 0:
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        return np.array(
            [[src_slot.start + (lo - s_lo) * row, dst_slot.start + (lo - d_lo) * row, (hi - lo) * row]],
            dtype=np.int64,
        )
    n_rows = shape[0]
    if hi - lo == s_w == d_w:  # whole local shard on both sides: one chunk
        return np.array([[src_slot.start, dst_slot.start, n_rows * s_w]], dtype=np.int64)
    rows = np.arange(n_rows, dtype=np.int64)
    out = np.empty((n_rows, 3), dtype=np.int64)
    out[:, 0] = src_slot.start + rows * s_w + (lo - s_lo)
    out[:, 1] = dst_slot.start + rows * d_w + (lo - d_lo)
    out[:, 2] = hi - lo
    return out


def _segments(chunks: np.ndarray) -> Tuple[Tuple[Segment, ...], int]:
    """Sort chunks by source offset and cut them where destination order breaks."""
    chunks = chunks[np.argsort(chunks[:, 0], kind="stable")]
    d_start, d_end = chunks[:, 1], chunks[:, 1] + chunks[:, 2]
    breaks = np.nonzero(d_start[1:] < d_end[:-1])[0] + 1
    segments = []
    for part in np.split(chunks, breaks):
        src = np.stack([part[:, 0], part[:, 0] + part[:, 2]], axis=1)
        dst = np.stack([part[:, 1], part[:, 1] + part[:, 2]], axis=1)
        n = int(part[:, 2].sum())
        segments.append(Segment(merge_intervals(src), merge_intervals(dst), n))
    return tuple(segments), int(chunks[:, 2].sum())


def _stage_pieces(
    config: ReaLModelConfig,
    src_dims: Tuple[int, int, int],
    dst_dims: Tuple[int, int, int],
    dst_pp: int,
    dst_tp: int,
    src_specs: Dict[Tuple[int, int], Dict[str, ParamSlot]],
    layer_stage: Dict[int, int],
) -> Tuple[Dict[Tuple[int, int], np.ndarray], int]:
    """{(src pp, src tp): chunks} needed by destination stage (dst_pp, dst_tp), and its flat size."""
    src_pp_size, _, src_tp_size = src_dims
    dst_pp_size, _, dst_tp_size = dst_dims
    src_kv_rep = kv_heads_partition(config.n_kv_heads, src_tp_size)[1]
    dst_kv_rep = kv_heads_partition(config.n_kv_heads, dst_tp_size)[1]
    dst_spec, dst_size = stage_layout(config, dst_pp_size, dst_pp, dst_tp_size)
    full_shapes: Dict[str, Tuple[int, ...]] = {}
    pieces: Dict[Tuple[int, int], List[np.ndarray]] = {}
    seen = set()
    # Unique slots; a tied embedding/head pair is filled once, through "0.wte.weight".
    for key, slot in sorted(dst_spec.items(), key=lambda kv: (kv[1].start, not kv[0].startswith("0."))):
        if (slot.start, slot.end) in seen:
            continue
        seen.add((slot.start, slot.end))
        layer = int(key.split(".", 1)[0])
        if key not in full_shapes:
            full_shapes.update((k, tuple(s)) for k, s in layer_param_shapes(config, layer))
        src_pp = layer_stage[layer]
        kind = param_kind(key, config)
        dim = _split_dim(kind)
        # Where every source tp rank holds all of it, spread the readers over them.
        whole_on_each = dim is None or (kind == KV and src_kv_rep)
        src_tps = [dst_tp % src_tp_size] if whole_on_each else range(src_tp_size)
        src_range = dst_range = (0, 0)
        if dim is not None:
            extent = full_shapes[key][dim]
            dst_range = _held_range(extent, kind, dst_kv_rep, dst_tp, dst_tp_size)
        for src_tp in src_tps:
            src_slot = src_specs[(src_pp, src_tp)][key]
            if dim is not None:
                src_range = _held_range(extent, kind, src_kv_rep, src_tp, src_tp_size)
            c = _key_chunks(full_shapes[key], dim, src_slot, slot, src_range, dst_range)
            if c is not None:
                pieces.setdefault((src_pp, src_tp), []).append(c)
    return {k: np.concatenate(v) for k, v in pieces.items()}, dst_size


def _build_plan(
    config: ReaLModelConfig, src_layout: ModelParallelLayout, dst_layout: ModelParallelLayout
) -> ReallocPlan:
    src_dims, dst_dims = layout_dims(src_layout), layout_dims(dst_layout)
    src_pp_size, src_dp_size, src_tp_size = src_dims
    dst_pp_size, dst_dp_size, dst_tp_size = dst_dims
    src_specs: Dict[Tuple[int, int], Dict[str, ParamSlot]] = {}
    src_sizes: Dict[Tuple[int, int], int] = {}
    layer_stage: Dict[int, int] = {}
    for pp, layers in enumerate(partition_layers(config, src_pp_size)):
        layer_stage.update((l, pp) for l in layers)
        for tp in range(src_tp_size):
            src_specs[(pp, tp)], src_sizes[(pp, tp)] = stage_layout(config, src_pp_size, pp, src_tp_size)
    src_flat_size = {
        src_layout.global_rank_of(pipe=pp, data=dp, model=tp): src_sizes[(pp, tp)]
        for (pp, tp) in src_sizes
        for dp in range(src_dp_size)
    }

    # Pieces: (dst rank, src (pp, tp), chunks). The chunks depend only on the stages.
    pieces = []
    dst_flat_size: Dict[int, int] = {}
    for dst_pp in range(dst_pp_size):
        for dst_tp in range(dst_tp_size):
            by_src, size = _stage_pieces(config, src_dims, dst_dims, dst_pp, dst_tp, src_specs, layer_stage)
            for dp in range(dst_dp_size):
                rank = dst_layout.global_rank_of(pipe=dst_pp, data=dp, model=dst_tp)
                dst_flat_size[rank] = size
                for src_key in sorted(by_src):
                    pieces.append((rank, (dst_pp, dst_tp), src_key, by_src[src_key]))

    # Senders: the receiver itself if it holds the shard, else the least-loaded replica.
    def replicas(src_key):
        return [src_layout.global_rank_of(pipe=src_key[0], data=dp, model=src_key[1]) for dp in range(src_dp_size)]

    load = {r: 0 for r in src_layout.global_ranks}
    chosen: Dict[int, int] = {}
    remote = []
    for i, (rank, _, src_key, chunks) in enumerate(pieces):
        if rank in replicas(src_key):
            chosen[i] = rank
        else:
            remote.append((-int(chunks[:, 2].sum()), i))
    for neg_size, i in sorted(remote):
        rank, _, src_key, _ = pieces[i]
        sender = min(replicas(src_key), key=lambda r: (load[r], r))
        chosen[i] = sender
        load[sender] -= neg_size

    transfers = []
    for i, (rank, dst_stage, src_key, chunks) in enumerate(pieces):
        segments, n = _segments(chunks)
        transfers.append(Transfer(chosen[i], rank, src_key, dst_stage, segments, n))
    return ReallocPlan(config, src_layout, dst_layout, transfers, dst_flat_size, src_flat_size, load)


_plan_cache: Dict[Any, ReallocPlan] = {}


def _layout_key(layout: ModelParallelLayout):
    return (layout_dims(layout), tuple(layout.global_ranks))


def clear_plan_cache() -> None:
    _plan_cache.clear()


def make_realloc_plan(
    config: ReaLModelConfig,
    src_layout: ModelParallelLayout,
    dst_layout: ModelParallelLayout,
    dst_config: Optional[ReaLModelConfig] = None,
    world_size: Optional[int] = None,
) -> ReallocPlan:
    """The (cached) plan moving ``config``'s weights from ``src_layout`` to ``dst_layout``.

    ``dst_config``, if given, must equal ``config``; ``world_size``, if given,
    must contain every rank of both layouts.
    """
    if dst_config is not None:
        check_configs(config, dst_config)
    check_layouts(config, src_layout, dst_layout, world_size)
    key = (repr(config), _layout_key(src_layout), _layout_key(dst_layout))
    plan = _plan_cache.get(key)
    if plan is None:
        plan = _plan_cache[key] = _build_plan(config, src_layout, dst_layout)
    return plan
