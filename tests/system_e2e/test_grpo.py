"""GRPO-family runs through the master and 4 forked model workers (2 steps each).

The tiny llama starts from scratch, so it never answers a math prompt; the
reward is a rule that varies on its random text (1 if the answer contains a
digit, plus the math check), which gives the groups different rewards and
the update something to learn from.
"""

from __future__ import annotations

import math
import os

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.experiments.common import utils
from realhf.system.pipe_runner import run_with_pipes

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")
REWARD = 'rule_reward.reward=[{name: format, pattern: "[0-9]"}, math]'
MAX_NEW = 12

# actor_gen on dp4, actor_train on dp2 x tp2: generation runs on a second actor replica.
REALLOC = ["allocation_mode=manual", "actor_gen.parallel.data_parallel_size=4",
           "actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
           "rew_inf.parallel.data_parallel_size=4", "ref_inf.parallel.data_parallel_size=4"]


def _args(*extra: str):
    return ["experiment_name=grpo", "trial_name=t", "n_gpus_per_node=4", f"dataset.path={DATA}/prompt-train.jsonl",
            "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48", f"actor.path={TINY}",
            "actor.init_from_scratch=True", "actor.optimizer.lr=1e-3", "grpo.group_size=4",
            f"grpo.gen.max_new_tokens={MAX_NEW}", "grpo.gen.min_new_tokens=1", "grpo.n_minibatches=2",
            "exp_ctrl.benchmark_steps=2", "rule_reward.n_workers=0", REWARD, *extra]


def _run(tmp_path, *extra: str):
    cfg = parse_quickstart("grpo", _args(*extra)).initial_setup()
    hist = run_with_pipes(cfg, "grpo", "t", timeout=300, fileroot=str(tmp_path)).history
    assert len(hist) == 2
    stats = [h.stats["actor_train"] for h in hist]
    for s in stats:
        keys = ["task_reward", "advantage", "actor_loss", "grad_norm", "kept_group_frac", "avg_gen_len", "n_updates"]
        if s["n_updates"] > 0:
            keys += ["clip_ratio", "importance_weight", "approx_kl"]
        for k in keys:
            assert k in s and math.isfinite(s[k]), (k, s)
        assert 0.0 <= s["task_reward"] <= 2.0 and s["n_seqs"] == 32  # 8 prompts x 4 samples
        assert s["avg_seq_len"] > s["avg_prompt_len"]
    assert any(s["n_updates"] > 0 and s["grad_norm"] > 0 for s in stats), stats
    return cfg, stats


def test_grpo_with_kl_loss_and_reallocated_generation(tmp_path):
    cfg, stats = _run(tmp_path, *REALLOC, "grpo.kl_loss_coef=0.01")
    names = {r.name: r for r in cfg.model_rpcs}
    assert set(names) == {"actor_gen", "rew_inf", "ref_inf", "actor_train"}
    gen = names["actor_gen"]
    assert gen.model_name.replica_id == 1 and gen.pre_hooks and gen.post_hooks
    # the frozen reference shares devices: offloaded after its call on GPUs (on the CPU it stays resident)
    assert names["ref_inf"].post_hooks == utils.frozen_offload_hooks()
    first = stats[0]
    # the reference is the actor's initial weights: no divergence before the first update
    assert abs(first["ref_kl"]) < 1e-3 and first["kl"] < 1e-3
    assert all(s["kept_group_frac"] == 1.0 for s in stats)


@pytest.mark.parametrize("variant", [
    pytest.param(["grpo.adv_estimator=dr_grpo", "allocation_mode=heuristic"], id="dr_grpo"),
    pytest.param(["grpo.eps_clip_higher=0.28", "grpo.dynamic_sampling=True", "grpo.overlong_tokens=4",
                  "grpo.overlong_penalty_factor=0.5", "grpo.loss_agg_mode=token-mean", "allocation_mode=d2p1m2"],
                 id="dapo"),
    pytest.param(["grpo.importance_sampling_level=sequence", "grpo.use_decoupled_loss=True",
                  "grpo.behav_imp_weight_cap=5.0", "allocation_mode=d2p2m1"], id="gspo-decoupled-pp2"),
    pytest.param(["grpo.adv_estimator=rloo", "allocation_mode=d4p1m1"], id="rloo"),
    pytest.param(["grpo.adv_estimator=reinforce_plus_plus", "grpo.kl_ctl=0.05", *REALLOC],
                 id="reinforce_plus_plus"),
    pytest.param(["rew_interface=paired_rw", f"rew.path={TINY}", "rew.init_from_scratch=True",
                  "allocation_mode=d2p1m2"], id="reward-model"),
    pytest.param(["grpo.adv_estimator=remax", "grpo.kl_loss_coef=0.01", "allocation_mode=d2p2m1"], id="remax-pp2"),
])
def test_grpo_family_variants(tmp_path, variant):
    cfg, stats = _run(tmp_path, *variant)
    if "rew_interface=paired_rw" in variant:  # a critic network scores: frozen, offloaded after its call
        rew = next(r for r in cfg.model_rpcs if r.name == "rew_inf")
        assert rew.interface_impl.type_ == "paired_rw" and rew.post_hooks == utils.frozen_offload_hooks()
    if "grpo.dynamic_sampling=True" in variant:
        # the refill generated until 8 groups had different rewards: the update got exactly those
        for s in stats:
            assert s["filter_rounds"] >= 1 and s["filter_passed"] >= 8 and s["filter_items"] == 8
            assert s["filter_passed"] + s["filter_dropped"] == 8 * s["filter_rounds"]
            assert s["kept_group_frac"] == 1.0 and s["trained_token_frac"] == 1.0
        assert all(s["overlong_penalty"] <= 0.0 for s in stats)
        # without EOS every answer has MAX_NEW tokens: the full penalty
        full = [s for s in stats if s["no_eos_ratio"] == 1.0]
        assert all(s["overlong_penalty"] == pytest.approx(-0.5) for s in full)
    if "grpo.use_decoupled_loss=True" in variant:
        # proximal = behaviour policy here, up to generation vs training numerics
        assert all(abs(s["behav_imp_weight"] - 1.0) < 1e-3 for s in stats if s["n_updates"] > 0)
    if "grpo.kl_ctl=0.05" in variant:
        assert "ref_kl" in stats[0]
    if "grpo.adv_estimator=remax" in variant:
        # each prompt's greedy answer was generated and scored, then used as the baseline only (n_seqs above)
        for s in stats:
            assert 0.0 <= s["greedy_task_reward"] <= 2.0
            assert 1 <= s["greedy_avg_gen_len"] <= MAX_NEW


