"""mode=slurm: generated job scripts (golden), the cluster spec's validation, and real runs of the
scheduler against fake sbatch/squeue/sacct/scancel/srun that execute the jobs on this machine."""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import pytest

from realhf.scheduler import client as sched
from realhf.scheduler.client import JobException, JobState
from realhf.scheduler.slurm import scripts
from realhf.scheduler.slurm.client import SlurmSchedulerClient, slurm_state
from realhf.scheduler.slurm.spec import ClusterSpecError, SlurmClusterSpec
from tests.scheduler import fake_slurm


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Fake Slurm commands first on PATH; yields their directory."""
    d = str(tmp_path / "fake-slurm")
    bin_dir = fake_slurm.install(d)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    return d


def _client(tmp_path, **spec) -> SlurmSchedulerClient:
    spec.setdefault("gpus_per_worker", 0)
    return SlurmSchedulerClient("exp", "trial", spec=SlurmClusterSpec(**spec), log_dir=str(tmp_path / "logs"),
                                poll_interval_s=0.1, grace_period_s=10)


# ------------------------------------------------------------------ golden scripts
def test_golden_scripts():
    spec = SlurmClusterSpec(partition="gpu", nodelist="NODE[01-02]", container_image="docker://real:1",
                            container_mounts="/data:/data", nodes=2, tasks_per_node=4, cpus_per_worker=8,
                            mem_per_worker_mb=16000, gpus_per_worker=1, time_limit="1-00:00:00",
                            extra_sbatch_args=["--account=proj", "--exclusive"])
    cmd = sched.format_command(["python", "-m", "realhf.apps.remote", "worker", "-i", "{jobstep_id}",
                                "--tag", "a b", "-g", "{n_jobsteps}"],
                               jobstep_id=scripts._INDEX_SENTINEL, n_jobsteps=8)
    g = scripts.render_group(spec, run_name="exp_trial", worker_type="model_worker", cmd=cmd, count=8, offset=0,
                             env={"REAL_FILEROOT": "/shared/root", "X": "it's"}, log_dir="/shared/logs",
                             state_dir="/shared/logs/slurm", cwd="/code", submission=0)
    assert g.sbatch_path == "/shared/logs/slurm/model_worker-s0.sbatch"
    assert g.task_path == "/shared/logs/slurm/model_worker-s0.task.sh"
    assert g.sbatch_text == textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --job-name=exp_trial:model_worker
        #SBATCH --output=/shared/logs/slurm/model_worker-s0-%j.out
        #SBATCH --chdir=/code
        #SBATCH --ntasks=8
        #SBATCH --cpus-per-task=8
        #SBATCH --mem-per-cpu=2000M
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=4
        #SBATCH --gpus-per-task=1
        #SBATCH --nodelist=NODE[01-02]
        #SBATCH --partition=gpu
        #SBATCH --time=1-00:00:00
        #SBATCH --account=proj
        #SBATCH --exclusive
        # realhf worker group model_worker, indices 0..7 of run exp_trial
        set -u
        echo "realhf: job ${SLURM_JOB_ID:-?} (model_worker) on ${SLURM_NODELIST:-?}"
        srun --ntasks=8 --cpus-per-task=8 --kill-on-bad-exit=1 --label --container-image=docker://real:1 --container-mounts=/data:/data bash /shared/logs/slurm/model_worker-s0.task.sh
        """)
    assert g.task_text == textwrap.dedent("""\
        #!/bin/bash
        # one task of model_worker: worker index = 0 + SLURM_PROCID
        export REAL_WORKER_INDEX=$(( 0 + ${SLURM_PROCID:-0} ))
        export REAL_WORKER_TYPE=model_worker
        export REAL_WORKER_COUNT=8
        export REAL_JOB_NAME=exp_trial:model_worker/"${REAL_WORKER_INDEX}"
        export REAL_FILEROOT=/shared/root
        export X='it'"'"'s'
        hostname > /shared/logs/slurm/model_worker-"${REAL_WORKER_INDEX}".host
        python -m realhf.apps.remote worker -i "${REAL_WORKER_INDEX}" --tag 'a b' -g 8 >> /shared/logs/model_worker-"${REAL_WORKER_INDEX}" 2>&1
        code=$?
        echo "$code" > /shared/logs/slurm/model_worker-"${REAL_WORKER_INDEX}".rc.tmp && mv /shared/logs/slurm/model_worker-"${REAL_WORKER_INDEX}".rc.tmp /shared/logs/slurm/model_worker-"${REAL_WORKER_INDEX}".rc
        exit $code
        """)


