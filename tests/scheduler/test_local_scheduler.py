import json
import os
import signal
import sys
import time
import uuid

import psutil
import pytest

from realhf.base import constants, name_resolve
from realhf.scheduler import client as sched
from realhf.scheduler.client import JobException, JobState
from realhf.scheduler.local.client import LocalSchedulerClient
from realhf.system import worker_control
from realhf.system.request_reply_stream import MasterStream, WorkerError
from realhf.system.worker_base import WorkerServerStatus

EXP = "exp_sched"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """File-backed name_resolve under a temporary fileroot shared with subprocesses."""
    monkeypatch.setenv(constants.FILEROOT_ENV_VAR, str(tmp_path))
    monkeypatch.setenv(name_resolve.BACKEND_ENV_VAR, "file")
    monkeypatch.setattr(
        name_resolve, "_default_repo",
        name_resolve.FileNameRecordRepository(str(tmp_path / "name_resolve")))
    trial = f"t{uuid.uuid4().hex[:8]}"
    clients = []

    def make(**kw):
        c = sched.make("local", EXP, trial, grace_period_s=2.0, **kw)
        clients.append(c)
        return c

    yield trial, make, tmp_path
    for c in clients:
        c.stop_all(signal.SIGKILL)


def echo_cmd(trial, config):
    return [sys.executable, "-m", "realhf.apps.remote", "worker", "-w", "echo", "-e", EXP,
            "-f", trial, "-i", "{jobstep_id}", "-g", "{n_jobsteps}",
            "--config-json", json.dumps(config)]


def wait_running(trial, n, timeout=15):
    worker_control.wait_worker_status(EXP, trial, [f"echo/{i}" for i in range(n)],
                                      [WorkerServerStatus.RUNNING], timeout=timeout)


def test_sigkill_one_worker_stops_all(env):
    trial, make, _ = env
    c = make()
    c.submit("echo", echo_cmd(trial, {}), count=3)
    wait_running(trial, 3)
    pids = [i.pid for i in c.find_all()]
    assert all(i.state == JobState.RUNNING for i in c.find_all())
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(JobException) as ei:
        c.wait(timeout=20)
    assert time.monotonic() - t0 < 20
    e = ei.value
    assert (e.worker_type, e.worker_index, e.exit_code) == ("echo", 1, -signal.SIGKILL)
    msg = str(e)
    assert "echo-1" in msg and "SIGKILL" in msg and EXP in msg
    assert "echo worker echo/1 configured" in msg  # log tail
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    states = {i.name: i.state for i in c.find_all()}
    assert states[c.job_name("echo", 1)] == JobState.FAILED
    assert states[c.job_name("echo", 0)] == states[c.job_name("echo", 2)] == JobState.CANCELLED


def test_all_zero_exits_complete_and_logs(env):
    trial, make, root = env
    c = make()
    names = c.submit("echo", echo_cmd(trial, {"duration": 0.2}), count=3)
    infos = c.wait(timeout=20)
    assert sorted(i.name for i in infos) == sorted(names)
    assert all(i.state == JobState.COMPLETED and i.exit_code == 0 for i in infos)
    log_dir = os.path.join(str(root), "logs", constants.get_user(), EXP, trial)
    assert c.log_dir == log_dir == constants.get_log_path(EXP, trial)
    for i in range(3):
        with open(os.path.join(log_dir, f"echo-{i}")) as f:
            assert f"echo worker echo/{i} configured" in f.read()
        st = worker_control.get_worker_status(EXP, trial, f"echo/{i}")
        assert st.status == WorkerServerStatus.COMPLETED


def test_nonzero_exit_and_wait_timeout(env):
    trial, make, _ = env
    c = make()
    c.submit("echo", echo_cmd(trial, {}), count=1)
    c.submit("echo", echo_cmd(trial, {"duration": 0.3, "exit_code": 3}), count=1)
    assert [i.worker_index for i in c.find_all()] == [0, 1]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        c.wait(timeout=0.1, check_status=())
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(JobException, match="exited with code 3") as ei:
        c.wait(timeout=20)
    assert (ei.value.worker_index, ei.value.exit_code) == (1, 3)
    assert "echo-1" in str(ei.value)
    assert c.find(c.job_name("echo", 0)).state == JobState.CANCELLED
    assert c.find("nope").state == JobState.NOT_FOUND


def test_remote_streams_across_processes(env):
    trial, make, _ = env
    c = make()
    c.submit("echo", echo_cmd(trial, {"stream": True}), count=2)
    with MasterStream(EXP, trial, ["echo/0", "echo/1"], timeout_s=15, connect_timeout_s=15) as m:
        assert m.call([0, 1], "echo", datas=[{"a": 1}, [2]]) == [{"a": 1}, [2]]
        assert m.call([0, 1], "echo", datas=["s0", "s1"], no_syn=False) == ["s0", "s1"]
        with pytest.raises(WorkerError, match="echo/1") as ei:
            m.call([1], "raise", datas=["remote failure"])
        assert "remote failure" in ei.value.remote_traceback
        m.call([0, 1], "exit")
    infos = c.wait(timeout=20)
    assert all(i.state == JobState.COMPLETED for i in infos)


def test_make_registry(monkeypatch):
    assert isinstance(sched.make("local", "e", "t"), LocalSchedulerClient)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(sched.SchedulerError, match="ray_address|'ray' package"):
        sched.make("ray", "e", "t")  # mode=ray joins an existing cluster: no address, no client
    with pytest.raises(ValueError, match="Unknown scheduler mode"):
        sched.make("k8s", "e", "t")
    e = JobException("e_t", "model_worker", "host1", "exited with code 1", worker_index=2)
    assert "e_t:model_worker-2" in str(e) and "host1" in str(e)


def test_failure_report_tail_skips_interpreter_exit_noise(tmp_path):
    """A worker's error stays in the reported tail though an extension's leak report follows it at exit."""
    from realhf.scheduler.local.client import read_log_tail

    noise = ["nanobind: leaked 3 instances!", ' - leaked instance 0x7f of type "triton._C.libtriton.ir.attribute"',
             " - ... skipped remainder", "nanobind: leaked 64 types!", ' - leaked type "ATOMIC_OP"',
             "nanobind: this is likely caused by a reference counting issue in the binding code.",
             "See https://nanobind.readthedocs.io/en/latest/refleaks.html"] * 10
    log = tmp_path / "w.log"
    log.write_text("\n".join(["step 1", "Traceback (most recent call last):", "  - leaked is a word here",
                              "RewardError: reward of item 0 failed: timed out after 2 s"] + noise) + "\n")
    tail = read_log_tail(str(log), n_lines=3)
    assert tail.splitlines() == ["Traceback (most recent call last):", "  - leaked is a word here",
                                 "RewardError: reward of item 0 failed: timed out after 2 s"]
