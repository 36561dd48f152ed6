"""A run writes tensorboard event files (tensorboard is a dependency) next to stats.jsonl."""

from __future__ import annotations

import glob
import os

import pytest

from tests.system_e2e._cli import run_quickstart, tiny_sft

pytestmark = pytest.mark.distributed


def test_short_run_writes_tensorboard_events(tmp_path):
    import tensorboard  # noqa: F401  (a hard dependency: must be importable)

    res, log_dir = run_quickstart(tmp_path, "sft", "tb", tiny_sft(
        "n_gpus_per_node=1", "allocation_mode=d1", "dataset.max_seqlen=64", "dataset.train_bs_n_seqs=4",
        "exp_ctrl.benchmark_steps=1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    events = glob.glob(os.path.join(log_dir, "tensorboard", "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0, os.listdir(log_dir)
