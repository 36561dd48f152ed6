"""Packing sequences that share a prefix as a tree: the prefix once, then each
sequence's own remainder (a *branch*).

GRPO-style rollouts train ``group_size`` answers to the same prompt; packed
one after another, every answer repeats the prompt, so a forward and backward
pass compute the prompt's activations ``group_size`` times. In the tree layout
the consecutive sequences of a group become one packed row of the prefix
followed by their branches; a branch token attends to the prefix and to the
earlier tokens of its own branch, and keeps its original position. Every
token's activations are therefore those of the flat layout (up to floating
point rounding), and gathering the tree's outputs with :attr:`PrefixTree.expand`
gives the flat layout's outputs, so losses and their gradients are unchanged:
the gradient of a shared prefix row is the sum of what its copies would get.

Groups are found from the token ids alone (:func:`plan_groups`): consecutive
sequences join a group while their common prefix keeps the tokens saved from
falling, and the tree is used only when it saves at least
``MIN_SAVED_FRACTION`` of the tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

# Shortest prefix worth sharing, and the least fraction of tokens the tree must save.
MIN_PREFIX = 2
MIN_SAVED_FRACTION = 0.05
# Most cells (segments x queries x keys) of the padded attention grid of a tree batch.
MAX_GRID = 1 << 26


@dataclasses.dataclass
class TreeAttention:
    """The attention of a tree batch as one padded batch of query *segments*.

    A segment is a group's prefix (keys: the prefix, causal), one branch (keys:
    its group's prefix, then the branch, causal within it) or a plain sequence.
    Row s of the grids holds segment s: the tree rows of its queries and keys
    (padding points at row 0), which keys each query sees, and where each tree
    row's output sits in the flattened [segments * max_queries] grid. Branches
    see their prefix through their own key rows, so no query attends to
    another branch's tokens and the work is that of the flat layout.
    """

    q_index: torch.Tensor  # int64 [S, max_q]
    k_index: torch.Tensor  # int64 [S, max_k]
    visible: torch.Tensor  # bool [S, max_q, max_k]; padding queries see key 0 (their output is dropped)
    out_index: torch.Tensor  # int64 [T_tree]
    q_pos: torch.Tensor  # int64 [S, max_q] original positions, for sliding windows
    k_pos: torch.Tensor  # int64 [S, max_k]
    # The segments unpadded, for the native kernel: (first query row, queries, first prefix key row,
    # prefix keys) [S, 4], and the boundaries of the runs of segments sharing a prefix [G + 1] (CPU).
    segments: Optional[torch.Tensor] = None
    groups: Optional[torch.Tensor] = None
    _windowed: Dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    _biases: Dict[tuple, torch.Tensor] = dataclasses.field(default_factory=dict)

    def mask(self, window: Optional[int]) -> torch.Tensor:
        """Visibility, also limited to the last ``window`` positions when given (built once per window)."""
        if window is None:
            return self.visible
        if window not in self._windowed:
            mask = self.visible & (self.k_pos[:, None, :] > self.q_pos[:, :, None] - window)
            mask[:, :, 0] |= ~mask.any(dim=2)  # only padding queries lose every key: let them see key 0
            self._windowed[window] = mask
        return self._windowed[window]

    def score_bias(self, window: Optional[int], n_kv: int, rep: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (0 / -inf) [S * n_kv, rep * max_q, max_k] for scores whose rows are the
        ``rep`` query heads of each KV head stacked (built once per window, heads and dtype)."""
        key = (window, n_kv, rep, dtype)
        if key not in self._biases:
            mask = self.mask(window)
            n_seg, max_q, max_k = mask.shape
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            bias = bias[:, None, None].expand(n_seg, n_kv, rep, max_q, max_k)
            self._biases[key] = bias.reshape(n_seg * n_kv, rep * max_q, max_k)
        return self._biases[key]


