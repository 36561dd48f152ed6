"""merge_intervals / slice_intervals / set_intervals on every CPU backend.

Results are compared bit-exactly with plain-Python references built from
numpy slices, so every dtype (including bf16, which numpy lacks) is checked
through a same-width integer view.
"""

from typing import List, Tuple

import numpy as np
import pytest
import torch

from realhf.impl.ops import merge_intervals, set_intervals, slice_intervals

COPY_BACKENDS = ("python", "cpp", "triton")
MERGE_BACKENDS = ("python", "cpp")
# Interpreted Triton costs ~2 ms per program; bigger cases skip it.
TRITON_MAX_INTERVALS = 100
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Pairs = List[Tuple[int, int]]


def bits(t: torch.Tensor) -> np.ndarray:
    """Raw element bits of a 1-D tensor as a numpy array."""
    if t.dtype == torch.bool:
        return t.numpy().astype(np.uint8)
    return t.contiguous().view(_BITS[t.element_size()]).numpy()


def random_intervals(rng: np.random.Generator, n: int, size: int) -> Pairs:
    """Sorted, non-overlapping intervals in [0, size], some adjacent or empty."""
    if n == 0:
        return []
    edges = np.sort(rng.integers(0, size + 1, 2 * n))
    # Make about a quarter of the intervals start where the previous ended.
    glue = np.flatnonzero(rng.random(n) < 0.25)
    glue = glue[glue > 0]
    edges[2 * glue] = edges[2 * glue - 1]
    return [(int(edges[2 * i]), int(edges[2 * i + 1])) for i in range(n)]


def reference_merge(pairs: Pairs) -> Pairs:
    out: Pairs = []
    for s, e in pairs:
        if s == e:
            continue
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def reference_slice(src_bits: np.ndarray, pairs: Pairs) -> np.ndarray:
    if not pairs:
        return src_bits[:0]
    return np.concatenate([src_bits[s:e] for s, e in pairs])


def random_tensor(rng: np.random.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    data = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    if dtype == torch.bool:
        return data > 0
    if not dtype.is_floating_point:
        return (data * 1000).to(dtype)
    return data.to(dtype)


# --------------------------------------------------------------------------
# merge_intervals
# --------------------------------------------------------------------------

MERGE_CASES = [
    ([], []),
    ([(3, 3)], []),
    ([(0, 5)], [(0, 5)]),
    ([(0, 2), (2, 4)], [(0, 4)]),
    ([(0, 2), (3, 4)], [(0, 2), (3, 4)]),
    ([(0, 2), (2, 2), (2, 5), (7, 9), (9, 9), (9, 10)], [(0, 5), (7, 10)]),
    ([(-5, -2), (-2, 0), (1, 1), (4, 6)], [(-5, 0), (4, 6)]),
    ([(1, 2), (2, 3), (3, 4), (4, 5)], [(1, 5)]),
]


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("pairs,expected", MERGE_CASES)
def test_merge_by_hand(require_backend, backend, pairs, expected):
    require_backend("merge_intervals", backend)
    assert merge_intervals(pairs, backend=backend) == expected
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    got = merge_intervals(arr, backend=backend)
    assert isinstance(got, np.ndarray) and got.shape == (len(expected), 2)
    assert [tuple(r) for r in got.tolist()] == expected
    got = merge_intervals(torch.from_numpy(arr), backend=backend)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    assert [tuple(r) for r in got.tolist()] == expected


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_keeps_container_dtype(require_backend, backend):
    require_backend("merge_intervals", backend)
    pairs = [(0, 2), (2, 4), (6, 8)]
    got = merge_intervals(np.array(pairs, dtype=np.int32), backend=backend)
    assert got.dtype == np.int32 and got.tolist() == [[0, 4], [6, 8]]
    got = merge_intervals(torch.tensor(pairs, dtype=torch.int32), backend=backend)
    assert got.dtype == torch.int32 and got.tolist() == [[0, 4], [6, 8]]
    got = merge_intervals([(np.int64(0), np.int64(2)), [2, 5]], backend=backend)
    assert got == [(0, 5)] and all(type(v) is int for v in got[0])


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 2, 10, 1000, 100_000])
def test_merge_random(require_backend, backend, n):
    require_backend("merge_intervals", backend)
    rng = np.random.default_rng(n)
    pairs = random_intervals(rng, n, 4 * n + 10)
    expected = reference_merge(pairs)
    assert merge_intervals(pairs, backend=backend) == expected
    got = merge_intervals(np.array(pairs, dtype=np.int64).reshape(-1, 2), backend=backend)
    assert [tuple(r) for r in got.tolist()] == expected


