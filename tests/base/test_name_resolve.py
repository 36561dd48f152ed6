import multiprocessing as mp
import os
import threading
import time

import pytest

from realhf.base import constants, name_resolve, names
from realhf.base.name_resolve import (
    FileNameRecordRepository,
    MemoryNameRecordRepository,
    NameEntryExistsError,
    NameEntryNotFoundError,
)

FORK = mp.get_context("fork")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """URL of a Redis server started for this module (skips when none can be started)."""
    pytest.importorskip("redis", reason="the redis client is not installed (pip install 'realhf[redis]')")
    from tests.base.redis_server import RedisServer, find_redis_server

    exe, why = find_redis_server()
    if exe is None:
        pytest.skip(why)
    server = RedisServer(exe, str(tmp_path_factory.mktemp("redis")))
    yield server.url
    server.stop()


@pytest.fixture(params=["memory", "file", "redis"])
def repo(request, tmp_path):
    if request.param == "memory":
        r = MemoryNameRecordRepository()
    elif request.param == "file":
        r = FileNameRecordRepository(str(tmp_path / "nr"))
    else:
        from realhf.base.name_resolve_redis import RedisNameRecordRepository

        url = request.getfixturevalue("redis_url")
        r = RedisNameRecordRepository(url, namespace=f"test-{os.getpid()}-{time.monotonic_ns()}")
    yield r
    r.reset()
    if request.param == "redis":
        r.destroy()


def test_add_get_replace(repo):
    repo.add("a/b", "v1")
    assert repo.get("a/b") == "v1"
    with pytest.raises(NameEntryExistsError):
        repo.add("a/b", "v2")
    assert repo.get("a/b") == "v1"
    repo.add("a/b", "v3", replace=True)
    assert repo.get("a/b") == "v3"
    repo.add("a/n", 42)
    assert repo.get("a/n") == "42"
    with pytest.raises(NameEntryNotFoundError):
        repo.get("a/missing")


def test_parent_and_child_keys_coexist(repo):
    repo.add("x", "parent")
    repo.add("x/y", "child")
    assert repo.get("x") == "parent" and repo.get("x/y") == "child"
    repo.delete("x")
    assert repo.get("x/y") == "child"
    with pytest.raises(NameEntryNotFoundError):
        repo.get("x")


def test_key_normalization(repo):
    repo.add("/a//b/c/", "v")
    assert repo.get("a/b/c") == "v"
    assert repo.find_subtree("a/") == ["a/b/c"]
    for bad in ("", "/", "a/../b", "./a"):
        with pytest.raises(ValueError):
            repo.add(bad, "v")


def test_subtree(repo):
    repo.add("r/w/1", "one")
    repo.add("r/w/0", "zero")
    repo.add("r/w", "self")
    repo.add("r/wx", "sibling")
    repo.add("r/w/deep/2", "two")
    assert repo.find_subtree("r/w") == ["r/w", "r/w/0", "r/w/1", "r/w/deep/2"]
    assert repo.get_subtree("r/w") == ["self", "zero", "one", "two"]
    assert repo.find_subtree("r/none") == []
    assert repo.get_subtree("r/none") == []


def test_add_subentry(repo):
    k1 = repo.add_subentry("peers", "p1")
    k2 = repo.add_subentry("peers", "p2")
    assert k1 != k2
    assert k1.startswith("peers/") and k2.startswith("peers/")
    assert sorted(repo.get_subtree("peers")) == ["p1", "p2"]
    assert repo.get(k1) == "p1"


def test_delete_and_clear(repo):
    repo.add("t/a", "1")
    repo.add("t/b/c", "2")
    repo.add("u/a", "3")
    repo.delete("t/a")
    with pytest.raises(NameEntryNotFoundError):
        repo.delete("t/a")
    repo.clear_subtree("t")
    assert repo.find_subtree("t") == []
    assert repo.get("u/a") == "3"


def test_reset_deletes_only_owned(repo):
    repo.add("k/temp", "1")
    repo.add("k/keep", "2", delete_on_exit=False)
    repo.reset()
    assert repo.find_subtree("k") == ["k/keep"]
    repo.reset()  # nothing left to delete; must not fail


def test_reset_skips_entries_deleted_meanwhile(repo):
    repo.add("k/a", "1")
    repo.delete("k/a")
    repo.add("k/b", "1")
    repo.clear_subtree("k")
    repo.reset()
    assert repo.find_subtree("k") == []


