"""``<call>.max_tokens_per_mb`` from the command line reaches the launched MFCDef and the run works."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def test_sft_token_budget_is_launched(tmp_path):
    from realhf.base import constants

    cmd = [sys.executable, "-m", "realhf.apps.quickstart", "sft", "experiment_name=budget", "trial_name=t",
           "n_gpus_per_node=1", "allocation_mode=d1", f"model.path={TINY}", "model.init_from_scratch=True",
           f"dataset.train_path={DATA}/sft-train.jsonl", "dataset.max_seqlen=128", "dataset.train_bs_n_seqs=8",
           "allocation.max_tokens_per_mb=256", "exp_ctrl.benchmark_steps=2"]
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path), REAL_FORCE_CPU="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log_dir = os.path.join(tmp_path, "logs", constants.get_user(), "budget", "t")
    with open(os.path.join(log_dir, "experiment_config.pkl"), "rb") as f:
        cfg = pickle.load(f)
    (rpc,) = cfg.model_rpcs
    assert rpc.max_tokens_per_mb == 256
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"stats"' in line]
    assert len(steps) == 2


def test_token_budget_refused_when_not_positive(tmp_path):
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", "sft", "experiment_name=budget", "trial_name=t",
           f"model.path={TINY}", f"dataset.train_path={DATA}/sft-train.jsonl", "n_gpus_per_node=1",
           "allocation_mode=d1", "allocation.max_tokens_per_mb=0"]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, REAL_FORCE_CPU="1"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "allocation.max_tokens_per_mb=0" in lines[0] and "positive integer" in lines[0], lines
