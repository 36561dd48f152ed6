"""The Redis name-resolve backend against a real redis-server started here: processes that find each
other through it, one winner among concurrent writers, the keepalive TTL, and selection by config."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from realhf.base import name_resolve
from realhf.base.name_resolve import NameEntryExistsError

pytest.importorskip("redis", reason="the redis client is not installed (pip install 'realhf[redis]')")
from realhf.base.name_resolve_redis import RedisNameRecordRepository  # noqa: E402

FORK = mp.get_context("fork")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from tests.base.redis_server import RedisServer, find_redis_server

    exe, why = find_redis_server()
    if exe is None:
        pytest.skip(why)
    server = RedisServer(exe, str(tmp_path_factory.mktemp("redis")))
    yield server.url
    server.stop()


@pytest.fixture
def ns():
    return f"t-{uuid.uuid4().hex[:8]}"


_PEER = r"""
import sys
from realhf.base import name_resolve
me, other = sys.argv[1], sys.argv[2]
name_resolve.add(f"peers/{me}", f"addr-of-{me}")
print(name_resolve.wait(f"peers/{other}", timeout=30, poll_frequency=0.01), flush=True)
# Neither exits (removing its peers/ entry) before the other has read it.
name_resolve.add(f"done/{me}", "1", delete_on_exit=False)
name_resolve.wait(f"done/{other}", timeout=30, poll_frequency=0.01)
"""


def test_two_processes_discover_each_other(redis_url, ns):
    # Separate interpreters that select the backend only through the environment, as workers do.
    env = dict(os.environ, REAL_NAME_RESOLVE="redis", REAL_REDIS_URL=redis_url)
    env.pop("REAL_REDIS_KEEPALIVE_TTL", None)
    probe = RedisNameRecordRepository(redis_url, namespace="realhf-name-resolve")
    probe.clear_subtree("peers")
    probe.clear_subtree("done")
    procs = {p: subprocess.Popen([sys.executable, "-c", _PEER, p, q], env=env, stdout=subprocess.PIPE, text=True)
             for p, q in (("a", "b"), ("b", "a"))}
    outs = {p: proc.communicate(timeout=60)[0].strip() for p, proc in procs.items()}
    assert [procs[p].returncode for p in "ab"] == [0, 0]
    assert outs == {"a": "addr-of-b", "b": "addr-of-a"}
    # both exited: their delete_on_exit entries are gone, the permanent ones stay
    assert probe.find_subtree("peers") == [] and probe.find_subtree("done") == ["done/a", "done/b"]
    probe.clear_subtree("done")


def _race(url, ns, idx, out):
    try:
        RedisNameRecordRepository(url, namespace=ns).add("race", f"w{idx}", delete_on_exit=False)
        out.put(idx)
    except NameEntryExistsError:
        out.put(-1)


def test_concurrent_add_has_one_winner(redis_url, ns):
    out = FORK.Queue()
    procs = [FORK.Process(target=_race, args=(redis_url, ns, i, out)) for i in range(5)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=20) for _ in procs)
    for p in procs:
        p.join(10)
    winners = [r for r in results if r >= 0]
    assert len(winners) == 1 and results.count(-1) == 4
    repo = RedisNameRecordRepository(redis_url, namespace=ns)
    assert repo.get("race") == f"w{winners[0]}"
    repo.destroy()


def test_glob_characters_in_keys_match_literally(redis_url, ns):
    repo = RedisNameRecordRepository(redis_url, namespace=ns)
    repo.add("a*/x", "1")
    repo.add("ab/x", "2")
    repo.add("a[b]/x", "3")
    assert repo.find_subtree("a*") == ["a*/x"]
    assert repo.find_subtree("a[b]") == ["a[b]/x"]
    repo.reset()
    assert repo.find_subtree("a*") == [] and repo.find_subtree("ab") == []


def _add_and_hang(url, ns):
    repo = RedisNameRecordRepository(url, namespace=ns, keepalive_ttl=0.6)
    repo.add("alive/worker", "x")
    repo.add("alive/kept", "y", delete_on_exit=False)
    time.sleep(60)


def test_keepalive_ttl_expires_entries_of_a_killed_process(redis_url, ns):
    repo = RedisNameRecordRepository(redis_url, namespace=ns)
    p = FORK.Process(target=_add_and_hang, args=(redis_url, ns))
    p.start()
    repo.wait("alive/worker", timeout=20, poll_frequency=0.01)
    time.sleep(1.5)  # longer than the TTL: the child's keepalive thread renews it
    assert repo.get("alive/worker") == "x"
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    deadline = time.monotonic() + 10
    while repo.find_subtree("alive/worker") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert repo.find_subtree("alive") == ["alive/kept"]  # only the permanent entry outlives the process
    repo.destroy()


def test_selected_by_env_and_registry(redis_url, ns, monkeypatch):
    monkeypatch.setenv("REAL_REDIS_URL", redis_url)
    repo = name_resolve.make_repository("redis", namespace=ns)
    assert isinstance(repo, RedisNameRecordRepository) and repo.url == redis_url and repo.ping()
    old = name_resolve._default_repo
    try:
        name_resolve.reconfigure("redis", namespace=ns)
        name_resolve.add("m/a", "1")
        assert repo.get("m/a") == "1"
    finally:
        name_resolve._default_repo = old
    repo.destroy()


def test_quickstart_name_resolve_options(monkeypatch):
    from realhf.api.quickstart.base import ConfigError
    from realhf.api.quickstart.experiment import CommonExperimentConfig

    monkeypatch.delenv("REAL_REDIS_URL", raising=False)
    cfg = CommonExperimentConfig(experiment_name="e", trial_name="t", n_gpus_per_node=1)
    cfg.validate()
    cfg.name_resolve = "redis"
    with pytest.raises(ConfigError, match="name_resolve_address=None is not a Redis URL"):
        cfg.validate()
    cfg.name_resolve_address = "redis://head:6379/0"
    cfg.validate()
    cfg.name_resolve = "etcd"
    with pytest.raises(ConfigError, match="name_resolve='etcd' is not allowed"):
        cfg.validate()
    cfg.name_resolve = "file"
    with pytest.raises(ConfigError, match="only used with name_resolve=redis"):
        cfg.validate()
