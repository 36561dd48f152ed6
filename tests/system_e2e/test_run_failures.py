"""Runs that go wrong stop on their own, with one line naming what went wrong.

A frozen model worker (SIGSTOP: its heartbeat thread stops too) stops the
whole run within seconds of the heartbeat limit; a non-finite loss stops the
run naming the call and step, and no checkpoint of that step or later exists.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.distributed

SFT = ["sft", "model.path=realhf/assets/models/tiny-llama", "model.init_from_scratch=True",
       "dataset.train_path=realhf/assets/data/sft-train.jsonl", "dataset.train_bs_n_seqs=32",
       "n_gpus_per_node=2", "allocation_mode=d2p1m1"]


def _user() -> str:
    from realhf.base import constants

    return constants.get_user()


def _start(tmp_path, exp: str, trial: str, *extra: str, imports=()):
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path))
    out = open(tmp_path / f"{trial}.out", "w")
    flags = [x for m in imports for x in ("--import", m)]
    proc = subprocess.Popen([sys.executable, "-m", "realhf.apps.quickstart", *flags, *SFT, f"experiment_name={exp}",
                             f"trial_name={trial}", *extra], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    return proc, out


def _worker(trial: str, worker_type: str, index: int) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "realhf.apps.remote" in cmd and trial in cmd and worker_type in cmd \
                and cmd[cmd.index("-i") + 1] == str(index):
            return p
    raise LookupError(f"{worker_type} {index} of {trial} is not running")


def _cleanup(launcher: subprocess.Popen, workers) -> list:
    """SIGCONT and SIGKILL whatever is left; returns what was still alive."""
    alive = []
    for p in workers:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
                p.send_signal(signal.SIGCONT)
                p.kill()
        except psutil.Error:
            pass
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait()
    return alive


def _finish(launcher: subprocess.Popen, out, out_path, timeout: float = 150):
    """Wait for the launcher (killed if it outlives ``timeout``); (exit code, its output)."""
    try:
        code = launcher.wait(timeout=timeout)
    finally:
        out.close()
        if launcher.poll() is None:
            launcher.kill()
    return code, out_path.read_text()


def test_frozen_worker_stops_the_run_and_is_named(tmp_path):
    trial = "frozen"
    launcher, out = _start(tmp_path, "fail-frozen", trial, "heartbeat_timeout_s=6",
                           "exp_ctrl.benchmark_steps=100000", "exp_ctrl.total_train_epochs=1000")
    workers = []
    try:
        deadline = time.monotonic() + 120
        text = ""
        while "global step 1/" not in text:
            assert launcher.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.2)
            text = (tmp_path / f"{trial}.out").read_text()
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)]
        frozen = _worker(trial, "model_worker", 1)
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = launcher.wait(timeout=60)
        took = time.monotonic() - stopped_at
        print(f"run ended {took:.1f}s after SIGSTOP (heartbeat limit 6 s)")
        text = (tmp_path / f"{trial}.out").read_text()
        last = text.strip().splitlines()[-1]
        assert code != 0 and took < 60
        assert last.startswith("realhf: experiment fail-frozen/frozen failed: model_worker/1 "
                               f"(pid {frozen.pid}) sent no heartbeat for"), last
        assert "Traceback" not in last
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        out.close()
        _cleanup(launcher, workers)


def test_nan_loss_stops_the_run_before_saving(tmp_path):
    trial = "nan"
    launcher, out = _start(tmp_path, "fail-nan", trial, "model.optimizer.lr=1e30",
                           "model.optimizer.warmup_steps_proportion=0", "model.optimizer.lr_scheduler_type=constant",
                           "exp_ctrl.save_freq_steps=1", "exp_ctrl.benchmark_steps=6")
    code, text = _finish(launcher, out, tmp_path / f"{trial}.out")
    last = text.strip().splitlines()[-1]
    assert code != 0, text[-3000:]
    assert "master_worker/0: trainDefault produced non-finite loss=" in last or \
        "trainDefault produced non-finite grad_norm=" in last, text[-3000:]
    assert "Traceback" not in last
    step = int(last.split("at global step ")[1].split()[0])
    saved = glob.glob(os.path.join(tmp_path, "checkpoints", _user(), "fail-nan", trial, "default", "*"))
    saved_steps = [int(d.rsplit("globalstep", 1)[1]) for d in saved if "globalstep" in os.path.basename(d)]
    assert saved_steps == list(range(1, step)), (step, saved)
    # Nothing half-written either.
    assert not [d for d in saved if "globalstep" not in os.path.basename(d)], saved


@pytest.mark.slow
def test_long_busy_call_is_not_mistaken_for_a_frozen_worker(tmp_path):
    # Worker 1 computes for 10 s inside a step; with a 5 s heartbeat limit the run still finishes.
    trial = "busy"
    launcher, out = _start(tmp_path, "fail-busy", trial, "heartbeat_timeout_s=5", "exp_ctrl.benchmark_steps=2",
                          imports=[os.path.join(ROOT, "tests", "system_e2e", "_busy_step.py")])
    code, text = _finish(launcher, out, tmp_path / f"{trial}.out")
    assert code == 0 and "global step 2/2" in text, text[-3000:]
    first = [l for l in text.splitlines() if "global step 1/2" in l][0]
    assert float(first.split("| ")[1].split("s,")[0]) >= 10.0  # the step really took that long
