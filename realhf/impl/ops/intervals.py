"""Interval operators over flat buffers: merge, slice (gather), set (scatter).

Parameter reallocation describes the part of a flat parameter buffer that
moves between two 3D-parallel layouts as a list of half-open ``[start, end)``
intervals.  ``slice_intervals`` packs those ranges into one contiguous tensor
for communication and ``set_intervals`` unpacks a received tensor into place.

Intervals must be sorted by start, non-overlapping and have ``start <= end``;
every backend rejects anything else with a ValueError naming the index and
values of the first offending interval.  This module holds the validation,
the torch fallbacks, thin wrappers around the native kernels and their
registration with :mod:`realhf.impl.ops.dispatch`.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from realhf.impl.ops import dispatch, native

IntervalsLike = Union[Sequence[Tuple[int, int]], np.ndarray, torch.Tensor]

# Torch fallback: with at least this many elements per interval on average,
# one view per interval beats building an index (per-view overhead is a few
# microseconds; the index path costs a few ns per element).  Measured on a
# 64M-element fp32 buffer with 1e2..1e5 intervals.
_VIEWS_MIN_MEAN_LENGTH = 2048
# The index path builds indices for at most this many elements at a time so
# its temporaries stay small.
_INDEX_CHUNK = 1 << 20

# GPU copy plans: bytes copied by one CUDA block / elements per Triton program.
_CUDA_CHUNK_BYTES = 16384
_TRITON_CHUNK = 1024


# ----------------------------------------------------------------------------
# Normalization and validation
# ----------------------------------------------------------------------------


def _describe(i: int, iv: np.ndarray) -> str:
    return f"interval {i} ({int(iv[i, 0])}, {int(iv[i, 1])})"


def _raise_invalid(iv: np.ndarray, i: int, bound: Optional[int]) -> None:
    """Raise the ValueError for interval ``i`` (same wording as the C++ check)."""
    s, e = int(iv[i, 0]), int(iv[i, 1])
    if e < s:
        raise ValueError(f"{_describe(i, iv)} has end < start")
    if i > 0 and s < int(iv[i - 1, 1]):
        raise ValueError(
            f"{_describe(i, iv)} overlaps or precedes {_describe(i - 1, iv)}; "
            "intervals must be sorted by start and non-overlapping")
    raise ValueError(f"{_describe(i, iv)} is out of bounds [0, {bound}]")


def check_intervals(iv: np.ndarray, bound: Optional[int] = None) -> int:
    """Validate int64 intervals [N, 2]; return their total length.

    ``bound`` (the buffer size) additionally requires ``0 <= start`` and
    ``end <= bound``.
    """
    if len(iv) == 0:
        return 0
    starts, ends = iv[:, 0], iv[:, 1]
    bad = ends < starts
    bad[1:] |= starts[1:] < ends[:-1]
    if bound is not None:
        bad |= (starts < 0) | (ends > bound)
    if bad.any():
        _raise_invalid(iv, int(np.argmax(bad)), bound)
    return int((ends - starts).sum())


def as_interval_array(intervals: IntervalsLike) -> np.ndarray:
    """Intervals as a C-contiguous int64 numpy array of shape [N, 2]."""
    if isinstance(intervals, torch.Tensor):
        if intervals.is_floating_point() or intervals.is_complex() or \
                intervals.dtype == torch.bool:
            raise TypeError(f"intervals must be integers, got {intervals.dtype}")
        arr = intervals.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(intervals)
        if arr.size == 0:
            return np.empty((0, 2), dtype=np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"intervals must be integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"intervals must have shape [N, 2], got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_output_size(output_size: Optional[int], total: int) -> None:
    if output_size is not None and output_size != total:
        raise ValueError(f"output_size {output_size} does not match the total "
                         f"interval length {total}")


def _check_packed_size(src: torch.Tensor, total: int) -> None:
    if src.numel() != total:
        raise ValueError(f"src has {src.numel()} elements but the intervals "
                         f"cover {total}")


def _check_flat(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------
# merge_intervals
# ----------------------------------------------------------------------------


def _merge_list(intervals: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Plain loop: for Python lists it beats converting to an array."""
    out: List[Tuple[int, int]] = []
    prev: Optional[Tuple[int, int]] = None
    for i, pair in enumerate(intervals):
        try:
            s, e = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"interval {i} must be a (start, end) pair, got {pair!r}") from None
        s, e = operator.index(s), operator.index(e)
        if e < s:
            raise ValueError(f"interval {i} ({s}, {e}) has end < start")
        if prev is not None and s < prev[1]:
            raise ValueError(
                f"interval {i} ({s}, {e}) overlaps or precedes interval {i - 1} "
                f"({prev[0]}, {prev[1]}); intervals must be sorted by start and "
                "non-overlapping")
        prev = (s, e)
        if s == e:
            continue
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _merge_array(iv: np.ndarray) -> np.ndarray:
    """Vectorized merge of validated int64 intervals [N, 2]."""
    check_intervals(iv)
    iv = iv[iv[:, 1] > iv[:, 0]]
    if len(iv) == 0:
        return np.empty((0, 2), dtype=np.int64)
    opens = np.ones(len(iv), dtype=bool)
    opens[1:] = iv[1:, 0] != iv[:-1, 1]
    closes = np.ones(len(iv), dtype=bool)
    closes[:-1] = opens[1:]
    return np.stack([iv[opens, 0], iv[closes, 1]], axis=1)


