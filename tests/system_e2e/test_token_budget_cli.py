"""``<call>.max_tokens_per_mb`` from the command line reaches the launched MFCDef and the run works."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from tests.system_e2e._cli import run_quickstart, tiny_sft

pytestmark = pytest.mark.distributed


def test_sft_token_budget_is_launched(tmp_path):
    res, log_dir = run_quickstart(tmp_path, "sft", "budget", tiny_sft(
        "n_gpus_per_node=1", "allocation_mode=d1", "dataset.max_seqlen=128", "dataset.train_bs_n_seqs=8",
        "allocation.max_tokens_per_mb=256", "exp_ctrl.benchmark_steps=2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(log_dir, "experiment_config.pkl"), "rb") as f:
        cfg = pickle.load(f)
    (rpc,) = cfg.model_rpcs
    assert rpc.max_tokens_per_mb == 256
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"stats"' in line]
    assert len(steps) == 2


def test_token_budget_refused_when_not_positive(tmp_path):
    res, _ = run_quickstart(tmp_path, "sft", "budget", tiny_sft(
        "n_gpus_per_node=1", "allocation_mode=d1", "allocation.max_tokens_per_mb=0"), timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "allocation.max_tokens_per_mb=0" in lines[0] and "positive integer" in lines[0], lines
