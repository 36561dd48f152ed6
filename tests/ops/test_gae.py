"""gae_1d on every CPU backend against a scalar reference written out in loops."""

from typing import List, Tuple

import numpy as np
import pytest
import torch

from realhf.impl.ops import gae_1d

BACKENDS = ("python", "cpp", "triton")
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.0, 0.7), (0.5, 1.0)]


def reference_gae(rewards: List[float], values: List[float], cu: List[int],
                  truncate: List[bool], gamma: float,
                  lam: float) -> Tuple[List[float], List[float]]:
    """Straightforward per-sequence backward loop in Python floats."""
    adv = [0.0] * len(rewards)
    ret = [0.0] * len(rewards)
    for i in range(len(cu) - 1):
        v = values[cu[i]:cu[i + 1]]
        r0 = cu[i] - i
        steps = len(v) - 1
        gae = 0.0
        for t in reversed(range(steps)):
            if t + 1 < steps:
                next_v = v[t + 1]
            else:
                next_v = v[steps] if truncate[i] else 0.0
            delta = rewards[r0 + t] + gamma * next_v - v[t]
            gae = delta + gamma * lam * gae
            adv[r0 + t] = gae
            ret[r0 + t] = gae + v[t]
    return adv, ret


def random_batch(rng: np.random.Generator, lengths: List[int]):
    """Packed rewards/values/cu_seqlens/truncate for sequences of these lengths."""
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.uniform(-1, 1, int(cu[-1])).astype(np.float32)
    rewards = rng.uniform(-1, 1, int(cu[-1]) - len(lengths)).astype(np.float32)
    truncate = rng.random(len(lengths)) < 0.5
    if len(lengths) >= 2:
        truncate[:2] = [True, False]  # both kinds in every batch
    return (torch.from_numpy(rewards), torch.from_numpy(values),
            torch.from_numpy(cu), torch.from_numpy(truncate))


