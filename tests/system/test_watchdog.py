import json
import math
import time
import uuid

import pytest

from realhf.base import name_resolve, names
from realhf.system import watchdog as wd
from realhf.system.worker_base import FatalError, Worker


@pytest.fixture
def trial(monkeypatch):
    monkeypatch.setattr(name_resolve, "_default_repo", name_resolve.MemoryNameRecordRepository())
    return "exp-wd", f"t{uuid.uuid4().hex[:8]}"


def _publish(exp, trial, worker, status, age_s, pid=123):
    value = json.dumps({"status": status, "heartbeat": time.time() - age_s, "pid": pid, "host": "h",
                        "error": None})
    name_resolve.add(names.worker_status(exp, trial, worker), value, replace=True)


def test_stalest_live_worker_is_named(trial):
    exp, tr = trial
    _publish(exp, tr, "model_worker/0", "RUNNING", 1)
    _publish(exp, tr, "model_worker/1", "RUNNING", 40, pid=77)
    _publish(exp, tr, "model_worker/2", "RUNNING", 35)
    _publish(exp, tr, "model_worker/3", "COMPLETED", 500)  # finished workers are not judged
    dog = wd.HeartbeatWatchdog(exp, tr, [f"model_worker/{i}" for i in range(5)], stale_after_s=30,
                               check_interval_s=0)
    err = dog.stale()
    assert isinstance(err, wd.RunStopped)
    assert str(err).startswith("model_worker/1 (pid 77) sent no heartbeat for 40 s")
    assert (err.worker_type, err.worker_index) == ("model_worker", 1)


def test_fresh_or_unpublished_workers_are_fine(trial):
    exp, tr = trial
    _publish(exp, tr, "model_worker/0", "RUNNING", 3)
    dog = wd.HeartbeatWatchdog(exp, tr, ["model_worker/0", "model_worker/1"], stale_after_s=30, check_interval_s=0)
    assert dog.stale() is None


class _Failing(Worker):
    def _poll(self):
        raise FatalError("loss is nan at step 3")


def test_fatal_error_is_published_as_one_line(trial):
    exp, tr = trial
    w = _Failing(exp, tr, "model_worker", 0)
    w.configure(None)
    assert w.run() == 1
    assert wd.fatal_message(exp, tr, ["model_worker/0"]) == "model_worker/0: loss is nan at step 3"


@pytest.mark.parametrize("stats,bad", [
    ({"loss": math.nan, "grad_norm": 1.0}, "loss=nan"),
    ({"loss": 1.0, "grad_norm": math.inf}, "grad_norm=inf"),
    ({"actor_loss": -math.inf}, "actor_loss=-inf"),
    ({"loss": 1.0, "grad_norm": 2.0, "ppl": math.inf}, None),  # not a guarded stat
    ({"loss": 1.0, "grad_norm": math.nan, "skipped_step": 1.0}, None),  # a loss-scaler overflow
])
def test_non_finite_training_stats(stats, bad):
    if bad is None:
        wd.check_finite_stats("trainDefault", stats, 3, 1, 3)
        return
    with pytest.raises(FatalError) as e:
        wd.check_finite_stats("trainDefault", stats, 3, 1, 3)
    assert str(e.value).startswith(f"trainDefault produced non-finite {bad} at global step 3 (epoch 1 step 3)")


def test_model_worker_refuses_to_save_non_finite_parameters(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from realhf.api.core.config import ModelName
    from realhf.base import constants
    from realhf.system.model_worker import ModelWorkerCore

    name = ModelName("default", 0)
    net = torch.nn.Linear(2, 2)
    saved = []
    core = ModelWorkerCore.__new__(ModelWorkerCore)
    core.models = {name: SimpleNamespace(module=net)}
    core.interfaces = {"train": SimpleNamespace(save=lambda model, d: saved.append(d))}
    monkeypatch.setattr(constants, "parallelism_group", lambda: None)  # one process, no group
    core._save({"model_name": name, "rpc": "train", "save_dir": str(tmp_path / "ok")})
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(FatalError, match=r"^model default: parameters contain NaN or inf; checkpoint .*bad was not"):
        core._save({"model_name": name, "rpc": "train", "save_dir": str(tmp_path / "bad")})
    assert saved == [str(tmp_path / "ok")]
