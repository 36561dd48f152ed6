"""Cost model against hand-computed numbers."""

import dataclasses
import math

import pytest

from realhf.search.cost import (
    allreduce_time,
    call_cost,
    forward_time,
    kv_cache_bytes,
    layer_forward_flops,
    realloc_time,
    train_state_bytes,
)
from realhf.search.hardware import DeviceProfile, h100_profile
from realhf.search.plan import PlanEvaluator
from realhf.search.workload import GENERATE, INFERENCE, LLAMA, TRAIN, Assignment, CallSpec, Layout, Mesh, ModelShape

M = ModelShape(n_layers=4, hidden=64, intermediate=128, n_q_heads=4, n_kv_heads=2, vocab=100)


def simple_profile(**kw) -> DeviceProfile:
    """1 GFLOP/s, 1 GB/s everywhere, no latency or overheads: times are easy to hand-compute."""
    d = dict(name="t", matmul_flops=1e9, mem_bytes_per_s=1e9, memory_bytes=1e12, intra_bw=1e9, inter_bw=1e8,
             intra_lat=0.0, inter_lat=0.0, devices_per_node=4, param_bytes=2)
    d.update(kw)
    return DeviceProfile(**d)


def test_layer_flops_and_params():
    # q,o: 64x64 each; k,v: 64 x (2 heads x 16); SwiGLU: 3 x 64 x 128
    assert M.layer_matmul_params == 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert layer_forward_flops(M, tokens=10, ctx=5) == 2 * 10 * M.layer_matmul_params + 4 * 10 * 5 * 64
    # LLaMA-2 7B has 6.74e9 parameters
    assert LLAMA["7b"].n_params == pytest.approx(6.74e9, rel=0.01)
    assert LLAMA["70b"].n_params == pytest.approx(69.0e9, rel=0.01)


def test_adam_state_memory():
    lay = Layout(1, 2, 2)
    # bf16: weights 2 + grads 2 + fp32 master 4 + Adam moments 8 = 16 bytes per weight, sharded over tp x pp
    assert train_state_bytes(M, lay, 2) == M.n_params / 4 * 16
    # fp32 (CPU): weights 4 + grads 4 + moments 8, no master copy
    assert train_state_bytes(M, lay, 4) == M.n_params / 4 * 16
    assert train_state_bytes(LLAMA["7b"], Layout(1, 1, 1), 2) / 1e9 == pytest.approx(107.8, rel=0.01)


def test_kv_cache_bytes():
    call = CallSpec("g", "a", GENERATE, M, n_seqs=8, prompt_len=10, gen_len=6)
    # 2 (k,v) x 4 layers x 2 kv heads x 16 head dim x 8 rows x 16 positions x 2 bytes
    assert kv_cache_bytes(call, Layout(1, 1, 1), 2) == 2 * 4 * 2 * 16 * 8 * 16 * 2
    assert kv_cache_bytes(call, Layout(2, 2, 2), 2) == 2 * 2 * 1 * 16 * 4 * 16 * 2


def test_allreduce_ring():
    assert allreduce_time(1e9, 1, 1e9, 1e-3) == 0.0
    assert allreduce_time(1e9, 4, 1e9, 0.0) == pytest.approx(1.5)
    assert allreduce_time(0, 2, 1e9, 1e-3) == pytest.approx(2e-3)


def test_pipeline_bubble():
    prof = simple_profile()
    call = CallSpec("i", "r", INFERENCE, M, n_seqs=8, prompt_len=8)
    tokens, ctx = 64, 4
    one = forward_time(call, Layout(1, 1, 1, 1), prof, False, tokens=tokens, ctx=ctx)
    # pp=2 with m micro-batches: (m + pp - 1) slots of 1/(pp m) of the work (+ p2p of tokens/m x hidden x 2 bytes)
    for m in (1, 2, 8):
        t = forward_time(call, Layout(1, 1, 2, m), prof, False, tokens=tokens, ctx=ctx)
        layers_part = (one - 2 * tokens * M.head_params / 1e9) / 2
        slot = (layers_part + 2 * tokens * M.head_params / 1e9) / m + tokens / m * 64 * 2 / 1e9
        assert t == pytest.approx(slot * (m + 1), rel=1e-9)


