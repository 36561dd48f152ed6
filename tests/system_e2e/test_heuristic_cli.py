"""``allocation_mode=heuristic`` from the command line: SFT of the tiny model on 2 CPU workers."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from tests.system_e2e._cli import run_quickstart, tiny_sft

pytestmark = pytest.mark.distributed


def test_sft_heuristic_runs_data_parallel(tmp_path):
    res, log_dir = run_quickstart(tmp_path, "sft", "heur", tiny_sft(
        "n_gpus_per_node=2", "allocation_mode=heuristic", "dataset.max_seqlen=128", "dataset.train_bs_n_seqs=8",
        "exp_ctrl.benchmark_steps=2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(log_dir, "experiment_config.pkl"), "rb") as f:
        cfg = pickle.load(f)
    (rpc,) = cfg.model_rpcs
    dims = cfg.model_layouts[rpc.model_name].topology.get_dim_dict()
    assert (dims["data"], dims["pipe"], dims["model"]) == (2, 1, 1)  # the tiny model fits one worker
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"stats"' in line]
    assert len(steps) == 2
