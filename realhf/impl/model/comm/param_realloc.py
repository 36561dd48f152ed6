"""Parameter reallocation: move a model's weights between two 3D-parallel layouts.

A model's weights live, per (pipeline stage, tensor-parallel rank), in one
flat buffer (``ReaLModel.flat_param``; layout from ``flat_param.build_param_spec``).
Moving them from a source layout (e.g. the training mesh) to a destination
layout (e.g. a generation mesh) is therefore a set of copies of ``[start, end)``
intervals from source buffers into destination buffers. The work is split in
two phases:

**Plan** (:func:`make_realloc_plan`, pure Python, identical on every rank and
cached per (config, source layout, destination layout)). For each destination
(pp stage, tp rank) and each unique parameter slot of its buffer, the tensor
shard it needs is a sub-block of the full tensor: rows of a column-split
tensor (q/k/v, gate/up, embedding, LM head), columns of a row-split one (one
interval per row when the shard widths differ), or the whole tensor for
replicated ones (taken from source tp rank ``dst_tp % src_tp``, which spreads
the load). K/V projections are row-split unless the layout has fewer KV heads
than tp ranks; then each rank holds all of them, so a replicating source serves
any K/V sub-block from one rank and a replicating destination gathers every
source shard. Intersecting it with the sub-blocks held by the source tp ranks of
the source stage holding that layer gives chunks ``(src_offset, dst_offset,
length)``. Chunks are grouped per (source stage, source tp rank); for each
destination global rank (every dp replica of the target needs the whole
stage) one sender is chosen among the source dp replicas holding that shard:
the receiving rank itself if it is one (a local copy), otherwise the replica
with the fewest bytes assigned so far (largest pieces first). All chunks of a
(sender, receiver) pair form one :class:`Transfer`, stored as segments whose
source and destination intervals are both sorted and merged with the native
``merge_intervals`` (a segment boundary appears only where the two buffer
orders disagree, e.g. a tied head taken from the embedding's slot).

**Execute** (:func:`reallocate`, collective over the ranks of both layouts).
Each sender gathers, per receiver, its segments into one contiguous buffer
with ``slice_intervals``; all sends and receives are posted at once with
``dist.batch_isend_irecv`` (no ordering deadlocks, one message per pair);
local pieces are copied without communication; receivers scatter with
``set_intervals`` into the destination flat buffer (allocated if the target
model is not instantiated). With ``eta < 1`` the destination is mixed instead
(``dst = eta * received + (1 - eta) * dst``, the reference-model EMA). With
``free_source`` (a frozen source) the source buffer is released afterwards.
The same code runs on gloo (CPU) and NCCL (tensors live on the flat buffer's
device).

Constraints (checked with explicit errors): identical model configs
(``is_critic`` included), tensor-parallel sizes dividing each other, the same
KV-head replication in both layouts, layouts within one world.

The planning half lives in :mod:`realhf.impl.model.comm.realloc_plan`; its
public names are re-exported here.
"""


from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from realhf.api.core.model_api import ReaLModelConfig
from realhf.base.topology import ModelParallelLayout
from realhf.impl.model.comm.realloc_plan import (  # noqa: F401  (re-exported)
    ReallocError,
    ReallocPlan,
    Segment,
    Transfer,
    check_configs,
    check_layouts,
    clear_plan_cache,
    layout_dims,
    make_realloc_plan,
    stage_layout,
)
from realhf.impl.model.nn import linear_replay, offload
from realhf.impl.model.nn.real_llm_base import partition_layers
from realhf.impl.ops import set_intervals, slice_intervals

__all__ = [
    "ReallocError",
    "Segment",
    "Transfer",
    "ReallocPlan",
    "make_realloc_plan",
    "clear_plan_cache",
    "check_configs",
    "check_layouts",
    "layout_dims",
    "stage_layout",
    "reallocate",
    "release_params",
]


# ----------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------


def _single_range(intervals) -> Optional[Tuple[int, int]]:
    """(start, end) when ``intervals`` is one range, else None."""
    if len(intervals) != 1:
        return None
    return int(intervals[0][0]), int(intervals[0][1])


def _direct_src(flat: torch.Tensor, t: Transfer) -> Optional[torch.Tensor]:
    """A view of ``flat`` holding all of ``t`` when its source is one range (no gather copy)."""
    r = _single_range(t.segments[0].src_intervals) if len(t.segments) == 1 else None
    return None if r is None else flat[r[0]:r[1]]


def _direct_dst(flat: torch.Tensor, t: Transfer, eta: float) -> Optional[torch.Tensor]:
    """A view of ``flat`` to receive ``t`` into when its destination is one range (no scatter)."""
    if eta != 1.0 or len(t.segments) != 1:
        return None
    r = _single_range(t.segments[0].dst_intervals)
    return None if r is None else flat[r[0]:r[1]]