def test_master_script_has_its_own_resources():
    spec = SlurmClusterSpec(master_cpus=2, master_mem_mb=3000, gpus_per_worker=1, nodelist="N1", nodes=2)
    g = scripts.render_group(spec, run_name="e_t", worker_type="master_worker", cmd=["run", "-i", "x" + scripts._INDEX_SENTINEL],
                             count=1, offset=0, env={}, log_dir="/l", state_dir="/l/slurm", cwd="/c", submission=1)
    d = [l for l in g.sbatch_text.splitlines() if l.startswith("#SBATCH")]
    assert "#SBATCH --cpus-per-task=2" in d and "#SBATCH --mem-per-cpu=1500M" in d
    assert not any("gpus" in l or "nodelist" in l or "--nodes" in l for l in d)
    assert 'run -i x"${REAL_WORKER_INDEX}"' in g.task_text
    assert "srun --ntasks=1 --cpus-per-task=2 --kill-on-bad-exit=1 --label bash /l/slurm/master_worker-s1.task.sh" in g.sbatch_text


@pytest.mark.parametrize("field,value,match", [
    ("cpus_per_worker", 0, "slurm.cpus_per_worker=0"),
    ("gpus_per_worker", -1, "slurm.gpus_per_worker=-1"),
    ("time_limit", "2 days", "slurm.time_limit='2 days' is not a Slurm time"),
    ("partition", "gpu;rm", "slurm.partition='gpu;rm'"),
    ("container_image", "a b", "slurm.container_image='a b'"),
    ("container_mounts", "/a:/a", "needs a container image"),
    ("extra_sbatch_args", ["account=x"], r"slurm.extra_sbatch_args\[0\]='account=x'"),
    ("extra_sbatch_args", ["--ntasks=3"], "the scheduler writes itself"),
    ("poll_interval_s", 0, "slurm.poll_interval_s=0"),
])
def test_spec_validation_names_the_field(field, value, match):
    with pytest.raises(ClusterSpecError, match=match):
        SlurmClusterSpec(**{field: value}).validate()
    for ok in ("30", "1:00:00", "2-00:00:00", "UNLIMITED"):
        SlurmClusterSpec(time_limit=ok).validate()


def test_slurm_state_names():
    assert slurm_state("RUNNING") == JobState.RUNNING and slurm_state("PENDING") == JobState.PENDING
    assert slurm_state("CANCELLED by 0") == JobState.CANCELLED and slurm_state("COMPLETED") == JobState.COMPLETED
    for s in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        assert slurm_state(s) == JobState.FAILED


# ------------------------------------------------------------------ runs through the fakes
def test_make_registers_slurm(tmp_path):
    c = sched.make("slurm", "e", "t", spec=SlurmClusterSpec(gpus_per_worker=0), log_dir=str(tmp_path))
    assert isinstance(c, SlurmSchedulerClient)


