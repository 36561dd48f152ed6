"""RewardPool: process-pool scoring, fallbacks, timeouts and cleanup."""

import multiprocessing as mp
import os
import textwrap
import time

import pytest

from realhf.impl.reward.pool import RewardError, RewardPool

USER_FILE = textwrap.dedent('''
    import os
    import time

    def score(prompt, completion, reference=None):
        return float(len(completion) % 7) + (0.5 if prompt.endswith("?") else 0.0)

    def flaky(prompt, completion):
        if "boom" in completion:
            raise RuntimeError("exploded on " + completion)
        return 2.0

    def stall(prompt, completion):
        if completion == "sleep":
            time.sleep(10_000)
        if completion == "loop":
            while True:
                pass
        if completion == "exit":
            os._exit(3)
        return 1.0

    def pid(prompt, completion):
        return float(os.getpid())
''')

TIMEOUT = 1.0
# A pool that failed to enforce its timeouts would hang; fail fast instead.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "pool_rewards.py"
    path.write_text(USER_FILE)
    return str(path)


def custom(path, fn, weight=1.0):
    return {"name": "custom", "path": path, "function": fn, "weight": weight}


def our_children():
    return [p for p in mp.active_children() if p.name.startswith("realhf-reward-worker")]


def test_pool_matches_in_process_scoring(user_file):
    spec = ["math", {"name": "format", "weight": 0.1}, custom(user_file, "score", 0.01)]
    items = [(f"Question {i}?" if i % 2 else f"Q{i}", c, {"reference": str(i % 5), "id": i})
             for i, c in enumerate(["\\boxed{%d}" % (k % 4) if k % 3 else "the result is %d" % k
                                    for k in range(40)])]
    with RewardPool(spec, n_workers=0) as inline, RewardPool(spec, n_workers=2, timeout_s=5) as pool:
        expected = inline.score(items)
        assert pool.score(items) == expected
        assert pool.score(items[::-1]) == expected[::-1]
        assert pool.stats["scored"] == 80 and pool.stats["workers_started"] == 2
    assert any(v >= 1.0 for v in expected) and any(v < 0.2 for v in expected)


def test_raising_reward_gives_default_and_counts(user_file):
    items = [("p", c, {}) for c in ["a", "boom1", "b", "boom2"]]
    for n_workers in (0, 2):
        with RewardPool(custom(user_file, "flaky"), n_workers=n_workers, default=-1.0) as pool:
            assert pool.score(items) == [2.0, -1.0, 2.0, -1.0]
            stats = pool.stats
            assert stats["fallback"] == 2 and stats["exceptions"] == 2 and stats["scored"] == 2


@pytest.mark.parametrize("n_workers", [0, 2])
def test_raising_reward_without_default_names_item_function_and_cause(user_file, n_workers):
    items = [("p", c, {}) for c in ["a", "b", "boom!", "c"]]
    with RewardPool(custom(user_file, "flaky"), n_workers=n_workers) as pool:
        with pytest.raises(RewardError) as e:
            pool.score(items, ids=["i0", "i1", "i2", "i3"])
        err = e.value
        assert (err.index, err.item_id) == (2, "i2")
        assert err.function == f"custom:flaky@{user_file}"
        assert "RuntimeError: exploded on boom!" in err.cause
        assert "item 2 (id 'i2')" in str(err) and "flaky" in str(err)
        assert pool.score(items[:2]) == [2.0, 2.0]  # still usable


def test_sleeping_and_looping_rewards_time_out_and_workers_are_replaced(user_file):
    items = [("p", c, {}) for c in ["ok", "sleep", "ok", "loop", "ok"]]
    with RewardPool(custom(user_file, "stall"), n_workers=2, timeout_s=TIMEOUT, default=0.0) as pool:
        t0 = time.monotonic()
        assert pool.score(items) == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert time.monotonic() - t0 < TIMEOUT + 2
        stats = pool.stats
        assert stats["timeouts"] == 2 and stats["fallback"] == 2 and stats["workers_started"] == 4
        assert len(our_children()) == 2
        t0 = time.monotonic()
        assert pool.score([("p", "ok", {})] * 6) == [1.0] * 6
        assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("stuck", ["sleep", "loop"])
def test_timeout_without_default_raises_naming_the_cause(user_file, stuck):
    with RewardPool(["format", custom(user_file, "stall")], n_workers=1, timeout_s=TIMEOUT) as pool:
        t0 = time.monotonic()
        with pytest.raises(RewardError) as e:
            pool.score([("p", "ok", {}), ("p", stuck, {})], ids=["a", "b"])
        assert time.monotonic() - t0 < TIMEOUT + 2
        assert (e.value.index, e.value.item_id) == (1, "b")
        assert e.value.function == f"custom:stall@{user_file}"  # the mixture's second function
        assert e.value.cause == f"timed out after {TIMEOUT:g} s"
        assert pool.score([("p", "ok", {})]) == [1.0]


def test_worker_that_dies_is_reported_and_replaced(user_file):
    with RewardPool(custom(user_file, "stall"), n_workers=1, timeout_s=5, default=-5.0) as pool:
        assert pool.score([("p", "exit", {}), ("p", "ok", {})]) == [-5.0, 1.0]
        assert pool.stats["worker_deaths"] == 1
    with RewardPool(custom(user_file, "stall"), n_workers=1) as pool:
        with pytest.raises(RewardError, match="worker process died \\(exit code 3\\)"):
            pool.score([("p", "exit", {})])


def test_scoring_runs_in_workers_and_close_leaves_no_process(user_file):
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pool = RewardPool(custom(user_file, "pid"), n_workers=2, timeout_s=5)
    pids = {int(v) for v in pool.score([("p", "c", {})] * 8)}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert len(our_children()) == 2
    pool.close()
    pool.close()  # idempotent
    assert our_children() == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([("p", "c", {})])


def test_close_after_timeouts_leaves_no_process(user_file):
    pool = RewardPool(custom(user_file, "stall"), n_workers=2, timeout_s=TIMEOUT, default=0.0)
    pool.score([("p", "loop", {}), ("p", "sleep", {})])
    pool.close()
    assert our_children() == []


def test_spawned_workers_load_user_functions_by_path(user_file):
    # A spawned worker imports realhf first (longer than TIMEOUT): startup is not a timed call.
    with RewardPool(custom(user_file, "flaky"), n_workers=1, timeout_s=TIMEOUT, default=0.0,
                    mp_context="spawn") as pool:
        assert pool.score([("p", "x", {}), ("p", "boom", {})]) == [2.0, 0.0]
        assert pool.stats["timeouts"] == 0 and pool.stats["exceptions"] == 1
    assert our_children() == []


def test_argument_checks(user_file):
    with pytest.raises(ValueError, match="n_workers"):
        RewardPool("math", n_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool("math", timeout_s=0)
    with RewardPool("math", n_workers=0) as pool:
        with pytest.raises(ValueError, match="2 items but 1 ids"):
            pool.score([("p", "1", {"reference": "1"})] * 2, ids=["a"])
