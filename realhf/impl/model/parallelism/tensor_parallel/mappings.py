"""Autograd-aware collectives between tensor-parallel ranks.

Each mapping is a pair of collectives that are adjoint to each other: the
backward of "identity forward" is an all-reduce (every rank consumed the same
input, so gradients from all ranks must be summed), and so on. Tensor
parallel splits the *last* (hidden) dimension; sequence parallel splits the
*first* dimension, which for realhf's packed batches is the token dimension.

Every function takes an optional ``group``; by default the active model's
tensor-parallel group from :mod:`realhf.base.constants` is used. With a
group of size one every mapping is the identity.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from realhf.base import constants


def resolve_group(group: Any = None) -> Any:
    """The group to communicate in; ``None`` afterwards means a single rank.

    Outside any model scope and without torch.distributed this falls back to
    a single rank, so layers also run in plain single-process code.
    """
    if group is not None:
        return group
    if constants.in_model_scope():
        return constants.tensor_parallel_group()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    raise RuntimeError(
        "No tensor-parallel group given and no model scope is active; pass "
        "group= or wrap the call in constants.model_scope(name)."
    )


def group_size(group: Any = None) -> int:
    group = resolve_group(group)
    if group is None:
        return 1
    size = dist.get_world_size(group)
    if size < 1:
        raise RuntimeError("This rank is not a member of the given group.")
    return size


def group_rank(group: Any = None) -> int:
    group = resolve_group(group)
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------- #
# Plain (non-autograd) collectives on a resolved group.
# ---------------------------------------------------------------------- #
def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    # Reduce a copy: the input may be saved by autograd elsewhere.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"Dimension {dim} of size {x.shape[dim]} is not divisible by the "
            f"tensor-parallel size {size}; pad it first (see pad_to_multiple)."
        )
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_first(x: torch.Tensor, group: Any) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(
            f"{x.shape[0]} tokens are not divisible by the tensor-parallel size "
            f"{size}; pad them first (see pad_to_multiple)."
        )
    inputs = [c.contiguous() for c in x.chunk(size, dim=0)]
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=group)
    return out


# ---------------------------------------------------------------------- #
# Autograd functions.
# ---------------------------------------------------------------------- #
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 0, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tp_grad = tensor_parallel_output_grad
        return _all_gather(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.tp_grad:
            # Downstream tensor-parallel compute left partial gradients.
            return _reduce_scatter_first(g, ctx.group), None, None
        return _split(g, 0, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 0, ctx.group), None


# ---------------------------------------------------------------------- #
# Public API.
# ---------------------------------------------------------------------- #
def copy_to_tp_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Identity forward, all-reduce backward (input of a column-parallel op)."""
    return _CopyToTP.apply(x, resolve_group(group))


def reduce_from_tp_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-reduce forward, identity backward (output of a row-parallel op)."""
    return _ReduceFromTP.apply(x, resolve_group(group))


def scatter_to_tp_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Keep this rank's slice of the last dim; backward all-gathers it."""
    return _ScatterToTP.apply(x, resolve_group(group))


def gather_from_tp_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-gather along the last dim; backward keeps this rank's slice."""
    return _GatherFromTP.apply(x, resolve_group(group))


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Keep this rank's chunk of tokens (first dim); backward all-gathers."""
    return _ScatterToSP.apply(x, resolve_group(group))


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Any = None, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather tokens (first dim).

    Backward reduce-scatters when the gathered tensor feeds tensor-parallel
    compute (each rank holds a partial gradient), otherwise just splits.
    """
    return _GatherFromSP.apply(x, resolve_group(group), tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: Any = None
) -> torch.Tensor:
    """Sum partial results and keep this rank's token chunk; backward all-gathers."""
    return _ReduceScatterToSP.apply(x, resolve_group(group))


# ---------------------------------------------------------------------- #
# Padding of packed token counts.
# ---------------------------------------------------------------------- #
def padded_length(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}.")
    return -(-n // multiple) * multiple


def pad_to_multiple(
    x: torch.Tensor, multiple: int, dim: int = 0, value: float = 0.0
) -> Tuple[torch.Tensor, int]:
    """Pad ``dim`` of ``x`` at the end to a multiple of ``multiple``.

    Packed batches hold an arbitrary number of tokens, while sequence
    parallelism splits tokens evenly across the tensor-parallel ranks.
    Returns the padded tensor and the number of padding entries appended.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    pad = padded_length(n, multiple) - n
    if pad == 0:
        return x, 0
    widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
    return F.pad(x, widths, value=value), pad


def unpad(x: torch.Tensor, pad: int, dim: int = 0) -> torch.Tensor:
    """Drop the ``pad`` trailing entries added by :func:`pad_to_multiple`."""
    if pad == 0:
        return x
    return x.narrow(dim % x.dim(), 0, x.shape[dim] - pad)
