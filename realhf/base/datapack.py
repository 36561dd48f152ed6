"""Balancing sequences across ranks and micro-batches.

Sequences have very different lengths, so splitting a batch by count leaves
some ranks idle. The functions here split by token counts instead:

* :func:`partition_balanced` cuts a sequence list into contiguous parts with
  the smallest possible maximum part sum (order-preserving data parallelism);
* :func:`ffd_allocate` packs items into token-capacity bins (micro-batches);
* :func:`reorder_to_balanced_batches` permutes a dataset into fixed-size
  batches of similar token totals.
"""

from __future__ import annotations

import heapq
from typing import Iterable, List, Sequence, Tuple

import numpy as np


def flat2d(arr: Iterable[Iterable]) -> list:
    """Concatenate a list of lists."""
    return [x for row in arr for x in row]


def _as_nonneg_ints(nums: Sequence) -> List[int]:
    out = []
    for x in nums:
        v = int(x)
        if v != x:
            raise TypeError(f"Expected integers, got {x!r}.")
        if v < 0:
            raise ValueError(f"Expected non-negative values, got {v}.")
        out.append(v)
    return out


# ---------------------------------------------------------------------- #
# Contiguous min-max partition.
# ---------------------------------------------------------------------- #
def _greedy_cuts(prefix: np.ndarray, limit: int, max_parts: int) -> List[int]:
    """End positions of the fewest parts with sums <= limit (longest-first).

    Stops early, returning more than ``max_parts`` cuts, once the count
    exceeds ``max_parts``.
    """
    n = len(prefix) - 1
    cuts: List[int] = []
    start = 0
    while start < n and len(cuts) <= max_parts:
        end = int(np.searchsorted(prefix, prefix[start] + limit, side="right")) - 1
        if end <= start:
            return []  # a single item exceeds the limit
        cuts.append(end)
        start = end
    return cuts


def _reach_sets(prefix: List[int], limit: int, k: int, min_size: int) -> List[int]:
    """Bitsets: bit ``c`` of ``reach[i]`` is set iff the first ``i`` items can
    be cut into ``c`` parts of at least ``min_size`` items and sum <= limit.

    ``reach[i]`` is the OR of ``reach[j] << 1`` over a window of ``j`` whose
    both ends only move right, so a two-stack queue keeps the OR amortised
    O(1) big-int operations per position.
    """
    n = len(prefix) - 1
    mask = (1 << (k + 1)) - 1
    reach = [0] * (n + 1)
    reach[0] = 1
    back: List[int] = []
    back_or = 0
    front: List[int] = []  # running ORs, front[-1] covers all of front
    pushed = popped = 0  # window holds reach[popped:pushed]
    lo = 0
    for i in range(min_size, n + 1):
        while prefix[i] - prefix[lo] > limit:
            lo += 1
        hi = i - min_size
        if lo > hi:
            continue
        if popped < lo:
            if lo >= pushed:
                back, back_or, front = [], 0, []
                pushed = popped = lo
            else:
                while popped < lo:
                    if not front:
                        acc = 0
                        for v in reversed(back):
                            acc |= v
                            front.append(acc)
                        back, back_or = [], 0
                    front.pop()
                    popped += 1
        while pushed <= hi:
            back.append(reach[pushed])
            back_or |= reach[pushed]
            pushed += 1
        window = back_or | (front[-1] if front else 0)
        reach[i] = (window << 1) & mask
    return reach


def _feasible(prefix_arr, prefix, limit, k, min_size) -> bool:
    if min_size == 1:
        cuts = _greedy_cuts(prefix_arr, limit, k)
        # With single-item parts allowed, any greedy solution with fewer
        # parts can be refined by splitting parts (sums only shrink).
        return 0 < len(cuts) <= k
    return bool(_reach_sets(prefix, limit, k, min_size)[-1] >> k & 1)


def _cuts_exactly_k(prefix_arr, prefix, limit, k, min_size) -> List[int]:
    n = len(prefix) - 1
    if min_size == 1:
        cuts = _greedy_cuts(prefix_arr, limit, k)
        bounds = [0] + cuts
        # Split parts from the front until there are k of them; the first
        # `need` extra parts are single items peeled off multi-item parts.
        need = k - len(cuts)
        out = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            while need > 0 and e - s > 1:
                out.append(s + 1)
                s += 1
                need -= 1
            out.append(e)
        assert need == 0 and len(out) == k and out[-1] == n
        return out
    reach = _reach_sets(prefix, limit, k, min_size)
    cuts = [n]
    i, c = n, k
    while c > 0:
        j = i - min_size
        while not (
            j >= 0 and prefix[i] - prefix[j] <= limit and reach[j] >> (c - 1) & 1
        ):
            j -= 1
            if j < 0 or prefix[i] - prefix[j] > limit:
                raise AssertionError("inconsistent reachability table")
        cuts.append(j)
        i, c = j, c - 1
    cuts.reverse()
    return cuts[1:]


