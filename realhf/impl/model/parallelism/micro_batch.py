"""Splitting a packed batch into micro-batches and restoring output order.

A model function call bounds its memory either by a number of micro-batches
(``MicroBatchSpec.n_mbs``) or by a token budget per micro-batch
(``MicroBatchSpec.max_tokens_per_mb``). Counting splits keep items in order;
budget splits pack items into bins, which permutes them, so the caller gets
the permutation to put per-item outputs back into the input order.
"""

from __future__ import annotations

import heapq
from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from realhf.api.core.data_api import SequenceSample, SequenceSplitSpec
from realhf.api.core.model_api import MicroBatchSpec
from realhf.base import datapack


class MicroBatchSplit(NamedTuple):
    """Micro-batches plus the item permutations relating them to the input.

    ``forward_indices[j]`` is the input position of the ``j``-th item in the
    concatenated micro-batches; ``backward_indices`` is its inverse, so
    ``concatenated[backward_indices]`` is in input order.
    """

    micro_batches: List[SequenceSample]
    forward_indices: List[int]
    backward_indices: List[int]


def _inverse(perm: Sequence[int]) -> List[int]:
    inv = [0] * len(perm)
    for j, i in enumerate(perm):
        inv[i] = j
    return inv


def _balanced_bins(lens: Sequence[int], n_bins: int, budget: int) -> Optional[List[List[int]]]:
    """Longest item first into the lightest bin; None if a bin overflows."""
    heap = [(0, b) for b in range(n_bins)]
    bins: List[List[int]] = [[] for _ in range(n_bins)]
    for i in sorted(range(len(lens)), key=lambda i: (-lens[i], i)):
        load, b = heapq.heappop(heap)
        if load + lens[i] > budget:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (load + lens[i], b))
    if any(not b for b in bins):
        return None
    return [sorted(b) for b in bins]


def _budget_groups(lens: List[int], budget: int, min_groups: int) -> List[List[int]]:
    """Fewest bins that respect the budget (first-fit decreasing), then the
    same number of bins rebalanced so their token counts are close."""
    groups = datapack.ffd_allocate(lens, budget, min_groups=min_groups)
    balanced = _balanced_bins(lens, len(groups), budget)
    if balanced is not None:
        load = lambda gs: max(sum(lens[i] for i in g) for g in gs)  # noqa: E731
        if load(balanced) <= load(groups):
            groups = balanced
    return sorted(groups, key=lambda g: g[0])


def split_packed_batch(
    sample: SequenceSample, mb_spec: MicroBatchSpec, key: Optional[str] = None
) -> MicroBatchSplit:
    """Split ``sample`` into micro-batches following ``mb_spec``.

    Sequences are never cut. Tokens are counted on ``key`` (default: the key
    with the most tokens). Without a token budget the batch is cut into
    ``min(n_mbs, bs)`` contiguous parts with balanced token counts and the
    order is unchanged. With a budget, items are packed into at least
    ``min(n_mbs, bs)`` micro-batches of at most ``max_tokens_per_mb`` tokens
    each; an item longer than the budget raises ValueError.
    """
    if sample.bs == 0:
        raise ValueError("Cannot split an empty batch into micro-batches.")
    n_mbs = min(mb_spec.n_mbs, sample.bs)
    budget = mb_spec.max_tokens_per_mb
    if budget is None:
        identity = list(range(sample.bs))
        return MicroBatchSplit(sample.split(n_mbs, key=key), identity, list(identity))
    key = sample._largest_key() if key is None else key
    lens = sample.item_lengths(key)
    for i, n in enumerate(lens):
        if n > budget:
            raise ValueError(
                f"Item {i} (id {sample.ids[i]!r}) has {n} tokens of key '{key}', more than "
                f"max_tokens_per_mb={budget}; it cannot fit in any micro-batch."
            )
    groups = _budget_groups(lens, budget, n_mbs)
    forward = [i for g in groups for i in g]
    if forward == list(range(sample.bs)):
        reordered = sample
    else:
        items = sample.unpack()
        reordered = SequenceSample.gather([items[i] for i in forward])
    mbs = reordered.split_with_spec(SequenceSplitSpec(sizes=[len(g) for g in groups]))
    return MicroBatchSplit(mbs, forward, _inverse(forward))