# --------------------------------------------------------------------------
# slice_intervals / set_intervals
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", COPY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 2, 10, 1000, 100_000])
def test_slice_and_set_random(require_backend, backend, dtype, n):
    require_backend("slice_intervals", backend)
    if backend == "triton" and n > TRITON_MAX_INTERVALS:
        pytest.skip("too many programs for the Triton interpreter")
    rng = np.random.default_rng(1000 + n)
    size = 3 * n + 50
    src = random_tensor(rng, size, dtype)
    pairs = random_intervals(rng, n, size)
    expected = reference_slice(bits(src), pairs)

    packed = slice_intervals(src, pairs, backend=backend)
    assert packed.dtype == dtype and packed.shape == (len(expected),)
    np.testing.assert_array_equal(bits(packed), expected)
    # Same result through every accepted interval container.
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    for intervals in (arr, torch.from_numpy(arr), arr.astype(np.int32)):
        again = slice_intervals(src, intervals, output_size=len(expected), backend=backend)
        np.testing.assert_array_equal(bits(again), expected)

    # Round trip into a different buffer: covered ranges take src's values,
    # everything else stays untouched.
    base = random_tensor(rng, size, dtype)
    dst = base.clone()
    set_intervals(packed, dst, pairs, backend=backend)
    want = bits(base).copy()
    for s, e in pairs:
        want[s:e] = bits(src)[s:e]
    np.testing.assert_array_equal(bits(dst), want)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32,
                                   torch.uint8, torch.bool, torch.int16])
def test_other_dtypes(require_backend, backend, dtype):
    require_backend("slice_intervals", backend)
    rng = np.random.default_rng(7)
    src = random_tensor(rng, 200, dtype)
    pairs = [(0, 3), (3, 10), (17, 17), (40, 41), (100, 199)]
    packed = slice_intervals(src, pairs, backend=backend)
    np.testing.assert_array_equal(bits(packed), reference_slice(bits(src), pairs))
    dst = torch.zeros(200, dtype=dtype)
    set_intervals(packed, dst, pairs, backend=backend)
    assert torch.equal(slice_intervals(dst, pairs, backend="python"), packed)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_few_large_intervals(require_backend, backend):
    """Intervals spanning many copy chunks, including the whole buffer."""
    require_backend("slice_intervals", backend)
    src = torch.arange(10_000, dtype=torch.float32)
    for pairs in ([(0, 10_000)], [(1, 4099), (4099, 9000), (9999, 10_000)]):
        packed = slice_intervals(src, pairs, backend=backend)
        assert torch.equal(packed, torch.cat([src[s:e] for s, e in pairs]))
        dst = torch.full_like(src, -1.0)
        set_intervals(packed, dst, pairs, backend=backend)
        assert torch.equal(slice_intervals(dst, pairs, backend="python"), packed)
        assert (dst == -1).sum() == 10_000 - packed.numel()


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_empty_and_single(require_backend, backend):
    require_backend("slice_intervals", backend)
    src = torch.arange(8, dtype=torch.bfloat16)
    for empty in ([], np.zeros((0, 2), np.int64), torch.zeros(0, 2, dtype=torch.int64),
                  [(3, 3)]):
        out = slice_intervals(src, empty, backend=backend)
        assert out.shape == (0,) and out.dtype == torch.bfloat16
        dst = torch.ones(8, dtype=torch.bfloat16)
        set_intervals(out, dst, empty, backend=backend)
        assert torch.equal(dst, torch.ones(8, dtype=torch.bfloat16))
    assert torch.equal(slice_intervals(src, [(2, 5)], backend=backend), src[2:5])
    assert torch.equal(slice_intervals(src, [(0, 8)], backend=backend), src)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_strided_tensors(require_backend, backend):
    require_backend("slice_intervals", backend)
    base = torch.arange(40, dtype=torch.float32)
    src = base[::2]  # 20 elements, stride 2
    pairs = [(1, 4), (4, 6), (10, 20)]
    packed = slice_intervals(src, pairs, backend=backend)
    assert torch.equal(packed, torch.cat([src[1:6], src[10:20]]))
    holder = torch.zeros(20, 2)
    dst = holder[:, 0]  # non-contiguous destination, written in place
    set_intervals(packed, dst, pairs, backend=backend)
    assert torch.equal(holder[:, 0][1:6], src[1:6])
    assert torch.equal(holder[:, 0][10:20], src[10:20])
    assert holder[:, 1].abs().sum() == 0 and holder[0, 0] == 0 and holder[6:10, 0].abs().sum() == 0


