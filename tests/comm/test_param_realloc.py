"""Parameter reallocation between 3D-parallel layouts (plan and gloo execution)."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.model_api import ReaLModelConfig, get_hf_family
from realhf.base.testing import run_distributed
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.comm import global_comm
from realhf.impl.model.comm import param_realloc as pr
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.tp_partition import merge_state_dicts, partition_tensor

pytestmark = pytest.mark.distributed

LENGTHS = [5, 3, 7]

# (pp, dp, tp, ranks)
Mesh = Tuple[int, int, int, Sequence[int]]


def _config(family: str, critic: bool = False, **kw) -> ReaLModelConfig:
    c = get_hf_family(family).real_config_maker()
    if critic:
        kw.update(is_critic=True, tied_embedding=False)
    return dataclasses.replace(c, **kw)


def _layout(mesh: Mesh) -> ModelParallelLayout:
    pp, dp, tp, ranks = mesh
    return ModelParallelLayout(PipeDataModelParallelTopology(pp, dp, tp), list(ranks))


def _full_state(config: ReaLModelConfig, seed: int) -> Dict[str, torch.Tensor]:
    m = ReaLModel(config).instantiate(init=False)
    m.init_weights(std=0.2, seed=seed)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _stage_buffer(config, full, layout: ModelParallelLayout, rank: int) -> torch.Tensor:
    pp, _, tp = pr.layout_dims(layout)
    c = layout.coord(rank)
    spec, size = pr.stage_layout(config, pp, c.pipe, tp)
    buf = torch.full((size,), float("nan"))
    for k, slot in spec.items():
        buf[slot.start:slot.end] = partition_tensor(k, full[k], config, tp, c.model).reshape(-1)
    return buf


# ----------------------------------------------------------------------------
# Plan (no processes)
# ----------------------------------------------------------------------------

PLAN_CASES = [
    ("llama", {}, (4, 1, 1, range(4)), (1, 2, 2, range(4))),
    ("llama", {}, (2, 2, 2, range(8)), (1, 8, 1, range(8))),
    ("qwen2", {}, (1, 1, 2, [0, 1]), (2, 1, 1, [2, 3])),
    ("qwen2", {}, (1, 1, 1, [0]), (1, 4, 1, range(4))),
    ("qwen2", {}, (2, 1, 2, range(4)), (1, 4, 1, range(4))),
    ("qwen2", {"critic": True}, (2, 2, 1, range(4)), (1, 2, 2, range(4))),
    ("llama", {"critic": True}, (1, 1, 2, [0, 1]), (1, 1, 1, [0])),
    ("qwen2", {}, (3, 1, 1, range(3)), (2, 1, 2, range(4))),
    ("qwen2", {}, (1, 1, 1, [5]), (3, 1, 2, range(6))),
    ("llama", {"n_kv_heads": 1}, (1, 2, 2, range(4)), (2, 1, 4, range(8))),
    ("llama", {"n_kv_heads": 1}, (2, 1, 4, range(8)), (1, 1, 2, [3, 6])),
    ("llama", {"critic": True}, (1, 1, 2, range(2)), (2, 2, 1, range(4, 8))),
]


def _family_config(family, kw):
    kw = dict(kw)
    return _config(family, critic=kw.pop("critic", False), **kw)


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: f"{c[0]}-{c[2][:3]}-{c[3][:3]}")
def test_plan_covers_destination_exactly(case):
    family, kw, src_mesh, dst_mesh = case
    config = _family_config(family, kw)
    src, dst = _layout(src_mesh), _layout(dst_mesh)
    plan = pr.make_realloc_plan(config, src, dst)
    assert pr.make_realloc_plan(config, src, dst) is plan  # cached
    full = _full_state(config, seed=3)
    src_bufs = {r: _stage_buffer(config, full, src, r) for r in src.global_ranks}
    for r in dst.global_ranks:
        size = plan.dst_flat_size[r]
        count = torch.zeros(size, dtype=torch.int64)
        out = torch.full((size,), float("nan"))
        for t in plan.to_rank(r):
            assert t.sender in src and (src.coord(t.sender).pipe, src.coord(t.sender).model) == t.src_stage
            for seg in t.segments:
                assert int((seg.src_intervals[:, 1] - seg.src_intervals[:, 0]).sum()) == seg.numel
                assert int((seg.dst_intervals[:, 1] - seg.dst_intervals[:, 0]).sum()) == seg.numel
                for s, e in seg.dst_intervals.tolist():
                    count[s:e] += 1
            pr._scatter(pr._gather(src_bufs[t.sender], t), out, t, 1.0)
        assert bool((count == 1).all()), f"rank {r}: elements covered {count.unique().tolist()} times"
        assert sum(t.numel for t in plan.to_rank(r)) == size
        # One message per (sender, receiver).
        assert len({t.sender for t in plan.to_rank(r)}) == len(plan.to_rank(r))
        assert torch.equal(out, _stage_buffer(config, full, dst, r))
    assert plan.total_numel() == sum(plan.dst_flat_size.values())


def test_plan_prefers_local_and_spreads_load():
    config = _config("llama")
    # Every dst rank holds one of the shards it needs: that piece is local.
    plan = pr.make_realloc_plan(config, _layout((2, 2, 2, range(8))), _layout((1, 8, 1, range(8))))
    for r in range(8):
        assert len(plan.locals_of(r)) == 1
    loads = [plan.sender_load[r] for r in range(8)]
    assert max(loads) <= 1.5 * min(loads), loads
    # Four replicas, four disjoint receivers: each replica serves exactly one.
    plan = pr.make_realloc_plan(config, _layout((1, 4, 1, range(4))), _layout((1, 4, 1, range(4, 8))))
    assert sorted(t.sender for t in plan.transfers) == [0, 1, 2, 3]
    assert len(set(plan.sender_load.values())) == 1
    # Overlapping single replica: rank 0 copies locally, others receive from it.
    plan = pr.make_realloc_plan(config, _layout((1, 1, 1, [0])), _layout((1, 4, 1, range(4))))
    assert plan.locals_of(0) and not plan.recvs_of(0)
    assert all(t.sender == 0 for t in plan.transfers)
    assert plan.sender_load[0] == 3 * plan.dst_flat_size[1]


def test_plan_errors():
    llama = _config("llama")  # 4 q heads, 2 kv heads
    with pytest.raises(pr.ReallocError, match="divide each other.*tp=2.*tp=3"):
        pr.make_realloc_plan(llama, _layout((1, 1, 2, range(2))), _layout((1, 1, 3, range(3))))
    with pytest.raises(pr.ReallocError, match="is_critic: False != True"):
        pr.make_realloc_plan(llama, _layout((1, 1, 1, [0])), _layout((1, 1, 1, [1])),
                             dst_config=_config("llama", critic=True))
    with pytest.raises(pr.ReallocError, match=r"ranks \[4\].*world of size 4"):
        pr.make_realloc_plan(llama, _layout((1, 1, 1, [0])), _layout((1, 1, 1, [4])), world_size=4)


def test_plan_ignores_where_weights_were_loaded_from():
    # A training replica loaded from a checkpoint records its path; the empty
    # generation replica of the same model does not. They are still the same model.
    llama = _config("llama")
    loaded = dataclasses.replace(llama, base_model_path="/ckpt/sft")
    plan = pr.make_realloc_plan(loaded, _layout((1, 1, 2, range(2))), _layout((2, 1, 1, range(2))), dst_config=llama)
    assert plan.dst_flat_size


# ----------------------------------------------------------------------------
# Execution on gloo
# ----------------------------------------------------------------------------

# (family, critic, source mesh, destination mesh)
CASES_4 = [
    ("llama", False, (4, 1, 1, range(4)), (1, 2, 2, range(4))),
    ("qwen2", False, (1, 1, 2, [0, 1]), (2, 1, 1, [2, 3])),
    ("llama", True, (1, 1, 1, [0]), (1, 4, 1, range(4))),
    ("qwen2", False, (2, 1, 2, range(4)), (1, 4, 1, range(4))),
    ("qwen2", True, (2, 2, 1, range(4)), (1, 2, 2, range(4))),
    ("llama", False, (1, 1, 2, [0, 1]), (1, 1, 1, [0])),
]
CASES_8 = [
    ("llama", False, (2, 2, 2, range(8)), (1, 8, 1, range(8))),
    ("qwen2", False, (2, 2, 2, range(8)), (1, 8, 1, range(8))),
]


def _model(config, layout, rank, full=None) -> Optional[ReaLModel]:
    if rank not in layout:
        return None
    pp, _, tp = pr.layout_dims(layout)
    c = layout.coord(rank)
    group = global_comm.new_or_get_group(layout.tp_group_of(rank)) if tp > 1 else None
    m = ReaLModel(config, pp_size=pp, pp_rank=c.pipe, tp_size=tp, tp_rank=c.model, tp_group=group)
    if full is not None:
        m.instantiate(init=False)
        m.load_state_dict({k: v for k, v in full.items() if k in m.param_spec})
    return m


def _sd(model: Optional[ReaLModel]):
    return None if model is None else {k: v.clone() for k, v in model.state_dict().items()}


def _forward(model: ReaLModel, config) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    total = sum(LENGTHS)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    if model.has_embedding:
        return model(input_ids=torch.randint(0, config.vocab_size, (total,), generator=g), cu_seqlens=cu)
    return model(hidden_states=torch.randn(total, config.hidden_dim, generator=g), cu_seqlens=cu)


def _worker(rank, world, cases):
    global_comm.clear_group_cache()
    # Groups are created collectively: every rank creates every tp group in the same order.
    for _, _, src_mesh, dst_mesh in cases:
        for mesh in (src_mesh, dst_mesh):
            for g in _layout(mesh).tp_groups():
                if len(g) > 1:
                    global_comm.new_or_get_group(g)
    out = []
    for i, (family, critic, src_mesh, dst_mesh) in enumerate(cases):
        config = _config(family, critic)
        src, dst = _layout(src_mesh), _layout(dst_mesh)
        fulls = [_full_state(config, seed=10 * i + j) for j in range(3)]
        res = {}
        a = _model(config, src, rank, fulls[0])
        b = _model(config, dst, rank)
        st = pr.reallocate(config, src, dst, a, b)
        res["stats"] = st
        res["b1"], res["a_kept"] = _sd(b), None if a is None else a.instantiated
        if b is not None:
            ref = _model(config, dst, rank, fulls[0])
            res["fwd_equal"] = torch.equal(_forward(b, config), _forward(ref, config))
        # A -> B -> A into fresh, empty models of layout A.
        back = _model(config, src, rank)
        pr.reallocate(config, dst, src, b, back)
        res["back"] = _sd(back)
        # New source weights travel on the next reallocation into the same target.
        if a is not None:
            a.load_state_dict({k: v for k, v in fulls[1].items() if k in a.param_spec})
        pr.reallocate(config, src, dst, a, b)
        res["b2"] = _sd(b)
        # EMA into the target that holds fulls[1].
        if a is not None:
            a.load_state_dict({k: v for k, v in fulls[2].items() if k in a.param_spec})
        pr.reallocate(config, src, dst, a, b, eta=0.25)
        res["b3"] = _sd(b)
        # Frozen source: released afterwards.
        c = _model(config, dst, rank)
        pr.reallocate(config, src, dst, a, c, free_source=True)
        res["c"] = _sd(c)
        if a is not None:
            res["a_freed"] = (a.flat_param is None and not a.instantiated
                              and all(p.numel() == 0 for p in a.parameters()))
        out.append(res)
    return out


def _merged(results, case_idx, key, layout: ModelParallelLayout, config, dp_rank):
    by_stage: Dict[int, Dict[int, Dict[str, torch.Tensor]]] = {}
    for r in layout.global_ranks:
        c = layout.coord(r)
        if c.data == dp_rank:
            by_stage.setdefault(c.pipe, {})[c.model] = results[r][case_idx][key]
    merged = {}
    for pp in sorted(by_stage):
        merged.update(merge_state_dicts([by_stage[pp][t] for t in sorted(by_stage[pp])], config))
    return merged


def _assert_equal_sd(got, want, what):
    assert sorted(got) == sorted(want), what
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs"


def _check(results, cases):
    for i, (family, critic, src_mesh, dst_mesh) in enumerate(cases):
        config = _config(family, critic)
        src, dst = _layout(src_mesh), _layout(dst_mesh)
        fulls = [_full_state(config, seed=10 * i + j) for j in range(3)]
        name = f"case {i} {family} critic={critic} {src_mesh[:3]}->{dst_mesh[:3]}"
        ema = {k: fulls[2][k] * 0.25 + fulls[1][k] * 0.75 for k in fulls[0]}
        for dp in range(pr.layout_dims(dst)[1]):
            _assert_equal_sd(_merged(results, i, "b1", dst, config, dp), fulls[0], f"{name} dp{dp} A->B")
            _assert_equal_sd(_merged(results, i, "b2", dst, config, dp), fulls[1], f"{name} dp{dp} update")
            _assert_equal_sd(_merged(results, i, "c", dst, config, dp), fulls[2], f"{name} dp{dp} free")
            got = _merged(results, i, "b3", dst, config, dp)
            for k in ema:
                torch.testing.assert_close(got[k], ema[k], atol=1e-7, rtol=0, msg=f"{name} EMA {k}")
        for dp in range(pr.layout_dims(src)[1]):
            _assert_equal_sd(_merged(results, i, "back", src, config, dp), fulls[0], f"{name} dp{dp} A->B->A")
        for r in dst.global_ranks:
            assert results[r][i]["fwd_equal"], f"{name}: rank {r} forward differs"
        for r in src.global_ranks:
            assert results[r][i]["a_kept"] is True, f"{name}: trainable source lost its buffer"
            assert results[r][i]["a_freed"], f"{name}: free_source did not free rank {r}"
        sent = sum(results[r][i]["stats"]["bytes_sent"] for r in range(len(results)))
        recv = sum(results[r][i]["stats"]["bytes_received"] for r in range(len(results)))
        local = sum(results[r][i]["stats"]["bytes_local"] for r in range(len(results)))
        plan = pr.make_realloc_plan(config, src, dst)
        assert sent == recv == 4 * plan.total_numel(local=False), name
        assert sent + local == 4 * sum(plan.dst_flat_size.values()), name


def test_reallocate_4_ranks():
    _check(run_distributed(_worker, 4, timeout=120, args=(CASES_4,)), CASES_4)


def test_reallocate_8_ranks():
    _check(run_distributed(_worker, 8, timeout=120, args=(CASES_8,)), CASES_8)


def test_reallocate_refuses_mismatched_models():
    def fn(rank, world):
        config = _config("llama")
        src, dst = _layout((1, 1, 1, [0])), _layout((1, 1, 2, [0, 1]))
        a = ReaLModel(config).instantiate() if rank == 0 else None
        wrong = ReaLModel(_config("llama", critic=True), tp_size=2, tp_rank=rank)
        try:
            pr.reallocate(config, src, dst, a, wrong)
        except pr.ReallocError as e:
            return str(e)
        return None

    msgs = run_distributed(fn, 2, timeout=60)
    assert all(m is not None and "is_critic" in m for m in msgs), msgs
