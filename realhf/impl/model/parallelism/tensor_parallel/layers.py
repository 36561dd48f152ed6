"""Linear and embedding layers whose weights are split over tensor-parallel ranks.

The pairing column-parallel -> row-parallel needs one all-reduce per block
in the forward pass (or a reduce-scatter / all-gather pair with sequence
parallelism). Weights can be built from single-process checkpoints with
:func:`shard_weight`, which is how a parallel model is loaded from (and
checked against) an unsplit one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from realhf.impl.model.parallelism.tensor_parallel import mappings

# Called on the full (unsplit) float32 weight; None skips initialisation.
InitMethod = Callable[[torch.Tensor], Any]


def divide(numerator: int, denominator: int) -> int:
    """Exact division, failing loudly on sizes that cannot be split evenly."""
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}.")
    return numerator // denominator


def shard_weight(
    full: torch.Tensor, dim: int, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (a copy)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}.")
    size = divide(full.shape[dim], tp_size)
    return full.narrow(dim, tp_rank * size, size).clone().contiguous()


def kv_heads_partition(n_kv_heads: int, tp_size: int) -> Tuple[int, bool]:
    """KV heads held by each rank under grouped-query attention.

    KV heads are split when ``tp_size`` divides them; otherwise (fewer KV
    heads than ranks, e.g. MQA) every rank keeps all of them, replicated.
    Returns ``(local_kv_heads, replicated)``.
    """
    if n_kv_heads < 1 or tp_size < 1:
        raise ValueError(f"Bad sizes: n_kv_heads={n_kv_heads}, tp_size={tp_size}.")
    if n_kv_heads % tp_size == 0:
        return n_kv_heads // tp_size, False
    return n_kv_heads, True


def shard_kv_weight(
    full: torch.Tensor, n_kv_heads: int, tp_rank: int, tp_size: int, dim: int = 0
) -> torch.Tensor:
    """This rank's part of a K or V projection whose ``dim`` is heads x head_dim."""
    _, replicated = kv_heads_partition(n_kv_heads, tp_size)
    if replicated:
        return full.clone().contiguous()
    return shard_weight(full, dim, tp_rank, tp_size)


def _default_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _init_from_master(
    local: torch.Tensor,
    full_shape: Tuple[int, ...],
    dim: int,
    tp_rank: int,
    tp_size: int,
    init_method: Optional[InitMethod],
) -> None:
    if init_method is None:
        # Weights will be loaded; skip materialising the full matrix.
        return
    # Initialise the full matrix and keep our slice, so the parallel layer is
    # initialised exactly like the unsplit one under the same seed.
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    with torch.no_grad():
        local.copy_(shard_weight(master, dim, tp_rank, tp_size).to(local.dtype))


def allreduce_sequence_parallel_grads(module: nn.Module, group: Any = None) -> None:
    """Sum gradients of replicated parameters that only saw a token shard.

    With sequence parallelism parameters such as the row-parallel bias (or
    layer norms) are replicated, but each rank's gradient covers only its own
    tokens; summing across the tensor-parallel group gives the full gradient.
    """
    group = mappings.resolve_group(group)
    if mappings.group_size(group) == 1:
        return
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


class _TensorParallelLinear(nn.Module):
    """Shared set-up of the parallel linears: the group and this rank's place in it."""

    def __init__(self, in_features: int, out_features: int, group: Any):
        super().__init__()
        self.group = mappings.resolve_group(group)
        self.tp_size = mappings.group_size(self.group)
        self.tp_rank = mappings.group_rank(self.group)
        self.in_features = in_features
        self.out_features = out_features


class ColumnParallelLinear(_TensorParallelLinear):
    """``y = x A^T + b`` with ``A`` split along its output dimension.

    Each rank produces ``out_features / tp`` output features. With
    ``sequence_parallel`` the input holds only this rank's tokens (first dim)
    and is all-gathered before the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        group: Any = None,
        init_method: Optional[InitMethod] = _default_init,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__(in_features, out_features, group)
        self.out_per_rank = divide(out_features, self.tp_size)
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        kw = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, **kw))
        _init_from_master(
            self.weight, (out_features, in_features), 0, self.tp_rank, self.tp_size, init_method
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank, **kw))
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Load this rank's shard of unsplit weights ``[out, in]`` / ``[out]``."""
        self.weight.copy_(shard_weight(weight, 0, self.tp_rank, self.tp_size))
        if bias is not None:
            if self.bias is None:
                raise ValueError("This layer has no bias.")
            self.bias.copy_(shard_weight(bias, 0, self.tp_rank, self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.group)
        else:
            x = mappings.copy_to_tp_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = mappings.gather_from_tp_region(y, self.group)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}, "
            f"gather_output={self.gather_output}, sp={self.sequence_parallel}"
        )


class RowParallelLinear(_TensorParallelLinear):
    """``y = x A^T + b`` with ``A`` split along its input dimension.

    Each rank computes a partial product from its input slice; the partial
    sums are all-reduced, or reduce-scattered over tokens with
    ``sequence_parallel``. The bias is replicated and added after the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        group: Any = None,
        init_method: Optional[InitMethod] = _default_init,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__(in_features, out_features, group)
        self.in_per_rank = divide(in_features, self.tp_size)
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        kw = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, **kw))
        _init_from_master(
            self.weight, (out_features, in_features), 1, self.tp_rank, self.tp_size, init_method
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
            # Replicated, but only sees this rank's tokens under SP.
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Load this rank's shard of unsplit weights ``[out, in]`` / ``[out]``."""
        self.weight.copy_(shard_weight(weight, 1, self.tp_rank, self.tp_size))
        if bias is not None:
            if self.bias is None:
                raise ValueError("This layer has no bias.")
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = mappings.scatter_to_tp_region(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = mappings.reduce_from_tp_region(y, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}, "
            f"input_is_parallel={self.input_is_parallel}, sp={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary.

    Each rank looks up only ids in its vocabulary range (others give zeros),
    then the partial embeddings are summed across ranks (reduce-scattered
    over tokens with ``sequence_parallel``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        sequence_parallel: bool = False,
        group: Any = None,
        init_method: Optional[InitMethod] = nn.init.normal_,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        self.group = mappings.resolve_group(group)
        self.tp_size = mappings.group_size(self.group)
        self.tp_rank = mappings.group_rank(self.group)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_per_rank = divide(num_embeddings, self.tp_size)
        self.vocab_start = self.tp_rank * self.vocab_per_rank
        self.vocab_end = self.vocab_start + self.vocab_per_rank
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.weight = nn.Parameter(
            torch.empty(self.vocab_per_rank, embedding_dim, dtype=dtype, device=device)
        )
        _init_from_master(
            self.weight, (num_embeddings, embedding_dim), 0, self.tp_rank, self.tp_size, init_method
        )

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor) -> None:
        """Load this rank's rows of an unsplit ``[vocab, dim]`` table."""
        self.weight.copy_(shard_weight(weight, 0, self.tp_rank, self.tp_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}"