# --------------------------------------------------------------------------
# Validation: every backend names the first offending interval.
# --------------------------------------------------------------------------

BAD_INTERVALS = [
    ([(0, 4), (3, 6)], r"interval 1 \(3, 6\) overlaps or precedes interval 0 \(0, 4\)"),
    ([(0, 2), (5, 6), (3, 4)], r"interval 2 \(3, 4\) overlaps or precedes interval 1 \(5, 6\)"),
    ([(0, 2), (4, 3)], r"interval 1 \(4, 3\) has end < start"),
    ([(2, 4), (2, 5)], r"interval 1 \(2, 5\) overlaps"),
    ([(0, 4), (2, 2)], r"interval 1 \(2, 2\) overlaps"),
]


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("pairs,pattern", BAD_INTERVALS)
def test_merge_rejects(require_backend, backend, pairs, pattern):
    require_backend("merge_intervals", backend)
    for container in (pairs, np.array(pairs), torch.tensor(pairs)):
        with pytest.raises(ValueError, match=pattern):
            merge_intervals(container, backend=backend)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
@pytest.mark.parametrize("pairs,pattern", BAD_INTERVALS + [
    ([(0, 4), (6, 11)], r"interval 1 \(6, 11\) is out of bounds \[0, 10\]"),
    ([(-1, 2)], r"interval 0 \(-1, 2\) is out of bounds \[0, 10\]"),
])
def test_copy_rejects(require_backend, backend, pairs, pattern):
    require_backend("slice_intervals", backend)
    src = torch.zeros(10)
    with pytest.raises(ValueError, match=pattern):
        slice_intervals(src, pairs, backend=backend)
    with pytest.raises(ValueError, match=pattern):
        set_intervals(torch.zeros(3), src, pairs, backend=backend)


@pytest.mark.parametrize("backend", COPY_BACKENDS)
def test_size_and_type_errors(require_backend, backend):
    require_backend("slice_intervals", backend)
    src = torch.zeros(10)
    with pytest.raises(ValueError, match="output_size 4 does not match the total interval"):
        slice_intervals(src, [(0, 5)], output_size=4, backend=backend)
    with pytest.raises(ValueError, match="output_size must be non-negative"):
        slice_intervals(src, [], output_size=-1, backend=backend)
    with pytest.raises(ValueError, match="src has 4 elements but the intervals cover 5"):
        set_intervals(torch.zeros(4), src, [(0, 5)], backend=backend)
    with pytest.raises(TypeError, match="dtypes differ"):
        set_intervals(torch.zeros(5, dtype=torch.float16), src, [(0, 5)], backend=backend)
    with pytest.raises(TypeError, match="integers"):
        slice_intervals(src, torch.tensor([[0.0, 2.0]]), backend=backend)
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        slice_intervals(src, [(0, 1, 2)], backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        slice_intervals(src.view(2, 5), [(0, 1)], backend=backend)


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_merge_rejects_malformed_pairs(require_backend, backend):
    require_backend("merge_intervals", backend)
    with pytest.raises(ValueError, match=r"interval 1 must be a \(start, end\) pair"):
        merge_intervals([(0, 1), 5], backend=backend)
    with pytest.raises(ValueError, match=r"interval 0 must be a \(start, end\) pair"):
        merge_intervals([(0, 1, 2)], backend=backend)
    with pytest.raises(TypeError):
        merge_intervals([(0, 1.5)], backend=backend)