def test_group_runs_with_slurm_env_and_logs(tmp_path, fakes):
    c = _client(tmp_path)
    code = ("import os; print('worker', os.environ['REAL_WORKER_INDEX'], os.environ['SLURM_PROCID'], "
            "os.environ['SLURM_JOB_ID'], os.environ['REAL_JOB_NAME'], os.environ['MY_VAR'], {jobstep_id})")
    names = c.submit_array("model_worker", [sys.executable, "-c", code], count=3, env={"MY_VAR": "v"})
    names += c.submit_array("master_worker", [sys.executable, "-c", code], count=1, env={"MY_VAR": "m"})
    assert names == [f"exp_trial:model_worker/{i}" for i in range(3)] + ["exp_trial:master_worker/0"]
    infos = c.wait(timeout=60)
    assert sorted(i.name for i in infos) == sorted(names) and all(i.state == JobState.COMPLETED for i in infos)
    for i in range(3):
        with open(tmp_path / "logs" / f"model_worker-{i}") as f:
            assert f.read().split() == ["worker", str(i), str(i), "1000", f"exp_trial:model_worker/{i}", "v", str(i)]
    with open(tmp_path / "logs" / "master_worker-0") as f:
        assert f.read().split()[5] == "m"
    calls = fake_slurm.calls(fakes)
    assert sum(c.startswith("sbatch --parsable") for c in calls) == 2
    assert any(c.startswith("squeue") for c in calls)
    # a second submission continues the indices
    assert c.submit_array("model_worker", [sys.executable, "-c", "pass"], count=1) == ["exp_trial:model_worker/3"]
    c.wait(timeout=60)


def test_crashing_worker_is_named_and_the_rest_cancelled(tmp_path, fakes):
    c = _client(tmp_path)
    code = ("import os, sys, time\n"
            "i = int(os.environ['REAL_WORKER_INDEX'])\n"
            "if i == 1:\n    time.sleep(0.5); print('boom in worker one', flush=True); sys.exit(3)\n"
            "time.sleep(120)\n")
    c.submit_array("model_worker", [sys.executable, "-c", code], count=2)
    c.submit_array("master_worker", [sys.executable, "-c", "import time; time.sleep(120)"], count=1)
    with pytest.raises(JobException) as ei:
        c.wait(timeout=60)
    e = ei.value
    assert (e.worker_type, e.worker_index, e.exit_code) == ("model_worker", 1, 3)
    assert "exp_trial:model_worker-1" in str(e) and "exited with code 3" in str(e)
    assert "boom in worker one" in str(e) and "Slurm job 1000" in str(e)
    # every job is gone from the queue after the failure
    assert all(not i.state.active() for i in c.find_all())
    assert any(l.startswith("scancel") for l in fake_slurm.calls(fakes))


def test_the_crashed_worker_is_named_not_the_sibling_srun_stopped(tmp_path, fakes):
    """By the first poll the job has ended: worker 0, stopped by srun, wrote no exit code; worker 1 crashed."""
    c = _client(tmp_path)
    code = ("import os, sys, time\n"
            "if os.environ['REAL_WORKER_INDEX'] == '1':\n    sys.exit(3)\n"
            "time.sleep(5)\n")
    c.submit_array("model_worker", [sys.executable, "-c", code], count=2)
    assert sched.wait_until(lambda: os.path.exists(os.path.join(fakes, "state", "1000.rc")), 30)
    assert c._exit_code("model_worker", 0) is None and c._exit_code("model_worker", 1) == 3
    with pytest.raises(JobException) as ei:
        c.wait(timeout=30)
    assert (ei.value.worker_index, ei.value.exit_code) == (1, 3), str(ei.value)
    assert "exp_trial:model_worker-1" in str(ei.value) and "exited with code 3" in str(ei.value)


def test_stop_all_cancels(tmp_path, fakes):
    c = _client(tmp_path)
    c.submit_array("model_worker", [sys.executable, "-c", "import time; time.sleep(120)"], count=2)
    assert sched.wait_until(lambda: all(i.state == JobState.RUNNING for i in c.find_all()), 30)
    c.stop_all()
    assert [i.state for i in c.find_all()] == [JobState.CANCELLED] * 2
    with pytest.raises(JobException, match="cancelled"):
        c.wait(timeout=10)


@pytest.mark.parametrize("queue_forgets,accounting", [(False, False), (True, True)],
                         ids=["squeue-all-states-no-accounting", "forgotten-by-squeue-sacct"])