def test_wait_returns_value_added_later(repo):
    def later():
        time.sleep(0.2)
        repo.add("late/key", "hello")

    t = threading.Thread(target=later)
    t.start()
    assert repo.wait("late/key", timeout=10, poll_frequency=0.01) == "hello"
    t.join()


def test_wait_timeout_names_key(repo):
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        repo.wait("never/here", timeout=0.2, poll_frequency=0.02)
    assert time.monotonic() - start < 2
    assert "never/here" in str(info.value) and "0.2" in str(info.value)


# ---------------------------------------------------------------------- #
# File backend specifics.
# ---------------------------------------------------------------------- #
def test_file_layout_and_pruning(tmp_path):
    root = tmp_path / "nr"
    repo = FileNameRecordRepository(str(root))
    repo.add("u/e/t/status/w0", "RUNNING")
    assert (root / "u/e/t/status/w0/ENTRY").read_text() == "RUNNING"
    assert not [p for p in (root / "u/e/t/status/w0").iterdir() if p.name != "ENTRY"]
    repo.delete("u/e/t/status/w0")
    assert list(root.iterdir()) == []  # empty directories are pruned
    with pytest.raises(ValueError):
        repo.add("a/ENTRY", "x")


def test_file_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("REAL_FILEROOT", str(tmp_path))
    repo = FileNameRecordRepository()
    assert repo.fileroot == os.path.join(str(tmp_path), "name_resolve")
    assert os.path.isdir(repo.fileroot)


def test_file_instances_share_state(tmp_path):
    a = FileNameRecordRepository(str(tmp_path))
    b = FileNameRecordRepository(str(tmp_path))
    a.add("s/k", "v")
    assert b.get("s/k") == "v"
    with pytest.raises(NameEntryExistsError):
        b.add("s/k", "w")


def _child_add_later(root, key, value, delay):
    time.sleep(delay)
    FileNameRecordRepository(root).add(key, value, delete_on_exit=False)


def _child_wait(root, key, out):
    try:
        out.put(FileNameRecordRepository(root).wait(key, timeout=10, poll_frequency=0.01))
    except Exception as e:  # reported to the parent
        out.put(repr(e))


def test_cross_process_wait(tmp_path):
    root = str(tmp_path)
    repo = FileNameRecordRepository(root)
    p = FORK.Process(target=_child_add_later, args=(root, "x/master", "1.2.3.4:5", 0.2))
    p.start()
    assert repo.wait("x/master", timeout=10, poll_frequency=0.01) == "1.2.3.4:5"
    p.join(10)
    assert p.exitcode == 0

    out = FORK.Queue()
    p = FORK.Process(target=_child_wait, args=(root, "x/reply", out))
    p.start()
    time.sleep(0.1)
    repo.add("x/reply", "pong")
    assert out.get(timeout=10) == "pong"
    p.join(10)


def _child_race(root, key, idx, out):
    try:
        FileNameRecordRepository(root).add(key, f"writer{idx}", delete_on_exit=False)
        out.put(idx)
    except NameEntryExistsError:
        out.put(-1)


def test_concurrent_add_has_one_winner(tmp_path):
    root = str(tmp_path)
    out = FORK.Queue()
    procs = [FORK.Process(target=_child_race, args=(root, "race", i, out)) for i in range(6)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=10) for _ in procs)
    for p in procs:
        p.join(10)
    winners = [r for r in results if r >= 0]
    assert len(winners) == 1 and results.count(-1) == 5
    assert FileNameRecordRepository(root).get("race") == f"writer{winners[0]}"


def _child_rewrite(root, n):
    repo = FileNameRecordRepository(root)
    for i in range(n):
        repo.add("atomic", chr(ord("a") + i % 26) * 20000, replace=True, delete_on_exit=False)


def test_readers_never_see_partial_values(tmp_path):
    root = str(tmp_path)
    repo = FileNameRecordRepository(root)
    repo.add("atomic", "z" * 20000, delete_on_exit=False)
    p = FORK.Process(target=_child_rewrite, args=(root, 200))
    p.start()
    seen = set()
    while p.is_alive():
        value = repo.get("atomic")
        assert len(value) == 20000 and len(set(value)) == 1
        seen.add(value[0])
    p.join()
    assert p.exitcode == 0
    seen.add(repo.get("atomic")[0])
    assert len(seen) > 1


