"""rw, dpo and gen experiments through the master and model workers (4 workers, two allocation modes)."""

from __future__ import annotations

import json
import os

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.base import constants
from realhf.system.pipe_runner import run_with_pipes

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")
COMMON = ["trial_name=t", "n_gpus_per_node=4", "exp_ctrl.benchmark_steps=3"]


def _run(name, args, tmp_path, trial):
    cfg = parse_quickstart(name, COMMON + args).initial_setup()
    return run_with_pipes(cfg, name, trial, timeout=300, fileroot=str(tmp_path))


@pytest.mark.parametrize("mode", ["allocation_mode=d2p1m2", "allocation_mode=d1p2m2"])
def test_rw(tmp_path, mode):
    m = _run("rw", ["experiment_name=rw", mode, f"model.path={TINY}", "model.init_from_scratch=True",
                    f"dataset.train_path={DATA}/rw_pair-train.jsonl", "dataset.max_seqlen=128",
                    "dataset.train_bs_n_seqs=8"], tmp_path, mode[-6:])
    stats = [h.stats["rwTrain"] for h in m.history]
    assert len(stats) == 3 and all("loss" in s for s in stats)


@pytest.mark.parametrize("mode", ["allocation_mode=d2p1m2", "allocation_mode=actor_train:d2p2m1,ref_inf:d4p1m1"])
def test_dpo(tmp_path, mode):
    m = _run("dpo", ["experiment_name=dpo", mode, f"actor.path={TINY}", "actor.init_from_scratch=True",
                     f"ref.path={TINY}", "ref.init_from_scratch=True",
                     f"dataset.train_path={DATA}/rw_pair-train.jsonl", "dataset.max_seqlen=128",
                     "dataset.train_bs_n_seqs=8"], tmp_path, "m" + str(len(mode)))
    stats = [h.stats["actor_train"] for h in m.history]
    assert len(stats) == 3 and all("loss" in s for s in stats)


@pytest.mark.parametrize("mode", ["allocation_mode=d4p1m1", "allocation_mode=d2p1m2"])
def test_gen(tmp_path, mode):
    trial = mode[-6:]
    _run("gen", ["experiment_name=gen", mode, f"model.path={TINY}", "model.init_from_scratch=True",
                 f"dataset.path={DATA}/prompt-valid.jsonl", "dataset.train_bs_n_seqs=8", "gen.max_new_tokens=8",
                 "gen.min_new_tokens=1", "exp_ctrl.benchmark_steps=2"], tmp_path, trial)
    out = os.path.join(tmp_path, "logs", constants.get_user(), "gen", trial, "output.jsonl")
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 16 and {"id", "prompt", "answer"} <= set(rows[0])
