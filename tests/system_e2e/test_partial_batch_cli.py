"""A dataset whose last batch is smaller than the data-parallel size trains: that
batch is skipped each epoch (said once before workers start), instead of a
data-parallel rank receiving nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def test_trailing_batch_smaller_than_dp_is_skipped(tmp_path):
    from realhf.base import constants

    with open(os.path.join(DATA, "sft-train.jsonl")) as f:
        lines = [next(f) for _ in range(5)]
    train = tmp_path / "five.jsonl"
    train.write_text("".join(lines))
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", "sft", "experiment_name=partial", "trial_name=t",
           "n_gpus_per_node=2", "allocation_mode=d2p1m1", f"model.path={TINY}", "model.init_from_scratch=True",
           f"dataset.train_path={train}", "dataset.max_seqlen=128", "dataset.train_bs_n_seqs=4",
           "exp_ctrl.total_train_epochs=2"]
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path / "root"), REAL_FORCE_CPU="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "last batch of each epoch would hold 1" in out and "skipped" in out
    log_dir = os.path.join(tmp_path, "root", "logs", constants.get_user(), "partial", "t")
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"stats"' in line]
    # 5 samples in batches of 4 over 2 ranks: one full batch per epoch, the single leftover skipped.
    assert len(steps) == 2