def _like(merged: np.ndarray, like: IntervalsLike) -> IntervalsLike:
    """Return ``merged`` in the container type (and dtype/device) of ``like``."""
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(merged).to(device=like.device, dtype=like.dtype)
    if isinstance(like, np.ndarray):
        return merged.astype(like.dtype, copy=False)
    return [(int(s), int(e)) for s, e in merged.tolist()]


def _merge_python(intervals: IntervalsLike) -> IntervalsLike:
    if isinstance(intervals, (torch.Tensor, np.ndarray)):
        return _like(_merge_array(as_interval_array(intervals)), intervals)
    return _merge_list(intervals)


def _merge_cpp(intervals: IntervalsLike) -> IntervalsLike:
    if not isinstance(intervals, (torch.Tensor, np.ndarray)):
        return native.load("interval_op").merge_interval_pairs(intervals)
    iv = torch.from_numpy(as_interval_array(intervals))
    merged = native.load("interval_op").merge_intervals(iv)
    return _like(merged.numpy(), intervals)


# ----------------------------------------------------------------------------
# Torch fallback for slice / set
# ----------------------------------------------------------------------------


def _index_chunks(iv: np.ndarray, total: int, device: torch.device):
    """Yield (begin, end, index): flat positions of packed elements [begin, end).

    Packed element p of interval k sits at flat position p + starts[k] -
    offsets[k]; indices are built chunk by chunk to bound memory.
    """
    starts = torch.from_numpy(iv[:, 0]).to(device)
    lengths = torch.from_numpy(iv[:, 1] - iv[:, 0]).to(device)
    ends = torch.cumsum(lengths, 0)
    offsets = ends - lengths
    shift = starts - offsets
    ramp = torch.arange(min(total, _INDEX_CHUNK), device=device)
    bounds = list(range(0, total, _INDEX_CHUNK)) + [total]
    edges = torch.tensor(bounds, device=device)
    # First and last interval touching each chunk (empty intervals never
    # contain an element, so searching the ends skips them).
    firsts = torch.searchsorted(ends, edges[:-1], right=True).tolist()
    lasts = torch.searchsorted(ends, edges[1:] - 1, right=True).tolist()
    for begin, end, i0, i1 in zip(bounds[:-1], bounds[1:], firsts, lasts):
        seg = (torch.clamp(ends[i0:i1 + 1], max=end) -
               torch.clamp(offsets[i0:i1 + 1], min=begin)).clamp_(min=0)
        index = torch.repeat_interleave(shift[i0:i1 + 1], seg, output_size=end - begin)
        index += ramp[:end - begin]
        index += begin
        yield begin, end, index


def _use_views(n: int, total: int) -> bool:
    return n <= 16 or total >= _VIEWS_MIN_MEAN_LENGTH * n


def _slice_python(src: torch.Tensor, iv: np.ndarray,
                  output_size: Optional[int]) -> torch.Tensor:
    total = check_intervals(iv, src.numel())
    _check_output_size(output_size, total)
    if total == 0:
        return src.new_empty(0)
    if _use_views(len(iv), total):
        return torch.cat([src[s:e] for s, e in iv.tolist() if e > s])
    out = src.new_empty(total)
    for begin, end, index in _index_chunks(iv, total, src.device):
        torch.index_select(src, 0, index, out=out[begin:end])
    return out


def _set_python(src: torch.Tensor, dst: torch.Tensor, iv: np.ndarray) -> None:
    total = check_intervals(iv, dst.numel())
    _check_packed_size(src, total)
    if total == 0:
        return
    if _use_views(len(iv), total):
        pos = 0
        for s, e in iv.tolist():
            dst[s:e].copy_(src[pos:pos + e - s])
            pos += e - s
        return
    for begin, end, index in _index_chunks(iv, total, dst.device):
        dst.index_copy_(0, index, src[begin:end])


