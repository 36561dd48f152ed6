"""Log-probabilities of labels from vocabulary-parallel logits.

Gathering full ``[T, V]`` logits onto every rank would cost ``tp`` times the
memory of the shard; instead only per-token scalars are all-reduced: the
max (for numerical stability), the sum of exponentials, and the label logit
(which lives on exactly one rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from realhf.impl.model.parallelism.tensor_parallel import mappings
from realhf.impl.model.utils.functional import shifted_label_indices


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: Any):
        size = mappings.group_size(group)
        rank = mappings.group_rank(group)
        vocab_local = logits.shape[-1]
        start = rank * vocab_local
        x = logits.float()

        row_max = x.max(dim=-1).values
        if size > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - row_max.unsqueeze(-1)

        outside = (labels < start) | (labels >= start + vocab_local)
        local = (labels - start).masked_fill(outside, 0).long()
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(outside, 0.0)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if size > 1:
            # One collective for both per-token scalars.
            both = torch.stack([picked, sum_exp])
            dist.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]

        exp.div_(sum_exp.unsqueeze(-1))  # now the softmax shard
        ctx.save_for_backward(exp, local, outside)
        ctx.in_dtype = logits.dtype
        return picked - sum_exp.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        # d log p(y) / d logits = onehot(y) - softmax
        g = grad.float().unsqueeze(-1)
        grad_logits = softmax.mul(-g)
        onehot_add = grad.float().masked_fill(outside, 0.0)
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), onehot_add.unsqueeze(-1))
        return grad_logits.to(ctx.in_dtype), None, None


def vocab_parallel_log_probs(
    logits_shard: torch.Tensor, labels: torch.Tensor, group: Any = None
) -> torch.Tensor:
    """``log softmax(logits)[label]`` per token from a vocabulary shard.

    :param logits_shard: [T, V / tp], this rank's contiguous vocab slice.
    :param labels: [T] ids in the full vocabulary.
    :return: float32 [T], identical on every rank of the group.
    """
    if logits_shard.dim() != 2 or labels.dim() != 1 or logits_shard.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected logits [T, V/tp] and labels [T], got {tuple(logits_shard.shape)} "
            f"and {tuple(labels.shape)}."
        )
    return _VocabParallelLogProbs.apply(logits_shard, labels, mappings.resolve_group(group))


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor, labels: torch.Tensor, group: Any = None
) -> torch.Tensor:
    """Per-token negative log-likelihood from a vocabulary shard ([T])."""
    return -vocab_parallel_log_probs(logits_shard, labels, group)


def vocab_parallel_packed_shifted_log_probs(
    logits_shard: torch.Tensor,
    cu_seqlens: torch.Tensor,
    input_ids: torch.Tensor,
    group: Any = None,
) -> torch.Tensor:
    """Next-token log-probs of packed sequences from a vocabulary shard.

    Same contract as ``gather_packed_shifted_log_probs``: entry t of sequence
    i is ``log p(input_ids[t + 1] | logits[t])``, never crossing sequence
    boundaries; returns [sum(L_i - 1)].
    """
    if logits_shard.dim() != 2 or input_ids.dim() != 1 or logits_shard.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"Expected logits [T, V/tp] and input_ids [T], got "
            f"{tuple(logits_shard.shape)} and {tuple(input_ids.shape)}."
        )
    total = logits_shard.shape[0]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at {total}.")
    pred, lab = shifted_label_indices(cu_seqlens)
    return vocab_parallel_log_probs(logits_shard[pred], input_ids[lab], group)
