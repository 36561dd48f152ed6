"""How the master splits a call's items over its dp ranks."""

from __future__ import annotations

import random

from realhf.system.master_worker import assign_by_load


def _loads(parts, size):
    return [sum(size[i] for i in p) for p in parts]


def test_without_locality_loads_stay_within_one_item():
    rng = random.Random(0)
    ids = [f"x{n}" for n in range(40)]
    size = {i: rng.randint(10, 60) for i in ids}
    parts = assign_by_load(ids, size, 3, lambda i, j: 0)
    assert sorted(i for p in parts for i in p) == sorted(ids)
    loads = _loads(parts, size)
    assert max(loads) - min(loads) <= max(size.values())
    for p in parts:  # each part keeps the caller's order
        assert p == [i for i in ids if i in p]


def test_items_stay_where_they_were_produced_when_balance_allows():
    """Generation on 2 dp ranks, then a call on the same ranks: nothing moves."""
    rng = random.Random(1)
    ids = [f"x{n}" for n in range(16)]
    size = {i: 42 + rng.randint(0, 18) for i in ids}
    home = {i: n % 2 for n, i in enumerate(ids)}
    parts = assign_by_load(ids, size, 2, lambda i, j: size[i] if home[i] == j else 0)
    moved = [i for j, p in enumerate(parts) for i in p if home[i] != j]
    assert len(moved) <= 1
    loads = _loads(parts, size)
    assert max(loads) - min(loads) <= max(size.values())


def test_locality_never_costs_more_than_one_item_of_imbalance():
    """Every item lives on rank 0: locality alone would put all of them there."""
    ids = [f"x{n}" for n in range(12)]
    size = {i: 50 for i in ids}
    parts = assign_by_load(ids, size, 2, lambda i, j: 1 if j == 0 else 0)
    loads = _loads(parts, size)
    assert max(loads) - min(loads) <= 50
    assert len(parts[0]) in (6, 7)
