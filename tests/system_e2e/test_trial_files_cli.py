"""A trial's directories through the CLI: fresh logs on a rerun, cleanup of interrupted saves,
refused resumes and unwritable directories (refused before any worker starts, exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.distributed

SFT = ["sft", "model.path=realhf/assets/models/tiny-llama", "model.init_from_scratch=True",
       "dataset.train_path=realhf/assets/data/sft-train.jsonl", "dataset.train_bs_n_seqs=32"]
ONE = ["n_gpus_per_node=1", "allocation_mode=d1p1m1"]
TWO = ["n_gpus_per_node=2", "allocation_mode=d2p1m1"]


def _user() -> str:
    from realhf.base import constants

    return constants.get_user()


def _run(root, exp: str, trial: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, REAL_FILEROOT=str(root))
    return subprocess.run([sys.executable, "-m", "realhf.apps.quickstart", *SFT, f"experiment_name={exp}",
                           f"trial_name={trial}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _dir(root, kind: str, exp: str, trial: str) -> str:
    return os.path.join(str(root), kind, _user(), exp, trial)


def _steps(log_dir: str):
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        return [json.loads(l)["global_step"] for l in f if "stats" in json.loads(l)]


def test_rerun_starts_a_fresh_log_and_removes_interrupted_saves(tmp_path):
    exp, trial = "files-rerun", "t"
    logs = _dir(tmp_path, "logs", exp, trial)
    # What an earlier run of the same trial left: its logs, and a checkpoint killed mid-write.
    os.makedirs(logs)
    old_line = "master_worker INFO: [####] epoch 1/1 step 5 global step 5/5 | OLD RUN"
    with open(os.path.join(logs, "master_worker-0"), "w") as f:
        f.write(old_line + "\n")
    with open(os.path.join(logs, "stats.jsonl"), "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"global_step": step, "stats": {"trainDefault": {"loss": 1.0}}}) + "\n")
    half = os.path.join(_dir(tmp_path, "checkpoints", exp, trial), "default", ".epoch1epochstep5globalstep5.tmp-x1")
    os.makedirs(half)
    open(os.path.join(half, "model.safetensors"), "w").close()

    res = _run(tmp_path, exp, trial, *ONE, "exp_ctrl.benchmark_steps=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "global step 2/2" in res.stdout and "OLD RUN" not in res.stdout
    assert _steps(logs) == [1, 2]
    (prev,) = [d for d in os.listdir(logs) if d.startswith("previous-")]
    assert _steps(os.path.join(logs, prev)) == [1, 2, 3, 4, 5]
    assert old_line in open(os.path.join(logs, prev, "master_worker-0")).read()
    assert old_line not in open(os.path.join(logs, "master_worker-0")).read()
    assert not os.path.exists(half)


def test_resume_without_a_recover_state_is_refused(tmp_path):
    res = _run(tmp_path, "files-resume", "none", *TWO, "recover_mode=resume")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: recover_mode=resume, but there is no recover state to resume from ("
                           + os.path.join(_dir(tmp_path, "recover", "files-resume", "none"), "recover_info.pkl"))
    assert not os.path.exists(os.path.join(_dir(tmp_path, "logs", "files-resume", "none"), "model_worker-0"))


@pytest.mark.slow
def test_resume_needs_the_saved_layout_and_keeps_the_log_save_starts_fresh(tmp_path):
    exp, trial = "files-layout", "t"
    logs = _dir(tmp_path, "logs", exp, trial)
    res = _run(tmp_path, exp, trial, *TWO, "recover_mode=save", "exp_ctrl.benchmark_steps=1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = _run(tmp_path, exp, trial, *ONE, "recover_mode=resume", "exp_ctrl.benchmark_steps=2")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "saved with the layout [model workers: 2; default@0: d2p1m1 on workers [0, 1]]" in last, last
    assert "this run has [model workers: 1; default@0: d1p1m1 on workers [0]]" in last, last
    res = _run(tmp_path, exp, trial, *TWO, "recover_mode=resume", "exp_ctrl.benchmark_steps=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "global step 2/2" in res.stdout and "global step 1/2" not in res.stdout
    assert _steps(logs) == [1, 2]  # the resumed run continues the same log
    assert not [d for d in os.listdir(logs) if d.startswith("previous-")]
    # recover_mode=save only writes recover states: a rerun starts from step 1 with a fresh log.
    res = _run(tmp_path, exp, trial, *TWO, "recover_mode=save", "exp_ctrl.benchmark_steps=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "global step 1/2" in res.stdout and _steps(logs) == [1, 2]
    assert len([d for d in os.listdir(logs) if d.startswith("previous-")]) == 1


@pytest.mark.parametrize("where", ["fileroot", "checkpoints"])
def test_unwritable_directories_are_refused_before_workers_start(tmp_path, where):
    if where == "fileroot":
        root = tmp_path / "root-is-a-file"
        root.write_text("")
        expect = f"error: cannot write the file root directory {root}: [Errno 20] Not a directory"
    else:
        root = tmp_path / "root"
        root.mkdir()
        (root / "checkpoints").write_text("")  # a file where the checkpoint tree should be
        expect = (f"error: cannot write the checkpoint directory {_dir(root, 'checkpoints', 'files-ro', 't')}: "
                  f"[Errno 20] Not a directory: '{root / 'checkpoints'}")
    res = _run(root, "files-ro", "t", *TWO, "exp_ctrl.benchmark_steps=1")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(expect), last
    assert "Traceback" not in res.stderr


def test_read_only_log_directory_is_refused(tmp_path):
    root = tmp_path / "root"
    logs = root / "logs"
    logs.mkdir(parents=True)
    os.chmod(logs, 0o500)
    try:
        if os.access(logs, os.W_OK):
            pytest.skip("this user writes into read-only directories (root)")
        res = _run(root, "files-ro", "t", *TWO, "exp_ctrl.benchmark_steps=1")
        assert res.returncode == 2
        assert res.stderr.strip().splitlines()[-1].startswith(
            f"error: cannot write the log directory {_dir(root, 'logs', 'files-ro', 't')}: [Errno 13] Permission denied")
    finally:
        os.chmod(logs, 0o700)


def test_epochs_are_labelled_alike_in_logs_stats_and_checkpoints(tmp_path):
    # 200 records in batches of 100: two steps per epoch, two epochs, a checkpoint per epoch.
    exp, trial = "files-epochs", "t"
    res = _run(tmp_path, exp, trial, *ONE, "dataset.train_path=realhf/assets/data/sft-valid.jsonl",
               "dataset.train_bs_n_seqs=100", "exp_ctrl.total_train_epochs=2", "exp_ctrl.save_freq_epochs=1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    saved = sorted(os.listdir(os.path.join(_dir(tmp_path, "checkpoints", exp, trial), "default")))
    assert saved == ["epoch1epochstep2globalstep2", "epoch2epochstep2globalstep4"]
    for e, s, g in [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]:
        assert f"epoch {e}/2 step {s} global step {g}/4 " in res.stdout
    with open(os.path.join(_dir(tmp_path, "logs", exp, trial), "stats.jsonl")) as f:
        recs = [json.loads(l) for l in f]
    assert [(r["epoch"], r["epoch_step"], r["global_step"]) for r in recs if "stats" in r] == \
        [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
