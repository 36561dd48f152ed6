"""PPO through the master and model workers: six calls, reallocation and offload hooks."""

from __future__ import annotations

import os

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.system.pipe_runner import run_with_pipes

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def _ppo_args(gen_layout: str, greedy: bool = True, steps: int = 2):
    args = ["experiment_name=ppo", "trial_name=t", "n_gpus_per_node=4", "allocation_mode=manual",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=1", f"ppo.gen.greedy={greedy}",
            f"exp_ctrl.benchmark_steps={steps}", "ppo.ppo_n_minibatches=1"]
    for r in ["actor", "critic", "ref", "rew"]:
        args += [f"{r}.path={TINY}", f"{r}.init_from_scratch=True"]
    # actor_train dp2 x tp2; actor_gen either the same layout or dp4 (another replica, reallocated).
    args += ["actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
             "critic_train.parallel.data_parallel_size=2", "critic_train.parallel.pipeline_parallel_size=2",
             "critic_inf.parallel.data_parallel_size=2", "critic_inf.parallel.pipeline_parallel_size=2",
             "ref_inf.parallel.data_parallel_size=4", "rew_inf.parallel.data_parallel_size=4"]
    if gen_layout == "same":
        args += ["actor_gen.parallel.data_parallel_size=2", "actor_gen.parallel.model_parallel_size=2"]
    else:
        args += ["actor_gen.parallel.data_parallel_size=4"]
    return args


def test_ppo_reallocated_generation_matches_shared_layout(tmp_path):
    runs = {}
    for layout in ("same", "dp4"):
        cfg = parse_quickstart("ppo", _ppo_args(layout)).initial_setup()
        names = {r.name: r.model_name for r in cfg.model_rpcs}
        if layout == "dp4":
            assert names["actor_gen"].replica_id == 1 and names["actor_train"].replica_id == 0
            gen = next(r for r in cfg.model_rpcs if r.name == "actor_gen")
            assert gen.pre_hooks and gen.post_hooks  # pull from and drop back to the train replica
        else:
            assert names["actor_gen"] == names["actor_train"]
        runs[layout] = run_with_pipes(cfg, "ppo", layout, timeout=300, fileroot=str(tmp_path)).history
    for call in ("actor_train", "critic_train"):
        a, b = runs["same"][0].stats[call], runs["dp4"][0].stats[call]
        for key in ("task_reward", "avg_seq_len", "advantage"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (call, key, a[key], b[key])
    assert len(runs["dp4"]) == 2


def test_ppo_heuristic_allocation_runs(tmp_path):
    args = [a for a in _ppo_args("dp4", greedy=False) if "parallel." not in a and not a.startswith("allocation_mode")]
    cfg = parse_quickstart("ppo", args + ["allocation_mode=heuristic"]).initial_setup()
    layouts = {r.name: cfg.model_layouts[r.model_name].global_ranks for r in cfg.model_rpcs}
    assert layouts["actor_gen"] == [0, 1, 2, 3] and layouts["actor_train"] == [0, 1]
    assert layouts["critic_train"] == [2, 3] and layouts["ref_inf"] == [0, 1, 2, 3]
    hist = run_with_pipes(cfg, "ppo", "heuristic", timeout=300, fileroot=str(tmp_path)).history
    assert len(hist) == 2 and all(-1e3 < h.stats["actor_train"]["task_reward"] < 1e3 for h in hist)
