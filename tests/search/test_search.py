"""The plan search: optimum on a brute-forceable space, determinism, memory, heuristic baseline."""

import dataclasses
import math

import pytest

from realhf.search.baseline import heuristic_plan
from realhf.search.hardware import h100_profile
from realhf.search.search import PlanSearch, candidate_layouts, candidate_meshes
from realhf.search.workload import LLAMA, INFERENCE, CallSpec, Mesh, ModelShape, ppo_calls
from tests.search.test_cost import simple_profile

M = ModelShape(n_layers=4, hidden=64, intermediate=128, n_q_heads=4, n_kv_heads=2, vocab=100)


def small_ppo(prof=None):
    prof = prof or simple_profile(devices_per_node=2, op_overhead_s=1e-4, call_overhead_s=1e-3)
    calls = ppo_calls(M, n_seqs=8, prompt_len=16, gen_len=8, n_minibatches=2, grad_ckpt=False)
    return calls, prof


def test_candidate_meshes_aligned():
    assert candidate_meshes(1, 4) == [Mesh(0, 1), Mesh(0, 2), Mesh(0, 4), Mesh(1, 1), Mesh(2, 1), Mesh(2, 2),
                                      Mesh(3, 1)]
    meshes = candidate_meshes(2, 8)
    assert Mesh(8, 8) in meshes and Mesh(0, 16) in meshes and Mesh(4, 8) not in meshes


def test_candidate_layouts_respect_model():
    call = CallSpec("i", "r", INFERENCE, M, n_seqs=8, prompt_len=8)
    lays = candidate_layouts(call, 8, per_node=8)
    assert all(l.size == 8 and M.n_q_heads % l.tp == 0 and M.n_layers % l.pp == 0 for l in lays)
    assert not any(l.tp == 8 for l in lays)  # 8 does not divide 4 heads


def test_finds_brute_force_optimum():
    calls, prof = small_ppo()
    calls = calls[:2] + calls[4:5]  # actor_gen, rew_inf, actor_train: a space brute force can cover
    space = PlanSearch(calls, prof, n_nodes=1)
    exact = space.brute_force()
    assert exact.iters == math.prod(len(c) for c in space.candidates.values())
    res = space.run(seed=0, iters=1500, time_budget_s=60)
    assert res.seconds == pytest.approx(exact.seconds, rel=1e-9)


def test_deterministic_for_seed():
    calls, prof = small_ppo()
    a = PlanSearch(calls, prof, 1).run(seed=3, iters=400, time_budget_s=60, polish=False)
    b = PlanSearch(calls, prof, 1).run(seed=3, iters=400, time_budget_s=60, polish=False)
    assert a.plan == b.plan and a.seconds == b.seconds and a.accepted == b.accepted


def test_oom_plans_rejected():
    calls, prof = small_ppo()
    # enough memory for one model's train state per device, not two: the search must separate them
    prof = dataclasses.replace(prof, memory_bytes=1.0)
    with pytest.raises(ValueError, match="fits"):
        PlanSearch(calls, prof, 1)
    calls, prof = small_ppo()
    state = M.n_params * 16
    prof = dataclasses.replace(prof, memory_bytes=1.5 * state / prof.usable_memory_fraction)
    space = PlanSearch(calls, prof, 1)
    res = space.run(seed=0, iters=800)
    ev = space.evaluator.evaluate(res.plan)
    assert not ev.oom and ev.peak_memory <= prof.memory_bytes * prof.usable_memory_fraction
    a, c = res.plan["actor_train"], res.plan["critic_train"]
    assert a.layout.tp * a.layout.pp > 1 or c.layout.tp * c.layout.pp > 1 or not a.mesh.overlaps(c.mesh)


def test_beats_or_matches_heuristic_llama7b_on_8_h100():
    prof = h100_profile()
    calls = ppo_calls(LLAMA["7b"], n_seqs=256, prompt_len=256, gen_len=256)
    space = PlanSearch(calls, prof, 1)
    heur = heuristic_plan(calls, prof, 1, space.evaluator)
    res = space.run(seed=0, iters=500, time_budget_s=20, init=[heur])
    assert res.seconds < math.inf
    assert res.seconds <= space.evaluator.evaluate(heur).raw_seconds