def partition_balanced(
    nums: Sequence[int], k: int, min_size: int = 1
) -> List[Tuple[int, int]]:
    """Split ``nums`` into ``k`` contiguous ``[start, end)`` ranges of at
    least ``min_size`` items each, minimising the largest range sum.

    The optimum is found exactly by binary search over the answer with a
    feasibility test: greedy for ``min_size == 1`` and a bitset DP over
    achievable part counts otherwise.
    """
    if k < 1 or min_size < 1:
        raise ValueError(f"k and min_size must be positive, got k={k}, min_size={min_size}.")
    values = _as_nonneg_ints(nums)
    n = len(values)
    if n < k * min_size:
        raise ValueError(
            f"Cannot split {n} items into {k} parts of at least {min_size} items."
        )
    prefix = [0]
    for v in values:
        prefix.append(prefix[-1] + v)
    prefix_arr = np.asarray(prefix, dtype=np.int64)
    lo = max(max(values), -(-prefix[-1] // k))  # no answer can be smaller
    hi = prefix[-1]  # always feasible when n >= k * min_size
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(prefix_arr, prefix, mid, k, min_size):
            hi = mid
        else:
            lo = mid + 1
    ends = _cuts_exactly_k(prefix_arr, prefix, lo, k, min_size)
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def partition_sums(nums: Sequence[int], parts: Sequence[Tuple[int, int]]) -> List[int]:
    return [int(sum(nums[s:e])) for s, e in parts]


# ---------------------------------------------------------------------- #
# Bin packing.
# ---------------------------------------------------------------------- #
def _split_in_two(group: List[int], values: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Halve a group by sums: largest items first, each to the lighter half."""
    halves: Tuple[List[int], List[int]] = ([], [])
    sums = [0, 0]
    for idx in sorted(group, key=lambda i: (-values[i], i)):
        side = 0 if (sums[0], len(halves[0])) <= (sums[1], len(halves[1])) else 1
        halves[side].append(idx)
        sums[side] += values[idx]
    return halves


def ffd_allocate(
    values: Sequence[int], capacity: int, min_groups: int = 1
) -> List[List[int]]:
    """Pack item indices into groups whose value sums stay within ``capacity``.

    First-fit decreasing: items in descending value (ties by index) go into
    the first group with room. If fewer than ``min_groups`` groups result,
    the heaviest splittable group is halved until there are enough. Each
    group lists ascending indices; groups are ordered by their first index.
    """
    vals = _as_nonneg_ints(values)
    if min_groups < 1:
        raise ValueError(f"min_groups must be positive, got {min_groups}.")
    if len(vals) < min_groups:
        raise ValueError(f"Cannot form {min_groups} non-empty groups from {len(vals)} items.")
    for i, v in enumerate(vals):
        if v > capacity:
            raise ValueError(f"Item {i} has value {v}, larger than capacity {capacity}.")
    groups: List[List[int]] = []
    room: List[int] = []
    for idx in sorted(range(len(vals)), key=lambda i: (-vals[i], i)):
        for g, free in enumerate(room):
            if vals[idx] <= free:
                groups[g].append(idx)
                room[g] -= vals[idx]
                break
        else:
            groups.append([idx])
            room.append(capacity - vals[idx])
    while len(groups) < min_groups:
        splittable = [g for g in groups if len(g) > 1]
        heaviest = max(splittable, key=lambda g: (sum(vals[i] for i in g), len(g), -min(g)))
        groups.remove(heaviest)
        groups.extend(_split_in_two(heaviest, vals))
    groups = [sorted(g) for g in groups]
    groups.sort(key=lambda g: g[0])
    return groups


# ---------------------------------------------------------------------- #
# Dataset reordering.
# ---------------------------------------------------------------------- #
def reorder_to_balanced_batches(
    seqlens: np.ndarray, n_seqs_per_batch: int
) -> Tuple[np.ndarray, int]:
    """Permutation of ``range(len(seqlens))`` whose consecutive chunks of
    ``n_seqs_per_batch`` have near-equal token totals.

    Longest sequences are placed first, each into the lightest batch with a
    free slot. Full batches come out heaviest first (memory problems show
    up on the first step); a smaller remainder batch comes last. Returns
    the indices and the token gap between the heaviest and lightest batch.
    """
    seqlens = np.asarray(seqlens)
    if seqlens.ndim != 1:
        raise ValueError(f"seqlens must be 1-D, got shape {seqlens.shape}.")
    if n_seqs_per_batch < 1:
        raise ValueError(f"n_seqs_per_batch must be positive, got {n_seqs_per_batch}.")
    n = len(seqlens)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    n_full, rem = divmod(n, n_seqs_per_batch)
    slots = [n_seqs_per_batch] * n_full + ([rem] if rem else [])
    members: List[List[int]] = [[] for _ in slots]
    totals = [0] * len(slots)
    heap = [(0, b) for b in range(len(slots))]  # (tokens, batch)
    order = sorted(range(n), key=lambda i: (-int(seqlens[i]), i))
    for i in order:
        tokens, b = heapq.heappop(heap)
        members[b].append(i)
        totals[b] = tokens + int(seqlens[i])
        if len(members[b]) < slots[b]:
            heapq.heappush(heap, (totals[b], b))
    full = sorted(range(n_full), key=lambda b: (-totals[b], b))
    batch_order = full + ([n_full] if rem else [])
    indices = np.array(flat2d(members[b] for b in batch_order), dtype=np.int64)
    return indices, int(max(totals) - min(totals))
