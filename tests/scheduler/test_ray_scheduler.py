"""The Ray scheduler on a real local Ray cluster (one per module), with ``echo`` worker processes.

Jobs complete and leave their logs; a crashing worker (the echo worker's
``exit_code`` hook) or a killed actor stops the run with an error naming it;
placement groups follow the mesh (``jobs_per_node``) and nothing (actor,
placement group, worker process) is left behind. Marked ``ray``: run with
``python -m pytest -q -m ray``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid

import psutil
import pytest

ray = pytest.importorskip("ray", reason="mode=ray needs the 'ray' package: pip install -e '.[ray]'")

from realhf.base import constants, name_resolve  # noqa: E402
from realhf.scheduler import client as sched  # noqa: E402
from realhf.scheduler.client import JobException, JobState, SchedulerError  # noqa: E402
from realhf.scheduler.ray import connect as ray_connect  # noqa: E402
from realhf.scheduler.ray.client import RaySchedulerClient  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.distributed]
EXP = "exp-ray"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster this process is connected to (the scheduler reuses the connection)."""
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="realhf-tests")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def env(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv(constants.FILEROOT_ENV_VAR, str(tmp_path))
    monkeypatch.setenv(name_resolve.BACKEND_ENV_VAR, "file")
    monkeypatch.setattr(name_resolve, "_default_repo",
                        name_resolve.FileNameRecordRepository(str(tmp_path / "name_resolve")))
    trial = f"t{uuid.uuid4().hex[:8]}"
    clients = []

    def make(**kw):
        c = sched.make("ray", EXP, trial, grace_period_s=2.0, poll_interval_s=0.05, **kw)
        clients.append(c)
        return c

    yield trial, make, tmp_path
    for c in clients:
        c.stop_all(signal.SIGKILL)
    for c in clients:
        assert_nothing_left(c)


def echo_cmd(trial, config):
    return [sys.executable, "-m", "realhf.apps.remote", "worker", "-w", "echo", "-e", EXP, "-f", trial,
            "-i", "{jobstep_id}", "-g", "{n_jobsteps}", "--config-json", json.dumps(config)]


def _ours(c):
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(c.run_name)]
    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"].startswith(c.run_name) and g["state"] != "REMOVED"]
    return actors, groups


def assert_nothing_left(c, timeout=15.0):
    """No actor or placement group of the client's trial on the cluster, and no worker process alive."""
    deadline = time.monotonic() + timeout
    while any(_ours(c)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ours(c) == ([], []), _ours(c)
    pids = [i.pid for i in c.find_all() if i.pid is not None]
    _wait_for(lambda: not any(_alive(p) for p in pids), timeout)


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_jobs_complete_with_logs_and_leave_nothing(env):
    trial, make, root = env
    c = make()
    assert isinstance(c, RaySchedulerClient)
    names = c.submit("echo", echo_cmd(trial, {"duration": 0.3}), count=3)
    infos = c.wait(timeout=60)
    assert sorted(i.name for i in infos) == sorted(names)
    assert all(i.state == JobState.COMPLETED and i.exit_code == 0 for i in infos)
    log_dir = constants.get_log_path(EXP, trial)
    assert c.log_dir == log_dir
    for i in range(3):
        with open(os.path.join(log_dir, f"echo-{i}")) as f:
            assert f"echo worker echo/{i} configured" in f.read()
    assert_nothing_left(c)  # finished jobs free their actors and placement groups at once


def test_crashing_worker_stops_the_run_and_is_named(env):
    trial, make, _ = env
    c = make()
    c.submit("echo", echo_cmd(trial, {}), count=1)  # runs until stopped
    c.submit("echo", echo_cmd(trial, {"duration": 0.5, "exit_code": 3}), count=1)
    pids = [i.pid for i in c.find_all()]
    t0 = time.monotonic()
    with pytest.raises(JobException, match="exited with code 3") as ei:
        c.wait(timeout=60)
    assert time.monotonic() - t0 < 30
    e = ei.value
    assert (e.worker_type, e.worker_index, e.exit_code) == ("echo", 1, 3)
    assert "echo-1" in str(e) and "echo worker echo/1 exiting with 3" in str(e)  # with its log tail
    assert c.find(c.job_name("echo", 0)).state == JobState.CANCELLED
    assert_nothing_left(c)
    _wait_for(lambda: not any(_alive(p) for p in pids))


def test_killed_actor_stops_the_run_and_takes_its_worker(env):
    trial, make, _ = env
    c = make()
    c.submit("echo", echo_cmd(trial, {}), count=2)
    pid = c.find(c.job_name("echo", 1)).pid
    ray.kill(ray.get_actor(c.job_name("echo", 1), namespace=ray_connect.NAMESPACE))
    with pytest.raises(JobException, match="Ray actor died") as ei:
        c.wait(timeout=60)
    assert (ei.value.worker_type, ei.value.worker_index) == ("echo", 1)
    assert "echo-1" in str(ei.value)
    assert_nothing_left(c)
    # The worker dies with its actor (parent-death signal), not only when the launcher stops it.
    _wait_for(lambda: not _alive(pid))


def test_killed_worker_process_is_named(env):
    trial, make, _ = env
    c = make()
    c.submit("echo", echo_cmd(trial, {}), count=2)
    os.kill(c.find(c.job_name("echo", 0)).pid, signal.SIGKILL)
    with pytest.raises(JobException, match="SIGKILL") as ei:
        c.wait(timeout=60)
    assert (ei.value.worker_type, ei.value.worker_index, ei.value.exit_code) == ("echo", 0, -signal.SIGKILL)
    assert_nothing_left(c)


def test_placement_groups_follow_the_mesh(env):
    trial, make, _ = env
    c = make(workers_per_node=2)
    c.submit("echo", echo_cmd(trial, {}), count=4)
    groups = sorted((g for g in ray.util.placement_group_table().values()
                     if g["name"].startswith(c.run_name) and g["state"] == "CREATED"), key=lambda g: g["name"])
    assert [(g["strategy"], len(g["bundles"])) for g in groups] == [("STRICT_PACK", 2)] * 2
    assert all(b == {"CPU": 1.0} for g in groups for b in g["bundles"].values())
    c.stop_all()
    assert all(i.state == JobState.CANCELLED for i in c.find_all())
    assert_nothing_left(c)


def test_unplaceable_array_fails_fast(env):
    trial, make, _ = env
    c = make(placement_timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(SchedulerError, match="could not place") as ei:
        c.submit("echo", echo_cmd(trial, {}), count=2, cpus=100.0)
    assert time.monotonic() - t0 < 15
    assert "100.0" in str(ei.value)
    assert_nothing_left(c)


def test_address_checks_name_the_option(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SchedulerError, match="ray_address="):
        ray_connect.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_connect.resolve_address(None) == ("10.0.0.1:6379", "$RAY_ADDRESS")
    assert ray_connect.resolve_address("h:1") == ("h:1", "ray_address")
    assert ray_connect.address_problem("auto") is None
    assert ray_connect.address_problem("ray://head:10001") is None
    assert "expected" in ray_connect.address_problem("head")
    assert "out of range" in ray_connect.address_problem("head:70000")
    with pytest.raises(SchedulerError, match=r"ray_address='127.0.0.1:1': no Ray cluster answers"):
        ray_connect.check_reachable("127.0.0.1:1", "ray_address")
