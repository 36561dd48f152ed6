import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from realhf.base import stats_tracker
from realhf.base.stats_tracker import ReduceType, StatsTracker
from realhf.base.testing import run_distributed


def test_scalar_mean_over_calls():
    t = StatsTracker()
    t.scalar(loss=1.0, acc=0.5)
    t.scalar(loss=3.0)
    t.scalar(loss=torch.tensor(5.0))
    assert t.export() == {"acc": 0.5, "loss": 3.0}
    assert t.export() == {}  # reset by default


def test_reduce_types_with_tensors():
    t = StatsTracker()
    t.record("n", torch.tensor([1.0, 2.0, 3.0]), ReduceType.SUM)
    t.record("n", 4, ReduceType.SUM)
    t.record("lo", np.array([3.0, -2.0]), ReduceType.MIN)
    t.record("lo", torch.tensor(-1.0), ReduceType.MIN)
    t.record("hi", [3.0, 9.0], ReduceType.MAX)
    t.record("avg", torch.tensor([1.0, 2.0]))
    t.record("avg", torch.tensor(6.0))
    assert t.export(reset=False) == {"avg": 3.0, "hi": 9.0, "lo": -2.0, "n": 10.0}
    assert t.export() == {"avg": 3.0, "hi": 9.0, "lo": -2.0, "n": 10.0}


def test_empty_values():
    t = StatsTracker()
    t.record("s", torch.zeros(0), ReduceType.SUM)
    t.record("m", torch.zeros(0))
    t.record("x", [], ReduceType.MAX)
    assert t.export() == {"s": 0.0}


def test_mixed_reduce_types_rejected():
    t = StatsTracker()
    t.record("a", 1.0, ReduceType.SUM)
    with pytest.raises(ValueError, match="recorded with SUM, now MAX"):
        t.record("a", 1.0, ReduceType.MAX)


def test_scopes():
    t = StatsTracker()
    with t.scope("ppo"):
        t.scalar(kl=0.1)
        with t.scope("actor"):
            t.scalar(loss=2.0)
        t.scalar(clip=0.3)
    t.scalar(top=1.0)
    assert t.export() == {"ppo/kl": 0.1, "ppo/actor/loss": 2.0, "ppo/clip": 0.3, "top": 1.0}


def test_masked_statistics():
    t = StatsTracker()
    mask = torch.tensor([True, False, True, True])
    t.denominator(n_tokens=mask)
    t.stat(denominator="n_tokens", ratio=torch.tensor([1.0, 100.0, 2.0, 3.0]))
    t.stat("n_tokens", ReduceType.MAX, ratio_max=torch.tensor([1.0, 100.0, 2.0, 3.0]))
    t.denominator(n_tokens=torch.tensor([False, True]))
    t.stat(denominator="n_tokens", ratio=torch.tensor([50.0, 10.0]))
    with t.scope("inner"):
        # Falls back to the unscoped denominator.
        t.stat(denominator="n_tokens", ratio=torch.tensor([7.0, 14.0]))
    out = t.export()
    # Token-weighted: (1 + 2 + 3 + 10) / 4, not the mean of per-call means.
    assert out["ratio"] == pytest.approx(4.0)
    assert out["ratio_max"] == 3.0
    assert out["n_tokens"] == 4.0
    assert out["inner/ratio"] == 14.0


def test_masked_statistics_errors():
    t = StatsTracker()
    t.denominator(mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="has 2 elements"):
        t.stat(denominator="mask", x=torch.ones(2))
    with pytest.raises(KeyError, match="Unknown denominator 'other'"):
        t.stat(denominator="other", x=torch.ones(3))
    t.denominator(empty=torch.zeros(3, dtype=torch.bool))
    t.stat(denominator="empty", y=torch.ones(3))
    out = t.export()
    assert "y" not in out and out["empty"] == 0.0
    with pytest.raises(KeyError):  # denominators are reset with the stats
        t.stat(denominator="mask", x=torch.ones(3))


def test_module_level_default_tracker():
    stats_tracker.reset()
    with stats_tracker.scope("s"):
        stats_tracker.scalar(a=1.0)
        stats_tracker.scalar(a=2.0)
        stats_tracker.record("b", 5.0, ReduceType.SUM)
        stats_tracker.denominator(m=torch.tensor([True, False]))
        stats_tracker.stat(denominator="m", c=torch.tensor([4.0, 8.0]))
    assert stats_tracker.export() == {"s/a": 1.5, "s/b": 5.0, "s/c": 4.0, "s/m": 1.0}
    assert stats_tracker.DEFAULT_TRACKER.export() == {}


# ---------------------------------------------------------------------- #
# Cross-rank export.
# ---------------------------------------------------------------------- #
def _rank_data(rank):
    """What each rank records: rank r contributes r + 1 elements of value
    10 * r + j, and only odd ranks record "odd_only"."""
    values = [10.0 * rank + j for j in range(rank + 1)]
    mask = [j % 2 == 0 for j in range(rank + 2)]
    masked = [float(rank * 100 + j) for j in range(rank + 2)]
    return values, mask, masked


def _expected(world_size):
    all_vals, sel = [], []
    for r in range(world_size):
        values, mask, masked = _rank_data(r)
        all_vals += values
        sel += [v for v, m in zip(masked, mask) if m]
    exp = {
        "mean": sum(all_vals) / len(all_vals),
        "sum": sum(all_vals),
        "min": min(all_vals),
        "max": max(all_vals),
        "tok": float(len(sel)),
        "masked": sum(sel) / len(sel),
    }
    odd = [float(r) for r in range(world_size) if r % 2 == 1]
    if odd:
        exp["odd_only"] = sum(odd) / len(odd)
        exp["odd_sum"] = sum(odd)
    return exp


def _export_over_group(rank, world_size):
    t = StatsTracker()
    values, mask, masked = _rank_data(rank)
    t.record("mean", torch.tensor(values))
    t.record("sum", torch.tensor(values), ReduceType.SUM)
    t.record("min", torch.tensor(values), ReduceType.MIN)
    t.record("max", torch.tensor(values), ReduceType.MAX)
    t.denominator(tok=torch.tensor(mask))
    t.stat(denominator="tok", masked=torch.tensor(masked))
    if rank % 2 == 1:
        t.scalar(odd_only=float(rank))
        t.record("odd_sum", float(rank), ReduceType.SUM)
    return t.export(group=dist.group.WORLD)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_export_across_ranks(world_size):
    results = run_distributed(_export_over_group, world_size, timeout=60)
    expected = _expected(world_size)
    for out in results:
        assert out.keys() == expected.keys()
        for key, value in expected.items():
            assert math.isclose(out[key], value), (key, out[key], value)


def _conflicting_reduce(rank, world_size):
    t = StatsTracker()
    t.record("x", 1.0, ReduceType.SUM if rank == 0 else ReduceType.MAX)
    t.export(group=dist.group.WORLD)


@pytest.mark.distributed
def test_export_detects_inconsistent_reduce_types():
    with pytest.raises(RuntimeError, match="reduced with"):
        run_distributed(_conflicting_reduce, 2, timeout=30)