@dataclasses.dataclass
class PrefixTree:
    """Tree layout of a packed batch (see the module docstring)."""

    input_ids: torch.Tensor  # [T_tree] tokens in tree order
    positions: torch.Tensor  # [T_tree] original position of each tree token
    cu_seqlens: torch.Tensor  # int64 [G + 1] group boundaries in tree order
    attention: TreeAttention
    expand: torch.Tensor  # int64 [T]: tree row of each token of the flat layout
    saved: int  # flat tokens minus tree tokens

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def visibility(self) -> torch.Tensor:
        """Dense [T_tree, T_tree] bool: which tree rows each tree row attends to (for checks)."""
        att, n = self.attention, self.n_tokens
        dense = torch.zeros(n, n, dtype=torch.bool)
        q_of = torch.full((att.q_index.numel(),), -1, dtype=torch.int64)
        q_of[att.out_index.cpu()] = torch.arange(n)
        rows = q_of.view(att.q_index.shape)
        for s in range(rows.shape[0]):
            for j in range(rows.shape[1]):
                if rows[s, j] >= 0:
                    dense[rows[s, j], att.k_index[s].cpu()[att.visible[s, j].cpu()]] = True
        return dense


def _padded(input_ids: torch.Tensor, cu: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """[bs, max_len] grid of the sequences, -1 past each end."""
    bs, width = lens.shape[0], int(lens.max())
    seq = torch.repeat_interleave(torch.arange(bs), lens)
    col = torch.arange(seq.shape[0]) - cu[seq]
    grid = torch.full((bs, width), -1, dtype=torch.int64)
    grid[seq, col] = input_ids.to(torch.int64)
    return grid


def consecutive_prefixes(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> List[int]:
    """Length of the common prefix of sequences i and i + 1, for each i, capped at
    ``min(len_i, len_i+1) - 1`` so that every branch keeps at least one token."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]
    if lens.shape[0] < 2:
        return []
    grid = _padded(input_ids.detach().cpu(), cu, lens)
    cap = torch.minimum(lens[1:], lens[:-1]) - 1
    col = torch.arange(grid.shape[1])
    same = (grid[1:] == grid[:-1]) & (col[None, :] < cap[:, None])
    return same.to(torch.int32).cumprod(dim=1).sum(dim=1).tolist()


def plan_groups(prefixes: List[int], min_prefix: int = MIN_PREFIX) -> List[Tuple[int, int, int]]:
    """Consecutive groups ``(first, end, prefix_len)`` over ``len(prefixes) + 1`` sequences.

    A group's prefix is the minimum of its consecutive common prefixes; the next
    sequence joins while that keeps the prefix at least ``min_prefix`` long and
    does not lower the tokens the group saves, ``(members - 1) * prefix``. A
    group of one has prefix 0.
    """
    groups: List[Tuple[int, int, int]] = []
    first, prefix = 0, 0
    for i, common in enumerate(prefixes, start=1):
        members = i - first
        joined = common if members == 1 else min(prefix, common)
        if joined >= min_prefix and members * joined >= (members - 1) * prefix:
            prefix = joined
            continue
        groups.append((first, i, prefix if members > 1 else 0))
        first, prefix = i, 0
    n = len(prefixes) + 1
    groups.append((first, n, prefix if n - first > 1 else 0))
    return groups


Segment = Tuple[int, int, int, int]  # (first query row, queries, first key row of the prefix, prefix)


def _segment_list(groups: List[Tuple[int, List[int]]]) -> List[Segment]:
    """Query segments of tree groups given as (prefix, branch lengths), laid out one after
    another: the prefix (when there is one), then each branch keyed by the prefix and itself.
    A plain sequence is a group of one branch with prefix 0."""
    segs: List[Segment] = []
    row = 0
    for prefix, branches in groups:
        if prefix > 0:
            segs.append((row, prefix, row, 0))
        start = row + prefix
        for n in branches:
            segs.append((start, n, row, prefix))
            start += n
        row = start
    return segs


def _grid_dims(segs: List[Segment]) -> Tuple[int, int]:
    """(max queries, max keys) of a segment: the padded grid's width in each."""
    return max(n for _, n, _, _ in segs), max(p + n for _, n, _, p in segs)


def _segments(segs: List[Segment], positions: torch.Tensor, device: torch.device) -> TreeAttention:
    """The padded grids of :class:`TreeAttention` for ``segs``."""
    row = sum(n for _, n, _, _ in segs)
    max_q, max_k = _grid_dims(segs)
    n_seg = len(segs)
    q_index = torch.zeros(n_seg, max_q, dtype=torch.int64)
    k_index = torch.zeros(n_seg, max_k, dtype=torch.int64)
    visible = torch.zeros(n_seg, max_q, max_k, dtype=torch.bool)
    out_index = torch.empty(row, dtype=torch.int64)
    causal = torch.ones(max_q, max_q, dtype=torch.bool).tril_()
    for s, (q0, n, k0, p) in enumerate(segs):
        own = torch.arange(q0, q0 + n)
        q_index[s, :n] = own
        k_index[s, :p] = torch.arange(k0, k0 + p)
        k_index[s, p:p + n] = own
        visible[s, :n, :p] = True
        visible[s, :n, p:p + n] = causal[:n, :n]
        visible[s, n:, 0] = True
        out_index[q0:q0 + n] = torch.arange(s * max_q, s * max_q + n)
    pos = positions.cpu()
    # A segment without a prefix (a group's prefix, or a plain sequence) starts a run; branches join it.
    starts = [s for s, (_, _, _, p) in enumerate(segs) if p == 0]
    return TreeAttention(q_index=q_index.to(device), k_index=k_index.to(device), visible=visible.to(device),
                         out_index=out_index.to(device), q_pos=pos[q_index].to(device), k_pos=pos[k_index].to(device),
                         segments=torch.tensor(segs, dtype=torch.int64).view(-1, 4),
                         groups=torch.tensor(starts + [n_seg], dtype=torch.int64))


def build_prefix_tree(input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                      min_saved_fraction: float = MIN_SAVED_FRACTION,
                      device: Optional[torch.device] = None) -> Optional[PrefixTree]:
    """The tree layout of a packed batch on ``device`` (default: the ids'), or None when it
    would save less than ``min_saved_fraction`` of the tokens (or nothing), or when its
    padded attention grid would cost more than twice the flat layout's attention or hold
    more than ``MAX_GRID`` cells (long sequences of very unequal lengths: the flat kernels
    serve those better)."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    total = int(cu[-1]) if cu.numel() else 0
    if total == 0:
        return None
    groups = plan_groups(consecutive_prefixes(input_ids, cu))
    saved = sum((end - first - 1) * prefix for first, end, prefix in groups)
    if saved <= 0 or saved < min_saved_fraction * total:
        return None
    starts, lens = cu[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()
    shapes = [(prefix, [lens[i] - prefix for i in range(first, end)]) for first, end, prefix in groups]
    segs = _segment_list(shapes)
    max_q, max_k = _grid_dims(segs)
    cells = len(segs) * max_q * max_k
    if cells > MAX_GRID or cells > 2 * sum(n * n for n in lens):
        return None
    device = input_ids.device if device is None else device
    src: List[torch.Tensor] = []  # flat token index of each tree row, in tree order
    expand: List[torch.Tensor] = []  # tree row of each flat token, in flat order
    group_lens = []
    row = 0
    for (first, _, _), (prefix, branch_lens) in zip(groups, shapes):
        src.append(torch.arange(starts[first], starts[first] + prefix))
        offset = row + prefix
        for i, n in enumerate(branch_lens, start=first):
            src.append(torch.arange(starts[i] + prefix, starts[i] + lens[i]))
            expand.append(torch.arange(row, row + prefix))
            expand.append(torch.arange(offset, offset + n))
            offset += n
        group_lens.append(offset - row)
        row = offset
    src_t = torch.cat(src)
    seq_of = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    positions = src_t - cu[seq_of[src_t]]
    return PrefixTree(
        input_ids=input_ids[src_t.to(input_ids.device)].to(device),
        positions=positions.to(device),
        cu_seqlens=torch.tensor([0] + group_lens, dtype=torch.int64).cumsum(0).to(device),
        attention=_segments(segs, positions, device),
        expand=torch.cat(expand).to(device),
        saved=saved,
    )


def repeated_rows(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> Optional[torch.Tensor]:
    """For each sequence, the index of the first of its run of identical consecutive
    sequences (itself when it differs from the one before); None when no two
    consecutive sequences are identical. Generation prefills such runs once."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]
    bs = lens.shape[0]
    if bs < 2 or int(lens.min()) <= 0:
        return None
    grid = _padded(input_ids.detach().cpu(), cu, lens)
    same = (grid[1:] == grid[:-1]).all(dim=1) & (lens[1:] == lens[:-1])
    if not bool(same.any()):
        return None
    idx = torch.arange(bs)
    starts = torch.cat([torch.ones(1, dtype=torch.bool), ~same])
    # The latest run start at or before each row.
    return torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
