"""DPO evaluates its valid set: ``dataset.valid_path`` gives eval records in stats.jsonl (through the CLI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def test_dpo_valid_path_is_evaluated(tmp_path):
    from realhf.base import constants

    steps = 2
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", "dpo", "experiment_name=dpo-eval", "trial_name=t",
           "n_gpus_per_node=1", "allocation_mode=d1", f"actor.path={TINY}", "actor.init_from_scratch=True",
           f"ref.path={TINY}", "ref.init_from_scratch=True", f"dataset.train_path={DATA}/rw_pair-train.jsonl",
           f"dataset.valid_path={DATA}/rw_pair-valid.jsonl", "dataset.max_seqlen=96", "dataset.train_bs_n_seqs=4",
           "dataset.valid_bs_n_seqs=100", f"exp_ctrl.benchmark_steps={steps}", f"exp_ctrl.eval_freq_steps={steps}"]
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path), REAL_FORCE_CPU="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log_dir = os.path.join(tmp_path, "logs", constants.get_user(), "dpo-eval", "t")
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    evals = [r for r in recs if "eval" in r]
    assert len(evals) == 1 and evals[0]["global_step"] == steps, recs
    ev = evals[0]["eval"]["actor_train"]
    for k in ("loss", "margin", "acc", "n_pairs"):
        assert k in ev and math.isfinite(ev[k]), ev
    assert 0.0 <= ev["acc"] <= 1.0 and ev["loss"] > 0
    assert ev["n_pairs"] >= 200  # every valid prompt contributes at least one pair
    assert "Evaluation actor_train" in res.stdout + res.stderr