def _whole_local_copy(plan: ReallocPlan, rank: int, src_flat: torch.Tensor) -> bool:
    """Whether ``rank`` receives nothing from others and its one local piece is its whole
    source buffer, in the same order: its destination buffer would be an exact copy."""
    if plan.recvs_of(rank) or plan.dst_flat_size[rank] != src_flat.numel():
        return False
    local = plan.locals_of(rank)
    if len(local) != 1 or len(local[0].segments) != 1:
        return False
    seg = local[0].segments[0]
    n = src_flat.numel()
    return _single_range(seg.src_intervals) == (0, n) and _single_range(seg.dst_intervals) == (0, n)


def _gather(flat: torch.Tensor, t: Transfer) -> torch.Tensor:
    direct = _direct_src(flat, t)
    if direct is not None:
        return direct
    parts = [slice_intervals(flat, s.src_intervals, output_size=s.numel) for s in t.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scatter(buf: torch.Tensor, flat: torch.Tensor, t: Transfer, eta: float) -> None:
    off = 0
    for s in t.segments:
        part = buf[off : off + s.numel]
        off += s.numel
        if eta != 1.0:
            old = slice_intervals(flat, s.dst_intervals, output_size=s.numel)
            part = part * eta + old * (1.0 - eta)
        set_intervals(part, flat, s.dst_intervals)


def release_params(model: nn.Module) -> None:
    """Drop a ReaLModel's flat buffer: parameters become empty tensors, ``instantiated`` turns False."""
    if model.flat_param is None:
        return
    empty: Dict[int, nn.Parameter] = {}
    for key in model.param_spec:
        mod, attr = model._owner(key)
        p = mod._parameters[attr]
        if id(p) not in empty:
            empty[id(p)] = nn.Parameter(p.data.new_empty(0), requires_grad=p.requires_grad)
        mod._parameters[attr] = empty[id(p)]
    model.flat_param = None


def _check_model(model, config, layout, rank, role: str) -> Tuple[int, int]:
    pp, _, tp = layout_dims(layout)
    c = layout.coord(rank)
    check_configs(config, model.config)
    if (model.tp_size, model.tp_rank) != (tp, c.model):
        raise ReallocError(
            f"Rank {rank}: the {role} model has tp (size {model.tp_size}, rank {model.tp_rank}), "
            f"the {role} layout expects (size {tp}, rank {c.model})."
        )
    layers = partition_layers(config, pp)[c.pipe]
    if list(model.layer_indices) != list(layers):
        raise ReallocError(
            f"Rank {rank}: the {role} model holds layers {model.layer_indices}, "
            f"pipeline stage {c.pipe}/{pp} of the {role} layout holds {layers}."
        )
    return pp, tp


@torch.no_grad()
def reallocate(
    config: ReaLModelConfig,
    src_layout: ModelParallelLayout,
    dst_layout: ModelParallelLayout,
    src_model: Optional[nn.Module],
    dst_model: Optional[nn.Module],
    eta: float = 1.0,
    free_source: bool = False,
    group: Any = None,
    share: bool = False,
    links: Any = None,
) -> Dict[str, Any]:
    """Copy (or EMA-mix) the weights of ``src_model`` (source layout) into ``dst_model`` (destination layout).

    Collective over all ranks of both layouts (ranks in neither may skip the
    call). On each rank pass the ReaLModel of this rank's stage in each layout
    (None where the rank is not in it). The source must be instantiated; the
    destination is allocated if it is not, except for ``eta < 1`` (EMA,
    ``dst = eta * src + (1 - eta) * dst``), which needs its current weights.
    ``free_source`` releases the source buffer afterwards (frozen sources).
    ``group`` is the process group spanning the global ranks (default world);
    plan ranks are global ranks. With ``share``, a rank whose destination
    stage would be an exact copy of its source stage gets the source's buffer
    itself (no copy); pass it only when the destination is released before the
    source next changes (a call's replica handed back by its post-hook).
    ``links`` (a worker's ``realhf.impl.model.comm.local_links.LocalLinks``) carries the
    messages between ranks of one host instead of ``torch.distributed``.

    Returns ``{"bytes_sent", "bytes_received", "bytes_local", "bytes_shared", "n_sends",
    "n_recvs", "time_s"}`` for this rank.
    """
    t0 = time.perf_counter()
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")
    world = dist.get_world_size(group) if dist.is_initialized() else None
    me = dist.get_rank() if dist.is_initialized() else 0
    plan = make_realloc_plan(config, src_layout, dst_layout, world_size=world)
    in_src, in_dst = me in src_layout, me in dst_layout
    stats = dict(bytes_sent=0, bytes_received=0, bytes_local=0, bytes_shared=0, n_sends=0, n_recvs=0, time_s=0.0)
    if not (in_src or in_dst):
        return stats

    src_flat = dst_flat = None
    shared = False
    if in_src:
        if src_model is None or not src_model.instantiated:
            raise ReallocError(f"Rank {me} is in the source layout but has no instantiated source model.")
        _check_model(src_model, config, src_layout, me, "source")
        src_flat = src_model.flat_param
        if src_flat.numel() != plan.src_flat_size[me]:
            raise ReallocError(
                f"Rank {me}: source flat buffer has {src_flat.numel()} elements, the plan expects "
                f"{plan.src_flat_size[me]}."
            )
    if in_dst:
        if dst_model is None:
            raise ReallocError(f"Rank {me} is in the destination layout but got no destination model.")
        _check_model(dst_model, config, dst_layout, me, "destination")
        if dst_model.flat_size != plan.dst_flat_size[me]:
            raise ReallocError(
                f"Rank {me}: destination layout has {dst_model.flat_size} elements, the plan expects "
                f"{plan.dst_flat_size[me]}."
            )
        if not dst_model.instantiated:
            if eta != 1.0:
                raise ReallocError(f"Rank {me}: EMA reallocation (eta={eta}) needs an instantiated destination.")
            if share and src_flat is not None and _whole_local_copy(plan, me, src_flat):
                # The same stage on both sides: share the source's buffer instead of copying it.
                dst_model.bind_flat_param(src_flat)
                shared = True
                stats["bytes_shared"] = src_flat.numel() * src_flat.element_size()
            else:
                dst_model.instantiate(init=False)
        dst_flat = dst_model.flat_param
        if src_flat is not None and src_flat.dtype != dst_flat.dtype:
            raise ReallocError(f"Source dtype {src_flat.dtype} differs from destination dtype {dst_flat.dtype}.")

    sends = plan.sends_of(me) if in_src else []
    recvs = plan.recvs_of(me) if in_dst else []
    flats = [f for f in (src_flat, dst_flat) if f is not None]
    by_links = (links is not None and group is None and all(f.device.type == "cpu" for f in flats)
                and links.reaches([t.receiver for t in sends] + [t.sender for t in recvs]))
    send_bufs = [_gather(src_flat, t) for t in sends]
    stats["bytes_sent"] = sum(b.numel() * b.element_size() for b in send_bufs)
    recv_into, recv_bufs = [], []
    for t in recvs:
        in_place = _direct_dst(dst_flat, t, eta)
        buf = in_place if in_place is not None else torch.empty(t.numel, dtype=dst_flat.dtype, device=dst_flat.device)
        recv_into.append(buf)
        recv_bufs.append(None if in_place is not None else buf)  # None: nothing to scatter
        stats["bytes_received"] += buf.numel() * buf.element_size()
    stats["n_sends"], stats["n_recvs"] = len(sends), len(recvs)
    works = []
    if not by_links:
        ops = [dist.P2POp(dist.isend, buf, t.receiver, group) for t, buf in zip(sends, send_bufs)]
        ops += [dist.P2POp(dist.irecv, buf, t.sender, group) for t, buf in zip(recvs, recv_into)]
        works = dist.batch_isend_irecv(ops) if ops else []

    # Local copies overlap with communication (on torch.distributed).
    for t in plan.locals_of(me) if in_dst and not shared else []:
        direct = _direct_dst(dst_flat, t, eta)
        if direct is not None:
            direct.copy_(_gather(src_flat, t))
        else:
            _scatter(_gather(src_flat, t), dst_flat, t, eta)
        stats["bytes_local"] += t.numel * dst_flat.element_size()
    if by_links and (sends or recvs):
        links.exchange([(b, t.receiver) for t, b in zip(sends, send_bufs)],
                       [(t.sender, b) for t, b in zip(recvs, recv_into)])
    for w in works:
        w.wait()
    for t, buf in zip(recvs, recv_bufs):
        if buf is not None:
            _scatter(buf, dst_flat, t, eta)
    if in_dst:
        # set_intervals may write without bumping the tensor version; an
        # offload store of the destination is stale now, and so is a rollout capture.
        offload.invalidate(dst_model)
        linear_replay.weights_updated(dst_model)
    if free_source and in_src:
        if dst_flat is not None and dst_flat.device.type == "cuda":
            torch.cuda.current_stream(dst_flat.device).synchronize()
        release_params(src_model)
    stats["time_s"] = time.perf_counter() - t0
    return stats
