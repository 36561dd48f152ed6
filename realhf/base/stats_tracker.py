"""Collection and cross-rank reduction of training statistics.

Interfaces record scalars or per-token tensors during a step; the worker
exports them once, reduced locally and optionally across a process group.
Means are reduced as (sum, count) pairs, so a rank that saw more tokens
weighs more, which is what a global per-token mean requires::

    tracker.denominator(n_tokens=loss_mask)
    tracker.stat(denominator="n_tokens", importance_weight=w)
    with tracker.scope("ppo"):
        tracker.scalar(kl=kl)
    stats = tracker.export(group=dp_group)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist


class ReduceType(enum.Enum):
    MEAN = "mean"
    SUM = "sum"
    MIN = "min"
    MAX = "max"


def _init_value(reduce: ReduceType) -> float:
    return {ReduceType.MIN: math.inf, ReduceType.MAX: -math.inf}.get(reduce, 0.0)


# How a batch of values folds into an accumulator, per reduce type.
_FOLD = {
    ReduceType.MEAN: lambda acc, arr: acc + float(arr.sum()),
    ReduceType.SUM: lambda acc, arr: acc + float(arr.sum()),
    ReduceType.MIN: lambda acc, arr: min(acc, float(arr.min())),
    ReduceType.MAX: lambda acc, arr: max(acc, float(arr.max())),
}


@dataclasses.dataclass
class _Accumulator:
    reduce: ReduceType
    value: float
    count: float = 0.0

    def fold(self, arr: np.ndarray) -> None:
        if arr.size:
            self.value = _FOLD[self.reduce](self.value, arr)
            self.count += arr.size

    def result(self) -> Optional[float]:
        """Local result; None when nothing was recorded and no value exists."""
        if self.reduce == ReduceType.SUM:
            return self.value
        if self.count == 0:
            return None
        if self.reduce == ReduceType.MEAN:
            return self.value / self.count
        return self.value


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(value, dtype=np.float64).reshape(-1)


class StatsTracker:
    """Named statistics accumulated until :meth:`export`."""

    def __init__(self):
        self._stats: Dict[str, _Accumulator] = {}
        self._denominators: Dict[str, np.ndarray] = {}
        self._scope: List[str] = []

    # -- naming ---------------------------------------------------------- #
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix keys recorded inside the block with ``name/``; nestable."""
        self._scope.append(name.strip("/"))
        try:
            yield
        finally:
            self._scope.pop()

    def _key(self, name: str) -> str:
        return "/".join(self._scope + [name])

    # -- recording ------------------------------------------------------- #
    def record(self, name: str, value: Any, reduce: ReduceType = ReduceType.MEAN) -> None:
        """Fold a float, or every element of a tensor/array, into ``name``."""
        self._fold(self._key(name), _to_numpy(value), ReduceType(reduce))

    def scalar(self, **kwargs: Any) -> None:
        """Record each keyword as a mean-reduced statistic."""
        for name, value in kwargs.items():
            self.record(name, value, ReduceType.MEAN)

    def denominator(self, **masks: Any) -> None:
        """Register boolean masks that later :meth:`stat` calls average over.

        Each mask's element count is also recorded as a summed statistic.
        """
        for name, mask in masks.items():
            arr = _to_numpy(mask).astype(bool)
            key = self._key(name)
            self._denominators[key] = arr
            self._fold(key, arr.astype(np.float64), ReduceType.SUM)

    def stat(
        self,
        denominator: str,
        reduce: ReduceType = ReduceType.MEAN,
        **values: Any,
    ) -> None:
        """Record the elements of each value selected by mask ``denominator``."""
        mask = self._lookup_denominator(denominator)
        for name, value in values.items():
            arr = _to_numpy(value)
            if arr.shape != mask.shape:
                raise ValueError(
                    f"Statistic {name!r} has {arr.size} elements but denominator "
                    f"{denominator!r} has {mask.size}."
                )
            self._fold(self._key(name), arr[mask], ReduceType(reduce))

    def _lookup_denominator(self, name: str) -> np.ndarray:
        for key in (self._key(name), name):
            if key in self._denominators:
                return self._denominators[key]
        raise KeyError(
            f"Unknown denominator {name!r}; registered: {sorted(self._denominators)}."
        )

    def _fold(self, key: str, arr: np.ndarray, reduce: ReduceType) -> None:
        acc = self._stats.get(key)
        if acc is None:
            acc = self._stats[key] = _Accumulator(reduce, _init_value(reduce))
        elif acc.reduce != reduce:
            raise ValueError(
                f"Statistic {key!r} was recorded with {acc.reduce.name}, now {reduce.name}."
            )
        acc.fold(arr)

    # -- export ---------------------------------------------------------- #
    def reset(self) -> None:
        self._stats.clear()
        self._denominators.clear()

    def export(
        self, reset: bool = True, group: Optional[dist.ProcessGroup] = None
    ) -> Dict[str, float]:
        """Reduced statistics by key.

        With ``group`` every member must call export; results then cover
        the statistics of all members and are identical on each of them.
        Keys without any recorded element (other than sums) are omitted.
        """
        if group is None:
            out = {k: a.result() for k, a in sorted(self._stats.items())}
        else:
            out = self._export_distributed(group)
        if reset:
            self.reset()
        return {k: v for k, v in out.items() if v is not None}

    def _export_distributed(
        self, group: dist.ProcessGroup
    ) -> Dict[str, Optional[float]]:
        kinds = self._agree_on_keys(group)
        keys = sorted(kinds)
        local = {
            k: self._stats.get(k) or _Accumulator(kinds[k], _init_value(kinds[k]))
            for k in keys
        }
        counts = torch.tensor([local[k].count for k in keys], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        merged = {
            k: _Accumulator(local[k].reduce, local[k].value, c)
            for k, c in zip(keys, counts.tolist())
        }
        # One collective per reduction operator, in a fixed order on all ranks.
        for op_name in ("SUM", "MIN", "MAX"):
            op_keys = [k for k in keys if _COLLECTIVE_OP[kinds[k]] == op_name]
            if not op_keys:
                continue
            values = torch.tensor([local[k].value for k in op_keys], dtype=torch.float64)
            dist.all_reduce(values, op=getattr(dist.ReduceOp, op_name), group=group)
            for k, v in zip(op_keys, values.tolist()):
                merged[k].value = v
        return {k: merged[k].result() for k in keys}

    def _agree_on_keys(self, group: dist.ProcessGroup) -> Dict[str, ReduceType]:
        """Union of keys over the group; ranks may have recorded different ones."""
        local = {k: a.reduce.value for k, a in self._stats.items()}
        gathered: List[Optional[Dict[str, str]]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        kinds: Dict[str, str] = {}
        for table in gathered:
            for key, kind in table.items():
                if kinds.setdefault(key, kind) != kind:
                    raise ValueError(
                        f"Statistic {key!r} is reduced with {kinds[key]} on one "
                        f"rank and {kind} on another."
                    )
        return {k: ReduceType(v) for k, v in kinds.items()}


# Collective operator that merges per-rank accumulator values.
_COLLECTIVE_OP = {
    ReduceType.MEAN: "SUM",
    ReduceType.SUM: "SUM",
    ReduceType.MIN: "MIN",
    ReduceType.MAX: "MAX",
}


DEFAULT_TRACKER = StatsTracker()


def scope(name: str):
    return DEFAULT_TRACKER.scope(name)


def record(name: str, value: Any, reduce: ReduceType = ReduceType.MEAN) -> None:
    DEFAULT_TRACKER.record(name, value, reduce)


def scalar(**kwargs: Any) -> None:
    DEFAULT_TRACKER.scalar(**kwargs)


def denominator(**masks: Any) -> None:
    DEFAULT_TRACKER.denominator(**masks)


def stat(denominator: str, reduce: ReduceType = ReduceType.MEAN, **values: Any) -> None:
    DEFAULT_TRACKER.stat(denominator, reduce, **values)


def export(reset: bool = True, group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
    return DEFAULT_TRACKER.export(reset=reset, group=group)


def reset() -> None:
    DEFAULT_TRACKER.reset()
