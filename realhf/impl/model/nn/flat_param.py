"""Layout of a pipeline stage's parameters in one contiguous flat buffer.

Every parameter of a stage is a view ``flat[start:end].view(shape)``. Moving a
model between parallel layouts is then a matter of copying [start, end)
intervals between buffers, and an optimizer/DDP can treat the buffer as one
tensor.

Order: keys of the stage's layers in *reverse* registration order (the order
in which gradients become ready in backward, as Megatron buckets them). The
buffer is split into buckets of ``bucket_size`` elements whose ends are padded
to a multiple of ``pad_multiple`` (the data-parallel size) so that a bucket can
be reduce-scattered evenly. With tied embeddings on one stage, the head key
shares the embedding's slot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.nn.real_llm_base import head_key, is_tied_on_stage, layer_param_shapes

DEFAULT_BUCKET_SIZE = 40_000_000


@dataclasses.dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the flat buffer."""

    start: int
    end: int
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.end - self.start


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def stage_param_shapes(config: ReaLModelConfig, layer_indices: Sequence[int]) -> List[Tuple[str, torch.Size]]:
    shapes: List[Tuple[str, torch.Size]] = []
    for i in sorted(layer_indices):
        shapes.extend(layer_param_shapes(config, i))
    return shapes


def build_param_spec(
    config: ReaLModelConfig,
    layer_indices: Sequence[int],
    bucket_size: int = DEFAULT_BUCKET_SIZE,
    pad_multiple: int = 1,
) -> Tuple[Dict[str, ParamSlot], int]:
    """Return ({key: ParamSlot}, total buffer size) for a stage.

    The result is a pure function of (config, layer_indices, bucket_size,
    pad_multiple), so any process can compute any stage's layout.
    """
    shapes = stage_param_shapes(config, layer_indices)
    tied = is_tied_on_stage(config, layer_indices)
    hk = head_key(config)
    spec: Dict[str, ParamSlot] = {}
    offset = bucket_start = 0
    for key, shape in reversed(shapes):
        if tied and key == hk:
            continue
        n = math.prod(shape)
        spec[key] = ParamSlot(offset, offset + n, tuple(shape))
        offset += n
        if offset - bucket_start >= bucket_size:
            offset = bucket_start = _round_up(offset, pad_multiple)
    total = _round_up(offset, pad_multiple)
    if tied:
        spec[hk] = spec["0.wte.weight"]
    return spec, total


def param_view(flat: torch.Tensor, slot: ParamSlot) -> torch.Tensor:
    return flat[slot.start : slot.end].view(slot.shape)


def param_intervals(spec: Dict[str, ParamSlot], keys: Iterable[str]) -> List[Tuple[int, int]]:
    """Sorted, merged [start, end) intervals covering ``keys``."""
    iv = sorted({(spec[k].start, spec[k].end) for k in keys})
    merged: List[Tuple[int, int]] = []
    for s, e in iv:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def get_intervals(flat: torch.Tensor, intervals: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Concatenate the given intervals of the buffer (e.g. into a send buffer)."""
    if not intervals:
        return flat.new_empty(0)
    return torch.cat([flat[s:e] for s, e in intervals])


def set_intervals(flat: torch.Tensor, intervals: Sequence[Tuple[int, int]], src: torch.Tensor) -> None:
    """Inverse of :func:`get_intervals`: scatter ``src`` into the intervals."""
    off = 0
    for s, e in intervals:
        flat[s:e].copy_(src[off : off + e - s])
        off += e - s
    if off != src.numel():
        raise ValueError(f"Source has {src.numel()} elements, intervals cover {off}.")