# ----------------------------------------------------------------------------
# C++ (CPU)
# ----------------------------------------------------------------------------


def _slice_cpp(src: torch.Tensor, iv: np.ndarray,
               output_size: Optional[int]) -> torch.Tensor:
    # The extension validates the intervals in the same pass that sizes the
    # output, with the same messages as check_intervals.
    return native.load("interval_op").slice_intervals(
        src.contiguous(), torch.from_numpy(iv),
        -1 if output_size is None else output_size)


def _set_cpp(src: torch.Tensor, dst: torch.Tensor, iv: np.ndarray) -> None:
    ext = native.load("interval_op")
    if dst.is_contiguous():
        ext.set_intervals(src.contiguous(), dst, torch.from_numpy(iv))
        return
    staged = dst.contiguous()
    ext.set_intervals(src.contiguous(), staged, torch.from_numpy(iv))
    dst.copy_(staged)


# ----------------------------------------------------------------------------
# GPU backends (CUDA extension, Triton): host-built copy plan
# ----------------------------------------------------------------------------


def widest_unit(iv: np.ndarray, elem_size: int, pointers: Sequence[int],
                max_bytes: int = 16) -> int:
    """Largest power of two <= max_bytes dividing every byte offset and pointer."""
    acc = max_bytes
    for p in pointers:
        acc |= int(p)
    if len(iv):
        acc |= int(np.bitwise_or.reduce((iv * elem_size).ravel()))
    return acc & -acc


