"""RL runs resume exactly: a run saved after some steps and resumed (``recover_mode=save`` then
``recover_mode=resume``) logs the same statistics, step for step, as one uninterrupted run.

RL resumes more state than SFT: the workers' sampling generators, the dataloader's position after
dynamic sampling drew extra prompts to refill a batch, and (PPO) the critic and the KL controller.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.system_e2e._cli import DATA, TINY, run_quickstart, tiny_ppo_4workers

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))


def _train_stats(log_dir: str, call: str):
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["global_step"], r["stats"][call]) for r in records if "stats" in r]


def _check_resume_matches(tmp_path, exp: str, call: str, overrides, saved: int, total: int):
    res, straight = run_quickstart(tmp_path, exp, "straight", [*overrides, f"exp_ctrl.benchmark_steps={total}"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res, _ = run_quickstart(tmp_path, exp, "resumed",
                            [*overrides, f"exp_ctrl.benchmark_steps={saved}", "recover_mode=save"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res, resumed = run_quickstart(tmp_path, exp, "resumed",
                                  [*overrides, f"exp_ctrl.benchmark_steps={total}", "recover_mode=resume"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"global step {saved}/{total}" not in res.stdout  # it did not start over
    want, got = _train_stats(straight, call), _train_stats(resumed, call)
    assert [s for s, _ in want] == list(range(1, total + 1)) == [s for s, _ in got]
    for (step, a), (_, b) in zip(want, got):
        assert a.keys() == b.keys(), step
        for k in a:
            assert a[k] == b[k], (step, k, a[k], b[k])
    return want


def test_grpo_with_dynamic_sampling_resumes_exactly(tmp_path):
    overrides = ["n_gpus_per_node=2", "allocation_mode=heuristic", f"dataset.path={DATA}/prompt-train.jsonl",
                 "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48", f"actor.path={TINY}",
                 "actor.init_from_scratch=True", "actor.optimizer.lr=1e-3", "grpo.group_size=2",
                 "grpo.gen.max_new_tokens=4", "grpo.gen.min_new_tokens=1", "grpo.dynamic_sampling=True",
                 f"rule_reward.reward=[{{name: custom, path: {HERE}/_refill_reward.py, function: reward_half}}]"]
    stats = _check_resume_matches(tmp_path, "grpo", "actor_train", overrides, saved=2, total=4)
    assert all(s["filter_dropped"] > 0 for _, s in stats)  # the refill ran in every step, resumed ones too
    assert all(s["grad_norm"] > 0 for _, s in stats)


def test_ppo_resumes_exactly(tmp_path):
    """The critic's value normalizer and the adaptive KL coefficient continue from their saved values."""
    overrides = [o for o in tiny_ppo_4workers("ppo.use_adaptive_kl_ctl=True", "ppo.kl_ctl=0.1")
                 if not o.startswith("exp_ctrl.benchmark_steps")]
    stats = _check_resume_matches(tmp_path, "ppo", "actor_train", overrides, saved=1, total=3)
    assert all(s["kl_ctl"] != 0.1 for _, s in stats[1:])  # the coefficient moved, and resumed where it was
    assert all(s["denormalized_values"] != 0 for _, s in stats)
