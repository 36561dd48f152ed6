"""DAPO dynamic sampling refills the batch: 4 forked workers, rewards that make most groups flat.

The rewards (``_refill_reward.py``) depend on the answer only for prompts
whose dataset index is a multiple of 2 (or 4); every other group has equal
rewards. The tests replay the dataloader's draw order to know, per step,
how many batches the refill must generate and how many groups pass.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.core.data_api import PackedDataLoader, make_dataset
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.system.pipe_runner import run_with_pipes

from tests.system_e2e._refill_reward import varies

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")
BATCH, GROUP = 8, 4


def _config(every: int, *extra: str):
    fn = {2: "reward_half", 4: "reward_quarter"}[every]
    args = ["experiment_name=grpo-refill", "trial_name=t", "n_gpus_per_node=4",
            f"dataset.path={DATA}/prompt-train.jsonl", f"dataset.train_bs_n_seqs={BATCH}",
            "dataset.max_prompt_len=48", f"actor.path={TINY}", "actor.init_from_scratch=True",
            "actor.optimizer.lr=1e-3", f"grpo.group_size={GROUP}", "grpo.gen.max_new_tokens=8",
            "grpo.gen.min_new_tokens=1", "grpo.dynamic_sampling=True", "exp_ctrl.benchmark_steps=2",
            "rule_reward.n_workers=0",
            f"rule_reward.reward=[{{name: custom, path: {HERE}/_refill_reward.py, function: {fn}}}]", *extra]
    return parse_quickstart("grpo", args).initial_setup()


def _expected(cfg, every: int, steps: int, cap: int) -> List[Tuple[int, int, int]]:
    """(rounds, groups passed, groups dropped) of each step, from the loader's draw order."""
    spec = next(w for w in cfg.model_worker if w.datasets)
    ds = make_dataset(spec.datasets[0], cfg.seed, 0, 1, TINY)
    max_dp = max(cfg.model_layouts[r.model_name].topology.get_dim("data") for r in cfg.model_rpcs)
    batches = iter(PackedDataLoader(ds, batch_size=BATCH, shuffle=True, seed=cfg.seed, min_last_batch=max_dp))
    out = []
    for _ in range(steps):
        rounds = passed = dropped = 0
        while True:
            rounds += 1
            ok = [varies(i, every) for i in next(batches).ids]
            passed, dropped = passed + sum(ok), dropped + len(ok) - sum(ok)
            if passed >= BATCH or (cap and rounds >= cap):
                break
        out.append((rounds, passed, dropped))
    return out


def _filter_stats(s) -> Tuple[int, int, int]:
    return int(s["filter_rounds"]), int(s["filter_passed"]), int(s["filter_dropped"])


def test_refill_trains_on_exactly_the_batch_of_groups_with_different_rewards(tmp_path):
    cfg = _config(2, "allocation_mode=d2p1m2", "grpo.kl_loss_coef=0.01")
    train = next(r for r in cfg.model_rpcs if r.name == "actor_train")
    assert train.input_filter.name == "grpo_dynamic_sampling" and train.input_filter.max_rounds == 0
    expected = _expected(cfg, 2, steps=2, cap=0)
    assert all(rounds > 1 for rounds, _, _ in expected)  # the data make the refill work
    runs = {mode: run_with_pipes(cfg, "grpo-refill", mode, timeout=300, fileroot=str(tmp_path),
                                 concurrent=(mode == "concurrent")).history
            for mode in ("concurrent", "sequential")}
    for log, (rounds, passed, dropped) in zip(runs["concurrent"], expected):
        s = log.stats["actor_train"]
        assert _filter_stats(s) == (rounds, passed, dropped)
        # exactly the configured number of groups reached the update, none of them flat
        assert s["filter_items"] == BATCH and s["n_seqs"] == BATCH * GROUP and s["kept_group_frac"] == 1.0
        assert s["n_updates"] > 0
        # producers ran once per round; the reference and the update once, after the filter
        assert {f"actor_gen#{r}" for r in range(2, rounds + 1)} <= set(log.timing)
        assert f"actor_gen#{rounds + 1}" not in log.timing and f"filter#{rounds}" in log.timing
        assert "ref_inf#2" not in log.timing and "ref_inf" in log.timing
    # rounds run one after the other: concurrent issuing changes nothing
    assert [h.stats for h in runs["concurrent"]] == [h.stats for h in runs["sequential"]]


def test_refill_stops_at_the_cap_and_trains_on_what_passed(tmp_path):
    cfg = _config(4, "allocation_mode=d4p1m1", "grpo.dynamic_sampling_max_batches=2")
    expected = _expected(cfg, 4, steps=2, cap=2)
    assert all(passed < 4 for _, passed, _ in expected)  # the cap binds, and before a group per dp rank passed
    hist = run_with_pipes(cfg, "grpo-refill", "cap", timeout=300, fileroot=str(tmp_path)).history
    for log, (rounds, passed, dropped) in zip(hist, expected):
        s = log.stats["actor_train"]
        assert rounds == 2 and _filter_stats(s) == (2, passed, dropped)
        assert "actor_gen#3" not in log.timing
        # every group that passed; flat ones only to give each of the 4 dp ranks a group (no weight in the loss)
        items = max(passed, 4)
        assert s["filter_items"] == items and s["n_seqs"] == items * GROUP
        assert s["kept_group_frac"] == pytest.approx(passed / items)
