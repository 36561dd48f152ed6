"""``mode=ray`` end to end: the quickstart CLI runs its workers as actors on a local Ray cluster.

One cluster for the module (``ray.init`` here; the CLI joins it as another
driver through ``ray_address`` or ``$RAY_ADDRESS``). A tiny SFT and a tiny PPO
(the settings of the ``mode=local`` CLI tests) finish with their workers'
logs in the trial's log directory; a worker killed mid-run, and Ctrl-C of the
launcher, end the run naming the worker / cleanly, and so does a launcher killed
outright; a bad address fails before any worker starts. After each run no actor or placement group of it is left.
Marked ``ray``: ``python -m pytest -q -m ray``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ray = pytest.importorskip("ray", reason="mode=ray needs the 'ray' package: pip install -e '.[ray]'")

pytestmark = [pytest.mark.ray, pytest.mark.distributed]

from tests.system_e2e._cli import ROOT, tiny_ppo_4workers  # noqa: E402

TIMEOUT_S = 300
SFT = ["model.path=realhf/assets/models/tiny-llama", "model.init_from_scratch=True",
       "dataset.train_path=realhf/assets/data/sft-train.jsonl", "dataset.train_bs_n_seqs=32",
       "n_gpus_per_node=2", "allocation_mode=d2p1m1"]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="realhf-tests")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _user():
    from realhf.base import constants

    return constants.get_user()


def _log_dir(root, exp, trial="t"):
    return os.path.join(str(root), "logs", _user(), exp, trial)


def _start(root, exp, args, address=None, env_address=None, trial="t"):
    env = dict(os.environ, REAL_FILEROOT=str(root), REAL_FORCE_CPU="1")
    env.pop("RAY_ADDRESS", None)
    if env_address:
        env["RAY_ADDRESS"] = env_address
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", exp.split("-")[0], f"experiment_name={exp}",
           f"trial_name={trial}", "mode=ray", *([f"ray_address={address}"] if address else []), *args]
    out = open(os.path.join(str(root), f"{exp}.out"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), out


def _finish(proc, out, root, exp, timeout=TIMEOUT_S):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        out.close()
    return proc.returncode, open(os.path.join(str(root), f"{exp}.out")).read()


def _left_on_cluster(run_name):
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(run_name)]
    groups = [g["name"] for g in ray.util.placement_group_table().values()
              if g["name"].startswith(run_name) and g["state"] != "REMOVED"]
    return actors + groups


def _assert_cluster_clean(exp, trial="t", timeout=20.0):
    deadline = time.monotonic() + timeout
    while _left_on_cluster(f"{exp}_{trial}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _left_on_cluster(f"{exp}_{trial}") == []


def _worker_procs(exp):
    """Worker processes of experiment ``exp`` (``-e <exp>`` on their command line)."""
    return [p for p in psutil.process_iter(["cmdline"])
            if "realhf.apps.remote" in (p.info["cmdline"] or []) and exp in p.info["cmdline"]]


def _assert_workers_gone(exp, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in _worker_procs(exp) if _alive(p)]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"worker processes left: {[p.pid for p in alive]}")


def _alive(p):
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _steps(root, exp):
    with open(os.path.join(_log_dir(root, exp), "stats.jsonl")) as f:
        return [r["global_step"] for r in map(json.loads, f) if "stats" in r]


def test_sft_runs_as_ray_actors(cluster, tmp_path):
    exp = "sft-ray"
    proc, out = _start(tmp_path, exp, [*SFT, "exp_ctrl.benchmark_steps=2"], env_address=cluster)
    code, text = _finish(proc, out, tmp_path, exp)
    assert code == 0, text[-4000:]
    assert "global step 2/2" in text  # the master's log reaches the console
    assert _steps(tmp_path, exp) == [1, 2]
    log_dir = _log_dir(tmp_path, exp)
    for name in ("model_worker-0", "model_worker-1", "master_worker-0"):
        with open(os.path.join(log_dir, name)) as f:
            assert "configured; running" in f.read(), name
    _assert_cluster_clean(exp)
    _assert_workers_gone(exp)


def test_ppo_runs_as_ray_actors(cluster, tmp_path):
    exp = "ppo-ray"
    args = tiny_ppo_4workers()
    proc, out = _start(tmp_path, exp, args, address=cluster)
    code, text = _finish(proc, out, tmp_path, exp)
    assert code == 0, text[-4000:]
    assert "global step 2/2" in text
    assert _steps(tmp_path, exp) == [1, 2]
    assert sorted(f for f in os.listdir(_log_dir(tmp_path, exp)) if "_worker-" in f) == \
        ["master_worker-0"] + [f"model_worker-{i}" for i in range(4)]
    _assert_cluster_clean(exp)


def _wait_for_step(proc, root, exp, step=1, timeout=150):
    deadline = time.monotonic() + timeout
    path = os.path.join(str(root), f"{exp}.out")
    while f"global step {step}/" not in open(path).read():
        assert proc.poll() is None and time.monotonic() < deadline, open(path).read()[-4000:]
        time.sleep(0.2)


def test_killed_worker_stops_the_run_and_is_named(cluster, tmp_path):
    exp, trial = "sft-raykill", "k"
    proc, out = _start(tmp_path, exp, [*SFT, "exp_ctrl.benchmark_steps=100000", "exp_ctrl.total_train_epochs=1000"],
                       address=cluster, trial=trial)
    try:
        _wait_for_step(proc, tmp_path, exp)
        victim = next(p for p in _worker_procs(exp) if "model_worker" in p.info["cmdline"]
                      and p.info["cmdline"][p.info["cmdline"].index("-i") + 1] == "1")
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code, text = _finish(proc, out, tmp_path, exp, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1 and time.monotonic() - killed_at < 60, text[-4000:]
    last = [line for line in text.splitlines() if line.startswith("realhf: experiment")][-1]
    assert f"{exp}/{trial} failed" in last and "model_worker-1" in last and "SIGKILL" in last, last
    _assert_cluster_clean(exp, trial)
    _assert_workers_gone(exp)


def test_ctrl_c_stops_every_actor(cluster, tmp_path):
    exp, trial = "sft-rayint", "i"
    proc, out = _start(tmp_path, exp, [*SFT, "exp_ctrl.benchmark_steps=100000", "exp_ctrl.total_train_epochs=1000"],
                       address=cluster, trial=trial)
    try:
        _wait_for_step(proc, tmp_path, exp)
        proc.send_signal(signal.SIGINT)
        code, text = _finish(proc, out, tmp_path, exp, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0, text[-3000:]
    _assert_cluster_clean(exp, trial)
    _assert_workers_gone(exp)


def test_killed_launcher_leaves_nothing(cluster, tmp_path):
    """SIGKILL of the launcher (no cleanup code runs): Ray ends the departed driver's actors and
    placement groups, and each worker dies with its actor."""
    exp, trial = "sft-raylost", "l"
    proc, out = _start(tmp_path, exp, [*SFT, "exp_ctrl.benchmark_steps=100000", "exp_ctrl.total_train_epochs=1000"],
                       address=cluster, trial=trial)
    try:
        _wait_for_step(proc, tmp_path, exp)
        assert len(_worker_procs(exp)) == 3
        proc.kill()
        proc.wait(timeout=30)
    finally:
        out.close()
        if proc.poll() is None:
            proc.kill()
    _assert_cluster_clean(exp, trial, timeout=60)
    _assert_workers_gone(exp, timeout=60)


# Missing and malformed addresses are refused by the config (tests/quickstart/test_ray_config.py);
# these two reach the launcher: a port nobody listens on, and one in the launcher's environment.
@pytest.mark.parametrize("address,env_address,message", [
    ("127.0.0.1:1", None, "error: ray_address='127.0.0.1:1': no Ray cluster answers"),
    (None, "127.0.0.1:1", "error: $RAY_ADDRESS='127.0.0.1:1': no Ray cluster answers"),
])
def test_unreachable_address_fails_before_any_worker(cluster, tmp_path, address, env_address, message):
    exp = "sft-raybad"
    proc, out = _start(tmp_path, exp, SFT, address=address, env_address=env_address)
    code, text = _finish(proc, out, tmp_path, exp, timeout=120)
    assert code == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], text[-3000:]
    log_dir = _log_dir(tmp_path, exp)
    assert not os.path.isdir(log_dir) or not [f for f in os.listdir(log_dir) if "_worker-" in f]
