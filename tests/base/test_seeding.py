import multiprocessing as mp
import pickle
import random

import numpy as np
import pytest
import torch

from realhf.base import seeding


def _draw():
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


@pytest.fixture(autouse=True)
def _restore_rng():
    state = seeding.get_rng_state()
    yield
    seeding.set_rng_state(state)


def test_same_seed_and_key_reproduce():
    seeding.set_random_seed(7, "model_worker/0")
    a = _draw()
    seeding.set_random_seed(7, "model_worker/0")
    assert _draw() == a


def test_keys_and_seeds_give_different_streams():
    draws = {}
    for seed, key in [(7, "w0"), (7, "w1"), (8, "w0"), (7, "")]:
        seeding.set_random_seed(seed, key)
        draws[(seed, key)] = _draw()
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            for stream_i, stream_j in zip(values[i], values[j]):
                assert stream_i != stream_j


def test_empty_key_matches_plain_seeding():
    seeding.set_random_seed(123)
    ours = _draw()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert _draw() == ours
    assert seeding.get_seed() == 123 and seeding.get_base_seed() == 123


def test_derived_seed_is_stable_and_bounded():
    # SHA-256 based: these values must never change across versions, or
    # resumed experiments would draw different data.
    assert seeding.derive_seed(1, "actor") == 369868787
    assert seeding.derive_seed(42, "model_worker/0") == 1639711184
    assert seeding.derive_seed(2**40 + 5, "") == 5
    for seed in range(20):
        for key in ("", "a", "model_worker/3"):
            assert 0 <= seeding.derive_seed(seed, key) < 2**32
    derived = seeding.set_random_seed(1, "actor")
    assert derived == seeding.get_seed() == seeding.derive_seed(1, "actor")
    assert seeding.get_base_seed() == 1 and seeding.get_seed_key() == "actor"


def _child_draw(seed, key, out):
    torch.set_num_threads(1)
    seeding.set_random_seed(seed, key)
    out.put(_draw())


def test_derivation_identical_in_another_process():
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child_draw, args=(3, "w1", out))
    p.start()
    child = out.get(timeout=30)
    p.join(30)
    seeding.set_random_seed(3, "w1")
    assert _draw() == child


def test_rng_state_roundtrip():
    seeding.set_random_seed(99, "k")
    _draw()
    state = pickle.loads(pickle.dumps(seeding.get_rng_state()))
    expected = _draw()
    seeding.set_random_seed(5, "other")
    _draw()
    seeding.set_rng_state(state)
    assert _draw() == expected
    assert seeding.get_seed() == seeding.derive_seed(99, "k")
    assert seeding.get_base_seed() == 99 and seeding.get_seed_key() == "k"


def test_rng_state_without_cuda_entry_loads():
    seeding.set_random_seed(4)
    state = seeding.get_rng_state()
    state["cuda"] = None
    expected = _draw()
    seeding.set_rng_state(state)
    assert _draw() == expected
