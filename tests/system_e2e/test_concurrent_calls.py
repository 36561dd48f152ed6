"""Calls on disjoint meshes run at the same time and give the results of one-at-a-time execution.

PPO on 4 workers: actor and reference on workers 0-1, critic and reward
model on workers 2-3 (dp2 each). After generation, ref_inf (0-1) runs while
rew_inf and critic_inf (2-3) run; actor_train (0-1) runs while critic_train
(2-3) runs. Sampling is not greedy, so any change in which items reach which
rank, or in the order a worker consumes its random numbers, changes the
statistics.
"""

from __future__ import annotations

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.system.pipe_runner import run_with_pipes
from tests.system_e2e._cli import tiny_ppo_on_meshes

pytestmark = pytest.mark.distributed

MESHES = {"actor_gen": [0, 1], "actor_train": [0, 1], "ref_inf": [0, 1],
          "rew_inf": [2, 3], "critic_inf": [2, 3], "critic_train": [2, 3]}
PAIRS = [("ref_inf", "rew_inf"), ("actor_train", "critic_train")]


def _config():
    return parse_quickstart("ppo", tiny_ppo_on_meshes(4, MESHES)).initial_setup()


def _overlap(timing, a, b) -> bool:
    """Whether each call started before the other ended (workers' clocks)."""
    return timing[a]["start"] < timing[b]["end"] and timing[b]["start"] < timing[a]["end"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cfg = _config()
    root = str(tmp_path_factory.mktemp("concurrent"))
    return {mode: run_with_pipes(cfg, "ppo", mode, timeout=300, fileroot=root,
                                 concurrent=(mode == "concurrent")).history
            for mode in ("concurrent", "sequential")}


def test_calls_go_only_to_their_mesh(runs):
    for log in runs["concurrent"]:
        assert {c: log.timing[c]["ranks"] for c in MESHES} == MESHES


def test_disjoint_meshes_overlap_and_sequential_mode_does_not(runs):
    for a, b in PAIRS:
        assert any(_overlap(log.timing, a, b) for log in runs["concurrent"]), \
            (a, b, [(log.timing[a], log.timing[b]) for log in runs["concurrent"]])
        assert not any(_overlap(log.timing, a, b) for log in runs["sequential"])
    # Every call starts after the calls it depends on have ended.
    for log in runs["concurrent"]:
        t = log.timing
        for call in ("ref_inf", "rew_inf", "critic_inf"):
            assert t[call]["start"] >= t["actor_gen"]["end"]
        for call in ("actor_train", "critic_train"):
            assert t[call]["start"] >= max(t[c]["end"] for c in ("ref_inf", "rew_inf", "critic_inf"))


def test_concurrent_results_equal_sequential_bit_for_bit(runs):
    conc, seq = runs["concurrent"], runs["sequential"]
    assert len(conc) == len(seq) == 2
    for a, b in zip(conc, seq):
        assert a.n_tokens == b.n_tokens
        assert a.stats == b.stats  # exact float equality, every call, every statistic
    assert conc[0].stats["actor_train"] != conc[1].stats["actor_train"]  # the statistics do change per step