Output = Union[torch.Tensor, SequenceSample]


def concat_outputs_in_order(
    outputs: Sequence[Output],
    backward_indices: Sequence[int],
    item_lengths: Optional[Sequence[int]] = None,
) -> Output:
    """Concatenate per-micro-batch outputs and restore the input item order.

    ``outputs`` are tensors or SequenceSamples, one per micro-batch, in
    micro-batch order. A tensor holds one row per item, or, when
    ``item_lengths`` (per item, in *input* order, e.g.
    ``sample.item_lengths(key)``) is given, a packed block of rows per item.
    """
    if len(outputs) == 0:
        raise ValueError("No outputs to concatenate.")
    n = len(backward_indices)
    forward = _inverse(backward_indices)
    if isinstance(outputs[0], SequenceSample):
        items = SequenceSample.gather(list(outputs)).unpack()
        if len(items) != n:
            raise ValueError(f"Outputs hold {len(items)} items but the permutation has {n}.")
        return SequenceSample.gather([items[j] for j in backward_indices])
    cat = torch.cat(list(outputs), dim=0)
    if item_lengths is None:
        if cat.shape[0] != n:
            raise ValueError(f"Outputs have {cat.shape[0]} rows but the permutation has {n} items.")
        return cat[torch.as_tensor(list(backward_indices), dtype=torch.long, device=cat.device)]
    if len(item_lengths) != n:
        raise ValueError(f"Got {len(item_lengths)} item lengths for {n} items.")
    fwd_lens = [int(item_lengths[i]) for i in forward]
    if sum(fwd_lens) != cat.shape[0]:
        raise ValueError(f"Outputs have {cat.shape[0]} rows but the item lengths sum to {sum(fwd_lens)}.")
    chunks = torch.split(cat, fwd_lens, dim=0)
    return torch.cat([chunks[j] for j in backward_indices], dim=0)


def item_output_rows(out: torch.Tensor, mb: SequenceSample, key: str) -> List[int]:
    """Rows of ``out`` belonging to each item: per token, per shifted token, or one per item."""
    tok = [sum(s) for s in mb.seqlens[key]]
    nseq = [len(s) for s in mb.seqlens[key]]
    if out.shape[0] == sum(tok):
        return tok
    if out.shape[0] == sum(tok) - sum(nseq):
        return [t - n for t, n in zip(tok, nseq)]
    if out.shape[0] == mb.bs:
        return [1] * mb.bs
    raise ValueError(
        f"Cannot attribute {out.shape[0]} output rows to the {mb.bs} items of a micro-batch "
        f"({sum(tok)} tokens); return one row per token, per shifted token, or per item."
    )


def assemble_outputs(outputs: List[object], split: MicroBatchSplit, sample: SequenceSample, key: str) -> object:
    """Per-micro-batch outputs of ``split`` put back into ``sample``'s item order.

    Tensor outputs are concatenated along dim 0 in the original item order
    (any other output type is returned as a per-micro-batch list when the
    split kept the order, which counting splits always do).
    """
    in_order = split.forward_indices == list(range(sample.bs))
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        if all(isinstance(o, SequenceSample) for o in outputs):
            return concat_outputs_in_order(outputs, split.backward_indices)
        if not in_order:
            raise ValueError("Non-tensor post_hook outputs cannot be reordered; use n_mbs without a token budget.")
        return outputs
    if in_order:
        return torch.cat(outputs, dim=0)
    rows = [n for o, mb in zip(outputs, split.micro_batches) for n in item_output_rows(o, mb, key)]
    per_item = [0] * sample.bs
    for j, i in enumerate(split.forward_indices):
        per_item[i] = rows[j]
    return concat_outputs_in_order(outputs, split.backward_indices, item_lengths=per_item)