def _child_reset(root, out):
    repo_in_child = _PARENT_REPO[0]
    repo_in_child.reset()
    out.put(FileNameRecordRepository(root).find_subtree("owned"))


_PARENT_REPO = []


def test_forked_child_reset_keeps_parent_entries(tmp_path):
    root = str(tmp_path)
    repo = FileNameRecordRepository(root)
    repo.add("owned/parent", "1")
    _PARENT_REPO[:] = [repo]
    out = FORK.Queue()
    p = FORK.Process(target=_child_reset, args=(root, out))
    p.start()
    assert out.get(timeout=10) == ["owned/parent"]
    p.join(10)
    repo.reset()
    assert repo.find_subtree("owned") == []


# ---------------------------------------------------------------------- #
# Registry and module-level default repository.
# ---------------------------------------------------------------------- #
def test_backend_registry(tmp_path):
    assert isinstance(name_resolve.make_repository("memory"), MemoryNameRecordRepository)
    nfs = name_resolve.make_repository("nfs", fileroot=str(tmp_path))
    assert isinstance(nfs, FileNameRecordRepository)
    with pytest.raises(ValueError, match="Unknown name-resolve backend"):
        name_resolve.make_repository("etcd9")


def test_module_level_functions(tmp_path):
    old = name_resolve._default_repo
    try:
        name_resolve.reconfigure("file", fileroot=str(tmp_path))
        name_resolve.add("m/a", "1")
        name_resolve.add("m/b", "2", delete_on_exit=False)
        sub = name_resolve.add_subentry("m/c", "3")
        assert name_resolve.get("m/a") == "1"
        assert name_resolve.wait("m/b", timeout=1) == "2"
        assert name_resolve.find_subtree("m") == sorted(["m/a", "m/b", sub])
        assert name_resolve.get_subtree("m") == ["1", "2", "3"]
        name_resolve.delete("m/a")
        name_resolve.reset()
        assert name_resolve.find_subtree("m") == ["m/b"]
        name_resolve.add("m/d", "4")
        # Switching backends cleans up the entries owned by the old one.
        name_resolve.reconfigure("memory")
        assert FileNameRecordRepository(str(tmp_path)).find_subtree("m") == ["m/b"]
        name_resolve.add("m/e", "5")
        name_resolve.clear_subtree("m")
        with pytest.raises(NameEntryNotFoundError):
            name_resolve.get("m/e")
    finally:
        name_resolve._default_repo = old


# ---------------------------------------------------------------------- #
# Key layout.
# ---------------------------------------------------------------------- #
def test_names_layout(monkeypatch):
    monkeypatch.setattr(constants.getpass, "getuser", lambda: "bob")
    assert names.trial_root("e", "t") == "bob/e/t"
    assert names.worker_status("e", "t", "model_worker/0") == "bob/e/t/status/model_worker/0"
    assert names.worker("e", "t", "master") == "bob/e/t/worker/master"
    assert names.request_reply_stream("e", "t", "s") == "bob/e/t/request_reply_stream/s"
    assert names.distributed_peer("e", "t", "actor@0") == "bob/e/t/distributed/peer/actor@0"
    assert names.distributed_master("e", "t") == "bob/e/t/distributed/master"
    assert names.trial_registry("e", "t") == "bob/e/trial_registry/t"
    per_trial = [
        names.experiment_status("e", "t"),
        names.worker_key("e", "t", "k"),
        names.used_ports("e", "t", "host"),
        names.worker_status_root("e", "t"),
        names.request_reply_stream_root("e", "t"),
    ]
    assert all(k.startswith("bob/e/t/") for k in per_trial)
    assert len(set(per_trial)) == len(per_trial)


def test_clearing_trial_root_removes_trial_keys(monkeypatch):
    monkeypatch.setattr(constants.getpass, "getuser", lambda: "bob")
    repo = MemoryNameRecordRepository()
    repo.add(names.worker_status("e", "t", "w"), "READY")
    repo.add(names.distributed_master("e", "t"), "addr")
    repo.add(names.worker_status("e", "t2", "w"), "READY")
    repo.clear_subtree(names.trial_root("e", "t"))
    assert repo.find_subtree("bob") == [names.worker_status("e", "t2", "w")]
