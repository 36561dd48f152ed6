"""Full launches: master and model workers as separate processes over ZeroMQ.

A run trains and saves a checkpoint that transformers loads; SIGKILL of one
model worker ends the run quickly with an error naming it; with
recover_mode=auto the run resumes from the last recover state and its
per-step losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from realhf.apps.main import launch
from realhf.scheduler.client import JobException

from tests.system_e2e._sft import sft_experiment

pytestmark = pytest.mark.distributed


@pytest.fixture
def fileroot(tmp_path, monkeypatch):
    monkeypatch.setenv("REAL_FILEROOT", str(tmp_path))
    return tmp_path


def _stats(root, exp, trial):
    path = os.path.join(root, "logs", _user(), exp, trial, "stats.jsonl")
    if not os.path.exists(path):
        return {}
    by_step = {}
    for line in open(path):
        rec = json.loads(line)
        if "stats" not in rec:
            continue  # evaluation records
        by_step[rec["global_step"]] = rec["stats"]["trainDefault"]["loss"]  # a re-run step keeps its last value
    return by_step


def _user():
    from realhf.base import constants

    return constants.get_user()


def _worker_pid(trial: str, worker_type: str, index: int) -> int:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "realhf.apps.remote" in cmd and trial in cmd and worker_type in cmd and cmd[cmd.index("-i") + 1] == str(index):
            return p.pid
    raise LookupError(f"{worker_type} {index} of {trial} not running")


def _kill_after(root, exp, trial, steps: int, errors: list, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while len(_stats(root, exp, trial)) < steps:
        if time.time() > deadline:
            errors.append("run did not reach the kill point")
            return
        time.sleep(0.05)
    os.kill(_worker_pid(trial, "model_worker", 1), signal.SIGKILL)
    errors.append(("killed_at", time.time()))


def test_launch_trains_and_saves_hf_checkpoint(fileroot):
    import torch
    import transformers

    launch(sft_experiment(2, 2, 1, benchmark_steps=4), "launch-sft", "ok")
    losses = _stats(fileroot, "launch-sft", "ok")
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    ckpt_root = os.path.join(fileroot, "checkpoints", _user(), "launch-sft", "ok", "default")
    (ckpt,) = os.listdir(ckpt_root)
    assert ckpt == "epoch1epochstep4globalstep4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ckpt_root, ckpt))
    with torch.no_grad():
        assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()
    logs = os.listdir(os.path.join(fileroot, "logs", _user(), "launch-sft", "ok"))
    assert {"master_worker-0", "model_worker-0", "model_worker-3"} <= set(logs)


def test_killed_worker_stops_the_run_and_is_named(fileroot):
    errors: list = []
    killer = threading.Thread(target=_kill_after, args=(fileroot, "launch-kill", "k", 2, errors))
    killer.start()
    with pytest.raises(JobException) as e:
        launch(sft_experiment(2, 2, 1, benchmark_steps=500), "launch-kill", "k")
    killer.join()
    ended = time.time()
    killed = [e for e in errors if isinstance(e, tuple)]
    assert len(killed) == len(errors) == 1, errors
    assert ended - killed[0][1] < 60, f"run ended {ended - killed[0][1]:.1f}s after the kill"
    print(f"run ended {ended - killed[0][1]:.2f}s after SIGKILL")
    assert "model_worker" in str(e.value) and "1" in str(e.value) and "SIGKILL" in str(e.value)
    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if "k" in (p.info["cmdline"] or [])
            and "realhf.apps.remote" in (p.info["cmdline"] or [])]
    assert not left, f"workers still running: {[p.pid for p in left]}"


def test_auto_recovery_resumes_with_the_same_losses(fileroot):
    n = 6
    launch(sft_experiment(2, 1, 2, benchmark_steps=n), "launch-rec", "straight")
    errors: list = []
    killer = threading.Thread(target=_kill_after, args=(fileroot, "launch-rec", "auto", 3, errors))
    killer.start()
    launch(sft_experiment(2, 1, 2, benchmark_steps=n), "launch-rec", "auto", recover_mode="auto",
           recover_retries=1)
    killer.join()
    assert [e[0] for e in errors] == ["killed_at"], errors
    straight = _stats(fileroot, "launch-rec", "straight")
    resumed = _stats(fileroot, "launch-rec", "auto")
    assert sorted(resumed) == list(range(1, n + 1))
    for step in range(1, n + 1):
        assert abs(resumed[step] - straight[step]) <= 1e-6, (step, resumed[step], straight[step])