def test_job_ended_by_slurm_is_reported(tmp_path, fakes, monkeypatch, queue_forgets, accounting):
    """A job that ends without its workers' exit codes (node failure) is named with its Slurm state,
    found by ``squeue --states=all`` on a cluster without accounting, or by sacct once squeue forgot it."""
    if queue_forgets:
        monkeypatch.setenv("FAKE_SQUEUE_FORGETS", "1")
    if not accounting:
        monkeypatch.setenv("FAKE_NO_ACCOUNTING", "1")
    c = _client(tmp_path)
    c.submit_array("model_worker", [sys.executable, "-c", "import time; time.sleep(120)"], count=2)
    assert sched.wait_until(lambda: all(i.state == JobState.RUNNING for i in c.find_all()), 30)
    with open(os.path.join(fakes, "state", "1000.pid")) as f:
        os.killpg(int(f.read()), signal.SIGKILL)  # the whole job vanishes, no exit code is written
    with pytest.raises(JobException, match="Slurm job 1000 ended as NODE_FAIL before the worker exited"):
        c.wait(timeout=30)
    assert any(l.startswith("sacct") for l in fake_slurm.calls(fakes)) == queue_forgets


def test_sacct_asked_once_when_accounting_is_disabled(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("FAKE_NO_ACCOUNTING", "1")
    monkeypatch.setenv("FAKE_SQUEUE_FORGETS", "1")
    c = _client(tmp_path)
    c.submit_array("model_worker", [sys.executable, "-c", "pass"], count=1)
    c.submit_array("model_worker", [sys.executable, "-c", "import time; time.sleep(1)"], count=1)
    infos = c.wait(timeout=60)  # the exit code files still tell how each worker ended
    assert [i.state for i in infos] == [JobState.COMPLETED] * 2
    assert sum(l.startswith("sacct") for l in fake_slurm.calls(fakes)) == 1


def test_sbatch_refusal_is_reported(tmp_path, fakes, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    with pytest.raises(sched.SchedulerError, match="Invalid partition name"):
        _client(tmp_path).submit_array("model_worker", ["true"], count=1)


def test_missing_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(sched.SchedulerUnavailableError, match="needs 'sbatch' on PATH"):
        _client(tmp_path).submit_array("model_worker", ["true"], count=1)
    c = SlurmSchedulerClient("e", "t", spec=SlurmClusterSpec(gpus_per_worker=0), log_dir=str(tmp_path),
                             commands={"sbatch": "my-sbatch"})
    with pytest.raises(sched.SchedulerUnavailableError, match="my-sbatch"):
        c.submit_array("model_worker", ["true"], count=1)


def test_quickstart_options_make_the_spec():
    from realhf.api.quickstart.base import ConfigError
    from realhf.api.quickstart.entrypoint import parse_quickstart

    base = ["experiment_name=e", "trial_name=t", "mode=slurm", "n_nodes=2", "n_gpus_per_node=4"]
    c = parse_quickstart("sft", base + ["slurm.extra_sbatch_args=[--account=p,--exclusive]", "image_name=docker://x",
                                        "slurm.time_limit=30", "nodelist=N[01-02]", "partition=gpu"], validate=False)
    spec = c.slurm_cluster_spec()
    assert (spec.partition, spec.nodelist, spec.container_image, spec.nodes, spec.tasks_per_node) == \
        ("gpu", "N[01-02]", "docker://x", 2, 4)
    assert spec.extra_sbatch_args == ["--account=p", "--exclusive"] and spec.time_limit == "30"
    c = parse_quickstart("sft", base + ["slurm.time_limit=soon"], validate=False)
    with pytest.raises(ConfigError, match="slurm.time_limit='soon'"):
        c.slurm_cluster_spec()
    c = parse_quickstart("sft", base + ["partition='a b'"], validate=False)
    with pytest.raises(ConfigError, match="partition='a b'"):
        c.slurm_cluster_spec()
