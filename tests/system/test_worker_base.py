import json
import threading
import time
import uuid

import pytest

from realhf.base import name_resolve, names
from realhf.system import worker_control
from realhf.system.worker_base import (
    EchoWorker,
    PollResult,
    Worker,
    WorkerExit,
    WorkerServerStatus,
    get_worker_class,
    make_worker,
    register_worker,
)


@pytest.fixture
def trial(monkeypatch):
    monkeypatch.setattr(name_resolve, "_default_repo", name_resolve.MemoryNameRecordRepository())
    return "exp_wb", f"trial_{uuid.uuid4().hex[:8]}"


class CountingWorker(Worker):
    def _configure(self, config):
        self.limit = config["limit"]
        self.fail_at = config.get("fail_at")
        self.n = 0

    def _poll(self):
        self.n += 1
        if self.fail_at is not None and self.n == self.fail_at:
            raise RuntimeError(f"boom at poll {self.n}")
        if self.n > self.limit:
            raise WorkerExit()
        return PollResult(sample_count=2, batch_count=1)


def test_run_completes_and_publishes_status(trial):
    exp, tr = trial
    w = CountingWorker(exp, tr, "counter", 3)
    assert w.name == "counter/3"
    w.configure({"limit": 5})
    assert worker_control.get_worker_status(exp, tr, w.name).status == WorkerServerStatus.READY
    assert w.run() == 0
    assert (w.poll_count, w.sample_count, w.batch_count) == (5, 10, 5)
    info = worker_control.get_worker_status(exp, tr, w.name)
    assert info.status == WorkerServerStatus.COMPLETED and info.error is None
    raw = json.loads(name_resolve.get(names.worker_status(exp, tr, "counter/3")))
    assert raw["status"] == "COMPLETED" and raw["heartbeat"] <= time.time()


def test_poll_exception_publishes_error(trial):
    exp, tr = trial
    w = CountingWorker(exp, tr, "counter", 0)
    w.configure({"limit": 100, "fail_at": 3})
    assert w.run() == 1
    info = worker_control.get_worker_status(exp, tr, w.name)
    assert info.status == WorkerServerStatus.ERROR
    assert "boom at poll 3" in info.error and "Traceback" in info.error
    with pytest.raises(RuntimeError, match="boom at poll 3"):
        worker_control.wait_worker_status(exp, tr, [w.name], [WorkerServerStatus.COMPLETED], timeout=1)


def test_heartbeat_and_lost(trial):
    exp, tr = trial
    w = CountingWorker(exp, tr, "counter", 1, heartbeat_interval_s=0.05)
    w.configure({"limit": 10**9})
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    worker_control.wait_worker_status(exp, tr, [w.name], [WorkerServerStatus.RUNNING], timeout=5)
    hb0 = worker_control.get_worker_status(exp, tr, w.name).heartbeat
    time.sleep(0.3)
    info = worker_control.get_worker_status(exp, tr, w.name, lost_after_s=1.0)
    assert info.status == WorkerServerStatus.RUNNING and info.heartbeat > hb0
    # pause / start / exit commands through name_resolve.
    worker_control.send_command(exp, tr, w.name, "pause")
    worker_control.wait_worker_status(exp, tr, [w.name], [WorkerServerStatus.PAUSED], timeout=5)
    n = w.poll_count
    time.sleep(0.3)
    assert w.poll_count == n
    worker_control.send_command(exp, tr, w.name, "start")
    worker_control.wait_worker_status(exp, tr, [w.name], [WorkerServerStatus.RUNNING], timeout=5)
    worker_control.send_command(exp, tr, w.name, "exit")
    t.join(5)
    assert not t.is_alive()
    assert worker_control.get_worker_status(exp, tr, w.name).status == WorkerServerStatus.COMPLETED
    # A live status with a stale heartbeat reads as LOST; a missing one as UNKNOWN.
    name_resolve.add(names.worker_status(exp, tr, "ghost/0"),
                     json.dumps({"status": "RUNNING", "heartbeat": time.time() - 100}))
    assert worker_control.get_worker_status(exp, tr, "ghost/0").status == WorkerServerStatus.LOST
    assert worker_control.get_worker_status(exp, tr, "none/0").status == WorkerServerStatus.UNKNOWN


def test_config_publish_and_registry(trial):
    exp, tr = trial
    worker_control.publish_worker_config(exp, tr, "echo/4", {"duration": 0.0, "x": [1, 2]})
    w = make_worker("echo", exp, tr, 4)
    assert isinstance(w, EchoWorker)
    cfg = w.load_config(timeout=1)
    assert cfg == {"duration": 0.0, "x": [1, 2]}
    w.configure(cfg)
    assert w.run() == 0
    register_worker("counter_lazy", f"{__name__}:CountingWorker")
    assert get_worker_class("counter_lazy") is CountingWorker
    with pytest.raises(ValueError):
        register_worker("echo", CountingWorker)
    with pytest.raises(KeyError, match="no_such_worker"):
        get_worker_class("no_such_worker")
    with pytest.raises(TimeoutError):
        worker_control.load_worker_config(exp, tr, "missing/0", timeout=0.1)
