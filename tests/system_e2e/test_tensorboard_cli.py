"""A run writes tensorboard event files (tensorboard is a dependency) next to stats.jsonl."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def test_short_run_writes_tensorboard_events(tmp_path):
    import tensorboard  # noqa: F401  (a hard dependency: must be importable)
    from realhf.base import constants

    cmd = [sys.executable, "-m", "realhf.apps.quickstart", "sft", "experiment_name=tb", "trial_name=t",
           "n_gpus_per_node=1", "allocation_mode=d1", f"model.path={TINY}", "model.init_from_scratch=True",
           f"dataset.train_path={DATA}/sft-train.jsonl", "dataset.max_seqlen=64", "dataset.train_bs_n_seqs=4",
           "exp_ctrl.benchmark_steps=1"]
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path), REAL_FORCE_CPU="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log_dir = os.path.join(tmp_path, "logs", constants.get_user(), "tb", "t")
    events = glob.glob(os.path.join(log_dir, "tensorboard", "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0, os.listdir(log_dir)