def copy_plan(iv: np.ndarray, elem_size: int, unit_bytes: int,
              chunk_units: int) -> Tuple[np.ndarray, int]:
    """Plan array ``[starts | offsets | chunk_offsets]`` in units of unit_bytes.

    Layout is documented in csrc/interval_op/interval_op_kernels.h.  Returns
    the plan (3 * N + 2 int64) and the number of chunks.
    """
    if unit_bytes % elem_size:
        raise ValueError(f"unit of {unit_bytes} bytes is not a multiple of the "
                         f"{elem_size}-byte element")
    scale = unit_bytes // elem_size
    starts, ends = iv[:, 0] // scale, iv[:, 1] // scale
    lengths = ends - starts
    n = len(iv)
    plan = np.zeros(3 * n + 2, dtype=np.int64)
    plan[:n] = starts
    np.cumsum(lengths, out=plan[n + 1:2 * n + 1])
    np.cumsum((lengths + chunk_units - 1) // chunk_units, out=plan[2 * n + 2:])
    return plan, int(plan[-1])


def _cuda_copy(src: torch.Tensor, dst: Optional[torch.Tensor], iv: np.ndarray,
               output_size: Optional[int]) -> Optional[torch.Tensor]:
    ext = native.load("interval_op_cuda")
    src = src.contiguous()
    gather = dst is None
    if gather:
        total = check_intervals(iv, src.numel())
        _check_output_size(output_size, total)
        pointers = [src.data_ptr()]
    else:
        total = check_intervals(iv, dst.numel())
        _check_packed_size(src, total)
        pointers = [src.data_ptr(), dst.data_ptr()]
    if total == 0:
        return src.new_empty(0) if gather else None
    esize = src.element_size()
    unit = widest_unit(iv, esize, pointers)
    chunk_units = max(1, _CUDA_CHUNK_BYTES // unit)
    plan_np, n_chunks = copy_plan(iv, esize, unit, chunk_units)
    plan = torch.from_numpy(plan_np).to(src.device)
    if gather:
        return ext.slice_intervals(src, plan, len(iv), n_chunks, chunk_units, unit, total)
    ext.set_intervals(src, dst, plan, len(iv), n_chunks, chunk_units, unit)
    return None


def _slice_cuda(src: torch.Tensor, iv: np.ndarray,
                output_size: Optional[int]) -> torch.Tensor:
    return _cuda_copy(src, None, iv, output_size)


def _set_cuda(src: torch.Tensor, dst: torch.Tensor, iv: np.ndarray) -> None:
    if dst.is_contiguous():
        _cuda_copy(src, dst, iv, None)
        return
    staged = dst.contiguous()
    _cuda_copy(src, staged, iv, None)
    dst.copy_(staged)


def _slice_triton(src: torch.Tensor, iv: np.ndarray,
                  output_size: Optional[int]) -> torch.Tensor:
    from realhf.impl.ops import triton_kernels

    total = check_intervals(iv, src.numel())
    _check_output_size(output_size, total)
    out = src.new_empty(total)
    if total:
        plan, n_chunks = copy_plan(iv, 1, 1, _TRITON_CHUNK)
        triton_kernels.interval_copy(src.contiguous(), out, plan, len(iv),
                                     n_chunks, _TRITON_CHUNK, gather=True)
    return out


def _set_triton(src: torch.Tensor, dst: torch.Tensor, iv: np.ndarray) -> None:
    from realhf.impl.ops import triton_kernels

    total = check_intervals(iv, dst.numel())
    _check_packed_size(src, total)
    if total == 0:
        return
    plan, n_chunks = copy_plan(iv, 1, 1, _TRITON_CHUNK)
    target = dst if dst.is_contiguous() else dst.contiguous()
    triton_kernels.interval_copy(target, src.contiguous(), plan, len(iv),
                                 n_chunks, _TRITON_CHUNK, gather=False)
    if target is not dst:
        dst.copy_(target)


# ----------------------------------------------------------------------------
# Registration and public entry points
# ----------------------------------------------------------------------------

_CPU = dispatch.on_device_types("cpu")
_CUDA = dispatch.on_device_types("cuda")

dispatch.register("merge_intervals", "python", _merge_python)
# For Python lists of pairs the plain loop wins below 16 pairs (measured:
# 1.3 vs 1.6 us for 1 pair, 3.4 vs 2.5 us for 16, 15 vs 8.6 ms for 1e5); for
# arrays and tensors the extension wins at every size (3.7 vs 12 us for 1).
_MERGE_LIST_CROSSOVER = 16
dispatch.register("merge_intervals", "cpp", _merge_cpp, serves=_CPU,
                  probe=native.cpu_probe("interval_op"),
                  min_size=_MERGE_LIST_CROSSOVER)
for _op, _py, _cpp, _cu, _tr in (
        ("slice_intervals", _slice_python, _slice_cpp, _slice_cuda, _slice_triton),
        ("set_intervals", _set_python, _set_cpp, _set_cuda, _set_triton)):
    dispatch.register(_op, "python", _py)
    dispatch.register(_op, "cpp", _cpp, serves=_CPU,
                      probe=native.cpu_probe("interval_op"))
    dispatch.register(_op, "cuda", _cu, serves=_CUDA,
                      probe=native.cuda_probe("interval_op_cuda"))
    dispatch.register(_op, "triton", _tr, serves=native.triton_serves,
                      probe=native.triton_probe)


def _interval_device(intervals: IntervalsLike) -> torch.device:
    if isinstance(intervals, torch.Tensor):
        return intervals.device
    return torch.device("cpu")


def merge_intervals(intervals: IntervalsLike,
                    backend: Optional[str] = None) -> IntervalsLike:
    """Merge adjacent half-open intervals (``[a, b), [b, c) -> [a, c)``).

    Input must be sorted by start and non-overlapping; empty intervals are
    dropped.  The result has the input's container type: a list of tuples, a
    numpy array or a tensor (same dtype and device).
    """
    if isinstance(intervals, (torch.Tensor, np.ndarray)):
        size = _MERGE_LIST_CROSSOVER  # arrays: the extension always wins
    else:
        size = len(intervals)
    impl = dispatch.select("merge_intervals", _interval_device(intervals),
                           backend, size)
    return impl.fn(intervals)


def slice_intervals(src: torch.Tensor, intervals: IntervalsLike,
                    output_size: Optional[int] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Gather ``src[start:end]`` for every interval, in order, into one 1-D tensor.

    ``output_size``, if given, must equal the total interval length.
    """
    _check_flat(src, "src")
    if output_size is not None and output_size < 0:
        raise ValueError(f"output_size must be non-negative, got {output_size}")
    iv = as_interval_array(intervals)
    impl = dispatch.select("slice_intervals", src.device, backend, len(iv))
    return impl.fn(src, iv, output_size)


def set_intervals(src: torch.Tensor, dst: torch.Tensor, intervals: IntervalsLike,
                  backend: Optional[str] = None) -> None:
    """Scatter the packed 1-D ``src`` into the intervals of ``dst``, in place."""
    _check_flat(src, "src")
    _check_flat(dst, "dst")
    if src.dtype != dst.dtype:
        raise TypeError(f"src and dst dtypes differ: {src.dtype} vs {dst.dtype}")
    if src.device != dst.device:
        raise ValueError(f"src and dst devices differ: {src.device} vs {dst.device}")
    iv = as_interval_array(intervals)
    impl = dispatch.select("set_intervals", dst.device, backend, len(iv))
    impl.fn(src, dst, iv)
