"""``mode=slurm`` against a real Slurm: munged + slurmctld + slurmd started by the test on this machine.

One single-node cluster per module (:mod:`tests.scheduler.real_slurm`; no
systemd, no cgroups, no accounting storage, so no ``sacct``). The scheduler
client runs worker groups and reports a crash by worker; the quickstart CLI
runs a tiny SFT and a tiny PPO end to end, each worker group a real sbatch job
whose tasks srun starts; a crashing worker stops the run, named, and leaves no
job in the queue. The jobs ask for one CPU per task with ``--overcommit`` (the
node has 2 CPUs, a run up to 5 tasks). Marked ``slurm``; needs root and
``apt-get install -y slurmctld slurmd slurm-client munge``; run with
``python -m pytest -q -m slurm``. Skipped, with the reason, where the
daemons are missing or do not come up.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from realhf.scheduler import client as sched
from realhf.scheduler.client import JobException, JobState
from realhf.scheduler.slurm.client import SlurmSchedulerClient
from realhf.scheduler.slurm.spec import SlurmClusterSpec
from tests.scheduler.real_slurm import real_slurm  # noqa: F401  (module-scoped fixture)
from tests.system_e2e._cli import run_quickstart, tiny_ppo_4workers, tiny_sft

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

# One CPU per task; --overcommit lets a group of n tasks share the CPUs Slurm gives the job,
# so the model workers and the master fit the 2-CPU node together.
RESOURCES = ("slurm.gpus_per_worker=0", "slurm.cpus_per_worker=1", "slurm.mem_per_worker_mb=1024",
             "slurm.master_cpus=1", "slurm.master_mem_mb=1024", "slurm.extra_sbatch_args=[--overcommit]",
             "slurm.poll_interval_s=0.5", "slurm.time_limit=10", "partition=debug")
SFT = ("n_gpus_per_node=2", "allocation_mode=d2", "dataset.max_seqlen=64", "dataset.train_bs_n_seqs=4",
       "exp_ctrl.benchmark_steps=2", *RESOURCES)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture
def slurm_env(real_slurm, monkeypatch):  # noqa: F811
    """The cluster's SLURM_CONF and commands in this process's environment (and so the launcher's)."""
    for k, v in real_slurm.env.items():
        monkeypatch.setenv(k, v)
    return real_slurm


def _run_jobs(cluster, run_name):
    """{worker type: squeue row} of the jobs of ``run_name`` the controller knows (ended ones too)."""
    return {j["name"].split(":", 1)[1]: j for j in cluster.jobs(all_states=True)
            if j["name"].startswith(run_name + ":")}


def _worker_processes(run_name):
    """Pids of processes whose environment says they are a worker task of ``run_name``."""
    mark = f"REAL_JOB_NAME={run_name}:".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if any(v.startswith(mark) for v in f.read().split(b"\0")):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _client(tmp_path, trial):
    spec = SlurmClusterSpec(gpus_per_worker=0, cpus_per_worker=1, mem_per_worker_mb=256, master_cpus=1,
                            master_mem_mb=256, partition="debug", time_limit="5", extra_sbatch_args=["--overcommit"])
    return SlurmSchedulerClient("exp", trial, spec=spec, log_dir=str(tmp_path / "logs"), poll_interval_s=0.3,
                                grace_period_s=30)


# ------------------------------------------------------------------ the scheduler client
def test_groups_run_as_real_jobs(slurm_env, tmp_path):
    c = _client(tmp_path, "ok")
    code = ("import os, socket; print('worker', os.environ['REAL_WORKER_INDEX'], os.environ['SLURM_PROCID'], "
            "os.environ['SLURM_JOB_ID'], os.environ['SLURM_CPUS_PER_TASK'], socket.gethostname(), {jobstep_id})")
    names = c.submit_array("model_worker", [sys.executable, "-c", code], count=2)
    names += c.submit_array("master_worker", [sys.executable, "-c", code], count=1)
    infos = c.wait(timeout=120)
    assert sorted(i.name for i in infos) == sorted(names) and all(i.state == JobState.COMPLETED for i in infos)
    jobs = _run_jobs(slurm_env, "exp_ok")
    assert {k: j["state"] for k, j in jobs.items()} == {"model_worker": "COMPLETED", "master_worker": "COMPLETED"}
    model_job = jobs["model_worker"]["id"]
    assert c.slurm_job_id("exp_ok:model_worker/1") == model_job
    for i in range(2):
        with open(tmp_path / "logs" / f"model_worker-{i}") as f:
            assert f.read().split() == ["worker", str(i), str(i), model_job, "1", slurm_env.node, str(i)]
        assert c.find(f"exp_ok:model_worker/{i}").host == slurm_env.node
    info = slurm_env.job(model_job)
    assert (info["JobState"], info["ExitCode"], info["NumTasks"], info["NodeList"]) == \
        ("COMPLETED", "0:0", "2", slurm_env.node)


def test_crashing_worker_is_named_and_every_job_leaves_the_queue(slurm_env, tmp_path):
    c = _client(tmp_path, "crash")
    code = ("import os, sys, time\n"
            "if os.environ['REAL_WORKER_INDEX'] == '1':\n"
            "    time.sleep(1); print('boom in worker one', flush=True); sys.exit(3)\n"
            "time.sleep(300)\n")
    c.submit_array("model_worker", [sys.executable, "-c", code], count=2)
    c.submit_array("master_worker", [sys.executable, "-c", "import time; time.sleep(300)"], count=1)
    with pytest.raises(JobException) as ei:
        c.wait(timeout=120)
    e = ei.value
    assert (e.worker_type, e.worker_index, e.exit_code) == ("model_worker", 1, 3)
    assert "exited with code 3" in str(e) and "boom in worker one" in str(e), str(e)
    jobs = _run_jobs(slurm_env, "exp_crash")
    assert set(jobs) == {"model_worker", "master_worker"}
    assert all(j["state"] in ENDED for j in jobs.values()), jobs
    assert jobs["master_worker"]["state"] == "CANCELLED", jobs
    assert not [j for j in slurm_env.jobs(all_states=False) if j["name"].startswith("exp_crash:")]
    assert sched.wait_until(lambda: not _worker_processes("exp_crash"), 20), _worker_processes("exp_crash")
    assert all(not i.state.active() for i in c.find_all())


# ------------------------------------------------------------------ the quickstart CLI
def _check_cli_jobs(cluster, log_dir, run_name, n_workers):
    jobs = _run_jobs(cluster, run_name)
    assert {k: j["state"] for k, j in jobs.items()} == \
        {"model_worker": "COMPLETED", "master_worker": "COMPLETED"}, jobs
    model = cluster.job(jobs["model_worker"]["id"])
    assert (model["NumTasks"], model["NodeList"], model["ExitCode"]) == (str(n_workers), cluster.node, "0:0")
    slurm_dir = os.path.join(log_dir, "slurm")
    # the job's own output file carries the id the real controller gave it
    assert os.path.exists(os.path.join(slurm_dir, f"model_worker-s0-{jobs['model_worker']['id']}.out"))
    for i in range(n_workers):
        assert os.path.getsize(os.path.join(log_dir, f"model_worker-{i}")) > 0
        with open(os.path.join(slurm_dir, f"model_worker-{i}.rc")) as f:
            assert f.read().strip() == "0"
        with open(os.path.join(slurm_dir, f"model_worker-{i}.host")) as f:
            assert f.read().strip() == cluster.node
    assert os.path.getsize(os.path.join(log_dir, "master_worker-0")) > 0


def _steps(log_dir):
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        return [json.loads(l) for l in f if '"stats"' in l]


def test_sft_cli_end_to_end(slurm_env, tmp_path):
    res, log_dir = run_quickstart(tmp_path, "sft", "rslurm-sft", tiny_sft("mode=slurm", *SFT), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_cli_jobs(slurm_env, log_dir, "rslurm-sft_t", 2)
    with open(os.path.join(log_dir, "slurm", "model_worker-s0.sbatch")) as f:
        text = f.read()
    assert "#SBATCH --ntasks=2" in text and "#SBATCH --overcommit" in text and "--cpus-per-task=1" in text
    assert [r["global_step"] for r in _steps(log_dir)] == [1, 2]


def test_ppo_cli_end_to_end(slurm_env, tmp_path):
    """Four model workers in one job (actor generation on dp4, training on dp2 x tp2), the master in another."""
    args = tiny_ppo_4workers("mode=slurm", *RESOURCES)
    res, log_dir = run_quickstart(tmp_path, "ppo", "rslurm-ppo", args, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_cli_jobs(slurm_env, log_dir, "rslurm-ppo_t", 4)
    steps = _steps(log_dir)
    assert [r["global_step"] for r in steps] == [1, 2]
    assert all(abs(r["stats"]["actor_train"]["task_reward"]) < 1e3 for r in steps)


def test_crashing_worker_stops_the_cli_run(slurm_env, tmp_path):
    mod = tmp_path / "crash_one.py"  # makes model worker 1 die while it starts (as in test_slurm_e2e.py)
    mod.write_text("import os, sys\n"
                   "if os.environ.get('REAL_WORKER_TYPE') == 'model_worker' and "
                   "os.environ.get('REAL_WORKER_INDEX') == '1':\n"
                   "    print('worker one crashes on purpose', flush=True)\n"
                   "    os._exit(7)\n")
    start = time.monotonic()
    res, log_dir = run_quickstart(tmp_path, "sft", "rslurm-crash", tiny_sft("mode=slurm", *SFT), timeout=300,
                                  imports=[str(mod)])
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "model_worker-1" in res.stderr and "exited with code 7" in res.stderr, res.stderr[-3000:]
    assert "worker one crashes on purpose" in res.stderr
    # nothing of the run is queued or running any more, and no worker process is left
    assert not [j for j in slurm_env.jobs(all_states=False) if j["name"].startswith("rslurm-crash_t:")]
    jobs = _run_jobs(slurm_env, "rslurm-crash_t")
    assert set(jobs) == {"model_worker", "master_worker"} and all(j["state"] in ENDED for j in jobs.values()), jobs
    assert sched.wait_until(lambda: not _worker_processes("rslurm-crash_t"), 20)
    assert time.monotonic() - start < 200