def check_against_reference(backend, rewards, values, cu, truncate, gamma, lam,
                            tol=1e-5):
    adv, ret = gae_1d(rewards, values, cu, truncate, gamma, lam, backend=backend)
    ref_adv, ref_ret = reference_gae(rewards.double().tolist(), values.double().tolist(),
                                     cu.tolist(), truncate.tolist(), gamma, lam)
    assert adv.shape == rewards.shape and adv.dtype == rewards.dtype
    assert ret.shape == rewards.shape and ret.dtype == rewards.dtype
    expected = torch.tensor(ref_adv, dtype=torch.float64)
    torch.testing.assert_close(adv.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(ret.double(), torch.tensor(ref_ret, dtype=torch.float64),
                               rtol=tol, atol=tol)
    return adv, ret


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_gae_random(require_backend, backend, gamma, lam):
    require_backend("gae_1d", backend)
    rng = np.random.default_rng(int(gamma * 100 + lam * 10))
    lengths = [1, 2, 1, 2, 3] + rng.integers(1, 40, 27).tolist()
    rng.shuffle(lengths)
    check_against_reference(backend, *random_batch(rng, lengths), gamma, lam)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_hand_computed(require_backend, backend):
    require_backend("gae_1d", backend)
    # Sequence 0: terminal, T=2.  Sequence 1: truncated, T=1.  Sequence 2: L=1.
    values = torch.tensor([1.0, 2.0, 9.0, 3.0, 4.0, 5.0])
    rewards = torch.tensor([0.5, 1.0, 2.0])
    cu = torch.tensor([0, 3, 5, 6])
    truncate = torch.tensor([False, True, False])
    g, lam = 0.5, 0.5
    # seq 0, t=1: next_v = 0 (terminal) -> delta = 1 - 2 = -1, gae = -1
    #        t=0: delta = 0.5 + 0.5*2 - 1 = 0.5, gae = 0.5 + 0.25*(-1) = 0.25
    # seq 1, t=0: next_v = 4 (bootstrap) -> delta = 2 + 2 - 3 = 1
    adv, ret = gae_1d(rewards, values, cu, truncate, g, lam, backend=backend)
    assert torch.allclose(adv, torch.tensor([0.25, -1.0, 1.0]))
    assert torch.allclose(ret, torch.tensor([1.25, 1.0, 4.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_long_sequences(require_backend, backend):
    require_backend("gae_1d", backend)
    rng = np.random.default_rng(3)
    count = 6 if backend == "triton" else 200
    lengths = rng.integers(1, 300, count).tolist()
    check_against_reference(backend, *random_batch(rng, lengths), 0.99, 0.95)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_dtypes_and_index_types(require_backend, backend):
    require_backend("gae_1d", backend)
    rng = np.random.default_rng(5)
    rewards, values, cu, truncate = random_batch(rng, [4, 1, 2, 7, 3])
    base_adv, base_ret = gae_1d(rewards, values, cu, truncate, 0.9, 0.8, backend="python")
    adv, ret = gae_1d(rewards, values, cu.int(), truncate, 0.9, 0.8, backend=backend)
    torch.testing.assert_close(adv, base_adv, rtol=1e-6, atol=1e-6)
    adv, ret = gae_1d(rewards.double(), values.double(), cu, truncate, 0.9, 0.8,
                      backend=backend)
    assert adv.dtype == torch.float64
    check_against_reference(backend, rewards.double(), values.double(), cu, truncate,
                            0.9, 0.8, tol=1e-12)
    for half in (torch.float16, torch.bfloat16):
        adv, ret = gae_1d(rewards.to(half), values.to(half), cu, truncate, 0.9, 0.8,
                          backend=backend)
        assert adv.dtype == half and ret.dtype == half
        torch.testing.assert_close(adv.float(), base_adv, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_degenerate_batches(require_backend, backend):
    require_backend("gae_1d", backend)
    empty = torch.zeros(0)
    adv, ret = gae_1d(empty, empty, torch.zeros(1, dtype=torch.long),
                      torch.zeros(0, dtype=torch.bool), 0.9, 0.9, backend=backend)
    assert adv.shape == (0,) and ret.shape == (0,)
    # Only bootstrap values, no steps.
    adv, ret = gae_1d(empty, torch.ones(3), torch.tensor([0, 1, 2, 3]),
                      torch.tensor([True, False, True]), 0.9, 0.9, backend=backend)
    assert adv.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,error,pattern", [
    ("first", ValueError, r"cu_seqlens\[0\] must be 0, got 1"),
    ("empty_seq", ValueError, r"sequence 1 has length 0 \(cu_seqlens\[1\]=3, cu_seqlens\[2\]=3\)"),
    ("values", ValueError, "values has 7 elements but cu_seqlens\\[-1\\] is 6"),
    ("rewards", ValueError, r"rewards has 4 elements but the sequences need sum\(L_i - 1\) = 3"),
    ("truncate_shape", ValueError, r"truncate must have shape \[3\]"),
    ("truncate_dtype", TypeError, "truncate must be bool"),
    ("cu_dtype", TypeError, "cu_seqlens must be integers"),
    ("rank", ValueError, "rewards must be 1-D"),
])
def test_gae_rejects(require_backend, backend, case, error, pattern):
    require_backend("gae_1d", backend)
    values = torch.zeros(6)
    rewards = torch.zeros(3)
    cu = torch.tensor([0, 3, 5, 6])
    truncate = torch.tensor([True, False, True])
    if case == "first":
        cu = torch.tensor([1, 3, 5, 6])
    elif case == "empty_seq":
        cu = torch.tensor([0, 3, 3, 6])
        rewards = torch.zeros(4)
    elif case == "values":
        values = torch.zeros(7)
        rewards = torch.zeros(4)
    elif case == "rewards":
        rewards = torch.zeros(4)
    elif case == "truncate_shape":
        truncate = torch.tensor([True, False])
    elif case == "truncate_dtype":
        truncate = torch.tensor([1, 0, 1])
    elif case == "cu_dtype":
        cu = cu.float()
    elif case == "rank":
        rewards = rewards.view(3, 1)
    with pytest.raises(error, match=pattern):
        gae_1d(rewards, values, cu, truncate, 0.9, 0.9, backend=backend)