def test_grpo_cli(tmp_path):
    """``python -m realhf.apps.quickstart grpo ...`` on 4 worker processes, rewards in a reward process."""
    import json

    from tests.system_e2e._cli import run_quickstart

    args = [a for a in _args("allocation_mode=heuristic", "grpo.kl_ctl=0.05", "rule_reward.n_workers=1",
                             "grpo.top_k=1000", "grpo.temperature=0.9")
            if not a.startswith(("experiment_name=", "trial_name=", "rule_reward.n_workers=0"))]
    res, log_dir = run_quickstart(str(tmp_path), "grpo", "grpo-cli", args)
    tail = f"\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert res.returncode == 0, tail
    assert "global step 2/2" in res.stdout, tail
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "stats" in r]
    assert [r["global_step"] for r in steps] == [1, 2]
    for r in steps:
        s = r["stats"]["actor_train"]
        for k in ("task_reward", "reward", "ref_kl", "advantage", "actor_loss", "grad_norm", "kept_group_frac"):
            assert k in s and math.isfinite(s[k]), (k, s)
        assert set(r["timing"]) >= {"actor_gen", "rew_inf", "ref_inf", "actor_train"}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_training_layouts_agree(tmp_path, agg):
    """The same rollout (generation fixed on dp4) trained on dp4, dp2 x tp2 and dp1 x pp2 x tp2 gives the
    same update: the loss's normalization (tokens or sequences of the whole batch, not of a rank's share)
    and the gradient reductions do not depend on the layout."""
    runs = {}
    for name, (d, p, m) in {"d4": (4, 1, 1), "d2m2": (2, 1, 2), "p2m2": (1, 2, 2)}.items():
        extra = ["allocation_mode=manual", "actor_gen.parallel.data_parallel_size=4",
                 f"actor_train.parallel.data_parallel_size={d}", f"actor_train.parallel.pipeline_parallel_size={p}",
                 f"actor_train.parallel.model_parallel_size={m}", "rew_inf.parallel.data_parallel_size=4",
                 f"grpo.loss_agg_mode={agg}", "grpo.n_minibatches=1", "exp_ctrl.benchmark_steps=1"]
        cfg = parse_quickstart("grpo", _args(*extra)).initial_setup()
        hist = run_with_pipes(cfg, "grpo", name, timeout=300, fileroot=str(tmp_path)).history
        runs[name] = hist[0].stats["actor_train"]
    ref = runs["d4"]
    assert ref["grad_norm"] > 0 and ref["task_reward"] > 0
    for name, s in runs.items():
        assert s["task_reward"] == ref["task_reward"] and s["avg_gen_len"] == ref["avg_gen_len"], name
        for key in ("actor_loss", "grad_norm", "importance_weight", "approx_kl", "advantage"):
            assert s[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key, s[key], ref[key])


def test_learning_rate_schedule_advances_once_per_train_call(tmp_path):
    """Every minibatch step of a call takes that call's learning rate, so a schedule spans the whole run
    whatever grpo.n_minibatches is (25 calls here: 200 prompts / 8; warmup over 20% of them = 5 calls)."""
    extra = ["allocation_mode=heuristic", f"dataset.path={DATA}/prompt-valid.jsonl", "grpo.n_minibatches=2",
             "actor.optimizer.lr_scheduler_type=constant", "actor.optimizer.warmup_steps_proportion=0.2",
             "exp_ctrl.benchmark_steps=3"]
    cfg = parse_quickstart("grpo", _args(*extra)).initial_setup()
    hist = run_with_pipes(cfg, "grpo", "t", timeout=300, fileroot=str(tmp_path)).history
    stats = [h.stats["actor_train"] for h in hist]
    assert [s["n_updates"] for s in stats] == [2.0, 2.0, 2.0]
    assert [s["lr"] for s in stats] == pytest.approx([1e-3 * k / 5 for k in (1, 2, 3)], rel=1e-9)
