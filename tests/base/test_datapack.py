import itertools
import random
import time

import numpy as np
import pytest

from realhf.base import datapack


def _brute_force_optimum(nums, k, min_size):
    n = len(nums)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        if any(bounds[i + 1] - bounds[i] < min_size for i in range(k)):
            continue
        cost = max(sum(nums[bounds[i] : bounds[i + 1]]) for i in range(k))
        best = cost if best is None else min(best, cost)
    return best


def _check_partition(parts, n, k, min_size):
    assert len(parts) == k
    assert parts[0][0] == 0 and parts[-1][1] == n
    for (s0, e0), (s1, _) in zip(parts, parts[1:]):
        assert e0 == s1
    assert all(e - s >= min_size for s, e in parts)


def test_flat2d():
    assert datapack.flat2d([[1, 2], [], [3]]) == [1, 2, 3]
    assert datapack.flat2d([]) == []


def test_partition_hand_examples():
    assert datapack.partition_balanced([1, 2, 3, 4, 5], 2) == [(0, 3), (3, 5)]
    assert datapack.partition_balanced([7, 1, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 8)]
    # With two items minimum, 7 can no longer stand alone.
    parts = datapack.partition_balanced([7, 1, 1, 1, 1, 1, 1, 1], 2, min_size=2)
    assert datapack.partition_sums([7, 1, 1, 1, 1, 1, 1, 1], parts) == [8, 6]
    assert datapack.partition_balanced([5, 5, 5], 3) == [(0, 1), (1, 2), (2, 3)]
    assert datapack.partition_balanced([0, 0, 0, 0], 2) in ([(0, 1), (1, 4)], [(0, 3), (3, 4)],
                                                             [(0, 2), (2, 4)])


