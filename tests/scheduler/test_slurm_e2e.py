"""``python -m realhf.apps.quickstart sft mode=slurm ...`` end to end, through fake Slurm commands
(:mod:`tests.scheduler.fake_slurm`) that run the submitted jobs on this machine; and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.scheduler import fake_slurm
from tests.system_e2e._cli import ROOT, run_quickstart, tiny_sft

pytestmark = pytest.mark.distributed

SFT = ("n_gpus_per_node=2", "allocation_mode=d2", "dataset.max_seqlen=64", "dataset.train_bs_n_seqs=4",
       "exp_ctrl.benchmark_steps=2", "slurm.gpus_per_worker=0", "slurm.poll_interval_s=0.2",
       "slurm.time_limit=10", "partition=debug")


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    d = str(tmp_path / "fake-slurm")
    monkeypatch.setenv("PATH", fake_slurm.install(d) + os.pathsep + os.environ["PATH"])
    return d


@pytest.mark.slow  # about 45 s on 2 cores; the crash test below runs the same path in the default suite
def test_sft_runs_through_sbatch(tmp_path, fake_path):
    res, log_dir = run_quickstart(tmp_path, "sft", "slurm-sft", tiny_sft("mode=slurm", *SFT), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    calls = fake_slurm.calls(fake_path)
    assert sum(c.startswith("sbatch --parsable") for c in calls) == 2, calls
    with open(os.path.join(log_dir, "slurm", "model_worker-s0.sbatch")) as f:
        text = f.read()
    assert "#SBATCH --ntasks=2" in text and "#SBATCH --partition=debug" in text and "#SBATCH --time=10" in text
    for i in range(2):
        assert os.path.exists(os.path.join(log_dir, f"model_worker-{i}"))
        with open(os.path.join(log_dir, "slurm", f"model_worker-{i}.rc")) as f:
            assert f.read().strip() == "0"
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        assert len([json.loads(l) for l in f if '"stats"' in l]) == 2


def test_crashing_worker_stops_the_run_and_is_named(tmp_path, fake_path):
    # A user module that makes model worker 1 die while it starts.
    mod = tmp_path / "crash_one.py"
    mod.write_text("import os, sys\n"
                   "if os.environ.get('REAL_WORKER_TYPE') == 'model_worker' and "
                   "os.environ.get('REAL_WORKER_INDEX') == '1':\n"
                   "    print('worker one crashes on purpose', flush=True)\n"
                   "    os._exit(7)\n")
    res, log_dir = run_quickstart(tmp_path, "sft", "slurm-crash", tiny_sft("mode=slurm", *SFT),
                                  timeout=300, imports=[str(mod)])
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "model_worker-1" in res.stderr and "exited with code 7" in res.stderr, res.stderr[-3000:]
    assert "worker one crashes on purpose" in res.stderr
    assert any(c.startswith("scancel") for c in fake_slurm.calls(fake_path))


def test_refused_without_sbatch(tmp_path):
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path), PATH=os.path.dirname(sys.executable))
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", "sft", "experiment_name=x", "trial_name=t", "mode=slurm",
           *tiny_sft()]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "mode='slurm' needs a Slurm cluster" in res.stderr and "'sbatch' is not on PATH" in res.stderr


def test_bad_cluster_spec_refused_before_submission(tmp_path, fake_path):
    res, _ = run_quickstart(tmp_path, "sft", "slurm-bad", tiny_sft("mode=slurm", "slurm.cpus_per_worker=0"),
                            timeout=120)
    assert res.returncode == 2 and "slurm.cpus_per_worker=0" in res.stderr, res.stderr[-2000:]
    res, _ = run_quickstart(tmp_path, "sft", "slurm-bad", tiny_sft("mode=slurm", "image_name='a b'"), timeout=120)
    assert res.returncode == 2 and "image_name='a b'" in res.stderr, res.stderr[-2000:]
    assert not any(c.startswith("sbatch") for c in fake_slurm.calls(fake_path))


@pytest.mark.slow
def test_two_node_sft_with_redis_name_resolve(tmp_path, fake_path):
    """n_nodes=2 through the fakes: workers publish the routable host IP and find each other through Redis."""
    pytest.importorskip("redis")
    from tests.base.redis_server import RedisServer, find_redis_server

    exe, why = find_redis_server()
    if exe is None:
        pytest.skip(why)
    server = RedisServer(exe, str(tmp_path))
    try:
        over = [o for o in SFT if not o.startswith("n_gpus_per_node")]
        res, log_dir = run_quickstart(tmp_path, "sft", "slurm-redis", tiny_sft(
            "mode=slurm", "n_nodes=2", "n_gpus_per_node=1", "name_resolve=redis",
            f"name_resolve_address={server.url}", *over), timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        with open(os.path.join(log_dir, "slurm", "model_worker-s0.sbatch")) as f:
            text = f.read()
        assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
        with open(os.path.join(log_dir, "slurm", "model_worker-s0.task.sh")) as f:
            task = f.read()
        assert "export REAL_NAME_RESOLVE=redis" in task and "export REAL_MULTI_NODE=1" in task
        assert f"export REAL_REDIS_URL={server.url}" in task
        # nothing was published through the file backend
        entries = [f for _, _, fs in os.walk(os.path.join(str(tmp_path), "name_resolve")) for f in fs]
        assert "ENTRY" not in entries
    finally:
        server.stop()
