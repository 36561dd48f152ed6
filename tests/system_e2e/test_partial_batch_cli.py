"""A dataset whose last batch is smaller than the data-parallel size trains: that
batch is skipped each epoch (said once before workers start), instead of a
data-parallel rank receiving nothing."""

from __future__ import annotations

import json
import os

import pytest

from tests.system_e2e._cli import DATA, run_quickstart, tiny_sft

pytestmark = pytest.mark.distributed


def test_trailing_batch_smaller_than_dp_is_skipped(tmp_path):
    with open(os.path.join(DATA, "sft-train.jsonl")) as f:
        lines = [next(f) for _ in range(5)]
    train = tmp_path / "five.jsonl"
    train.write_text("".join(lines))
    res, log_dir = run_quickstart(tmp_path / "root", "sft", "partial", tiny_sft(
        "n_gpus_per_node=2", "allocation_mode=d2p1m1", f"dataset.train_path={train}", "dataset.max_seqlen=128",
        "dataset.train_bs_n_seqs=4", "exp_ctrl.total_train_epochs=2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "last batch of each epoch would hold 1" in out and "skipped" in out
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"stats"' in line]
    # 5 samples in batches of 4 over 2 ranks: one full batch per epoch, the single leftover skipped.
    assert len(steps) == 2