@pytest.mark.parametrize("seed", range(4))
def test_partition_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(150):
        n = rng.randint(1, 10)
        k = rng.randint(1, n)
        min_size = rng.randint(1, n // k)
        nums = [rng.choice([0, 1, 2, 3, 5, 8, 13, 40, 100]) for _ in range(n)]
        parts = datapack.partition_balanced(nums, k, min_size)
        _check_partition(parts, n, k, min_size)
        best = max(datapack.partition_sums(nums, parts))
        assert best == _brute_force_optimum(nums, k, min_size), (nums, k, min_size, parts)


def test_partition_impossible_and_invalid():
    with pytest.raises(ValueError, match="Cannot split 5 items into 3 parts of at least 2"):
        datapack.partition_balanced([1] * 5, 3, min_size=2)
    with pytest.raises(ValueError):
        datapack.partition_balanced([1, 2], 0)
    with pytest.raises(ValueError):
        datapack.partition_balanced([1, -2], 1)
    with pytest.raises(TypeError):
        datapack.partition_balanced([1.5, 2], 1)
    assert datapack.partition_balanced(np.array([3, 1, 2]), 1) == [(0, 3)]


@pytest.mark.parametrize("k,min_size", [(8, 1), (64, 1), (8, 16), (500, 3)])
def test_partition_large_input_is_fast(k, min_size):
    rng = np.random.default_rng(0)
    nums = rng.integers(1, 4096, size=10_000).tolist()
    start = time.perf_counter()
    parts = datapack.partition_balanced(nums, k, min_size)
    assert time.perf_counter() - start < 5
    _check_partition(parts, len(nums), k, min_size)
    sums = datapack.partition_sums(nums, parts)
    best = max(sums)
    assert best >= -(-sum(nums) // k)
    # Optimality certificate: shaving one token off the bound is infeasible.
    assert not datapack._feasible(
        np.cumsum([0] + nums), [0] + list(np.cumsum(nums)), best - 1, k, min_size
    )


def test_ffd_hand_example():
    assert datapack.ffd_allocate([5, 4, 3, 2, 1], capacity=6) == [[0, 4], [1, 3], [2]]
    # Splitting the heaviest group (ties: the one holding the lowest index).
    assert datapack.ffd_allocate([5, 4, 3, 2, 1], capacity=6, min_groups=4) == [
        [0],
        [1, 3],
        [2],
        [4],
    ]
    assert datapack.ffd_allocate([1, 1, 1, 1], capacity=10) == [[0, 1, 2, 3]]
    assert datapack.ffd_allocate([1, 1, 1, 1], capacity=10, min_groups=2) == [[0, 2], [1, 3]]


def test_ffd_errors():
    with pytest.raises(ValueError, match="Item 2 has value 9"):
        datapack.ffd_allocate([1, 2, 9], capacity=8)
    with pytest.raises(ValueError, match="Cannot form 4"):
        datapack.ffd_allocate([1, 2, 3], capacity=8, min_groups=4)


@pytest.mark.parametrize("seed", range(3))
def test_ffd_properties(seed):
    rng = random.Random(seed)
    for _ in range(100):
        n = rng.randint(1, 40)
        capacity = rng.randint(10, 100)
        values = [rng.randint(0, capacity) for _ in range(n)]
        min_groups = rng.randint(1, n)
        groups = datapack.ffd_allocate(values, capacity, min_groups)
        assert len(groups) >= min_groups
        assert sorted(datapack.flat2d(groups)) == list(range(n))
        for g in groups:
            assert g and g == sorted(g)
            assert sum(values[i] for i in g) <= capacity
        assert datapack.ffd_allocate(list(values), capacity, min_groups) == groups


def test_ffd_is_first_fit():
    # Replay in descending order: every item must sit in the earliest-opened
    # group that had room for it at that moment.
    rng = random.Random(5)
    for _ in range(50):
        values = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        groups = datapack.ffd_allocate(values, 100)
        group_of = {i: g for g, members in enumerate(groups) for i in members}
        opened, load = [], {}
        for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
            g = group_of[i]
            fits = [h for h in opened if load[h] + values[i] <= 100]
            if fits:
                assert g == fits[0]
            else:
                assert g not in opened
                opened.append(g)
                load[g] = 0
            load[g] += values[i]


def test_reorder_hand_examples():
    idx, diff = datapack.reorder_to_balanced_batches(np.arange(1, 9), 2)
    assert idx.tolist() == [7, 0, 6, 1, 5, 2, 4, 3] and diff == 0
    idx, diff = datapack.reorder_to_balanced_batches(np.array([10, 1, 1, 1, 1]), 2)
    # Batches {10, 1}, {1, 1} and the one-sequence remainder last.
    assert idx.tolist() == [0, 4, 1, 3, 2] and diff == 10


@pytest.mark.parametrize("seed", range(3))
def test_reorder_properties(seed):
    rng = np.random.default_rng(seed)
    for n, bs in [(64, 8), (100, 7), (5, 10), (1, 1)]:
        seqlens = rng.integers(1, 1000, size=n)
        idx, diff = datapack.reorder_to_balanced_batches(seqlens, bs)
        assert sorted(idx.tolist()) == list(range(n))
        chunks = [idx[i : i + bs] for i in range(0, n, bs)]
        totals = [int(seqlens[c].sum()) for c in chunks]
        assert diff == max(totals) - min(totals)
        full = [t for c, t in zip(chunks, totals) if len(c) == bs]
        assert full == sorted(full, reverse=True)
        if n % bs == 0 and n > bs:
            naive = [int(seqlens[i : i + bs].sum()) for i in range(0, n, bs)]
            assert diff <= max(naive) - min(naive)


def test_reorder_edge_cases():
    idx, diff = datapack.reorder_to_balanced_batches(np.array([], dtype=np.int64), 4)
    assert idx.tolist() == [] and diff == 0
    with pytest.raises(ValueError):
        datapack.reorder_to_balanced_batches(np.ones((2, 2)), 2)
    with pytest.raises(ValueError):
        datapack.reorder_to_balanced_batches(np.ones(4), 0)