def test_train_time_scales_with_backward_and_dp():
    prof = simple_profile()
    call = CallSpec("t", "a", TRAIN, M, n_seqs=8, prompt_len=8, gen_len=8, trained_role=True)
    inf = dataclasses.replace(call, kind=INFERENCE)
    a = Assignment(Mesh(0, 1), Layout(1, 1, 1))
    t_train, t_inf = call_cost(call, a, prof).seconds, call_cost(inf, a, prof).seconds
    optim = 2 * M.n_params * 16 / 1e9
    assert t_train - optim == pytest.approx(3 * t_inf, rel=1e-9)
    t_dp2 = call_cost(call, Assignment(Mesh(0, 2), Layout(2, 1, 1)), prof).seconds
    assert t_dp2 < t_train


def test_oom_verdict():
    prof = dataclasses.replace(h100_profile(), memory_bytes=80e9)
    call = CallSpec("t", "a", TRAIN, LLAMA["7b"], n_seqs=64, prompt_len=512, gen_len=512, grad_ckpt=True)
    assert call_cost(call, Assignment(Mesh(0, 1), Layout(1, 1, 1)), prof).oom  # 108 GB of Adam states
    assert not call_cost(call, Assignment(Mesh(0, 4), Layout(1, 4, 1, 4)), prof).oom


def test_realloc_cost():
    prof = simple_profile()
    src = Assignment(Mesh(0, 2), Layout(1, 2, 1))
    assert realloc_time(M, src, src, prof) == 0.0
    dst = Assignment(Mesh(2, 2), Layout(2, 1, 1))
    assert realloc_time(M, src, dst, prof) == pytest.approx(M.n_params * 2 / 1e9)
    across = Assignment(Mesh(4, 4), Layout(4, 1, 1))  # other node: inter-node bandwidth 1e8
    assert realloc_time(M, src, across, prof) == pytest.approx(M.n_params * 2 / 1e8)


def _two_calls(deps=()):
    return [CallSpec("a", "r1", INFERENCE, M, (), n_seqs=8, prompt_len=8),
            CallSpec("b", "r2", INFERENCE, M, tuple(deps), n_seqs=8, prompt_len=8)]


def test_overlap_rules():
    prof = simple_profile()
    calls = _two_calls()
    ev = PlanEvaluator(calls, prof, 4)
    one = ev.cost("a", Assignment(Mesh(0, 2), Layout(2, 1, 1))).seconds
    disjoint = {"a": Assignment(Mesh(0, 2), Layout(2, 1, 1)), "b": Assignment(Mesh(2, 2), Layout(2, 1, 1))}
    shared = {"a": Assignment(Mesh(0, 2), Layout(2, 1, 1)), "b": Assignment(Mesh(0, 2), Layout(2, 1, 1))}
    assert ev.seconds(disjoint) == pytest.approx(one)  # disjoint meshes overlap
    assert ev.seconds(shared) == pytest.approx(2 * one)  # shared devices serialize
    dep = PlanEvaluator(_two_calls(deps=("a",)), prof, 4)
    assert dep.seconds(disjoint) == pytest.approx(2 * one)  # a dependency serializes too
    tl = dep.evaluate(disjoint).timeline
    assert tl["b"][0] == pytest.approx(tl["a"][1])


def test_same_role_keeps_graph_order_and_realloc_occupies_both_meshes():
    prof = simple_profile()
    calls = [CallSpec("gen", "actor", INFERENCE, M, (), n_seqs=8, prompt_len=8, trained_role=True),
             CallSpec("train", "actor", TRAIN, M, (), n_seqs=8, prompt_len=8, trained_role=True)]
    ev = PlanEvaluator(calls, prof, 4)
    plan = {"gen": Assignment(Mesh(0, 2), Layout(2, 1, 1)), "train": Assignment(Mesh(2, 2), Layout(2, 1, 1))}
    res = ev.evaluate(plan)
    r = realloc_time(M, plan["train"], plan["gen"], prof)
    assert res.realloc["gen"] == pytest.approx(r) and r > 0
    assert res.timeline["train"][0] == pytest.approx(res.timeline["gen"][1])  # same role: graph order
    calls_s = ev.cost("gen", plan["gen"]).seconds + ev.cost("train", plan["train"]).seconds
    assert res.seconds == pytest.approx(r + calls_s)


def test_plan_memory_sums_resident_train_states():
    prof = simple_profile(memory_bytes=1.0)  # nothing fits
    calls = _two_calls()
    ev = PlanEvaluator(calls, prof, 4)
    plan = {"a": Assignment(Mesh(0, 2), Layout(2, 1, 1)), "b": Assignment(Mesh(2, 2), Layout(2, 1, 1))}
    res = ev.evaluate(plan)
    assert res.oom and math.isinf(res.seconds) and res.score > res.raw_seconds
