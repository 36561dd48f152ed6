"""Reallocation between layouts that disagree on whether K/V heads are replicated.

With fewer KV heads than tensor-parallel ranks every rank holds all of them;
reallocating to or from such a layout must take the K/V sub-blocks from a
rank that holds them (replicated source) or gather all shards (replicated
destination).
"""

from __future__ import annotations

import pytest
import torch

from realhf.base.testing import run_distributed
from realhf.impl.model.comm import global_comm
from realhf.impl.model.comm import param_realloc as pr
from realhf.impl.model.parallelism.tensor_parallel.layers import kv_heads_partition
from tests.comm.test_param_realloc import _config, _full_state, _layout, _model, _sd, _stage_buffer

pytestmark = pytest.mark.distributed

# (n_kv_heads, source mesh, destination mesh); meshes are (pp, dp, tp, ranks). Llama: 4 query heads.
CASES = [
    (1, (1, 1, 2, [0, 1]), (1, 1, 1, [0])),  # replicated -> partitioned (one head, tp1)
    (1, (1, 2, 1, [2, 3]), (1, 1, 2, [0, 1])),  # partitioned -> replicated
    (2, (1, 1, 4, range(4)), (1, 2, 2, range(4))),  # tp4 replicates 2 heads, tp2 splits them
    (2, (1, 2, 2, range(4)), (1, 1, 4, range(4))),
    (2, (2, 1, 2, range(4)), (1, 1, 4, [3, 2, 1, 0])),  # with a pipeline change and reordered ranks
    (1, (1, 1, 4, range(4)), (2, 1, 1, [1, 2])),
]
IDS = [f"kv{c[0]}-tp{c[1][2]}to{c[2][2]}-{i}" for i, c in enumerate(CASES)]


def test_cases_change_replication():
    for n_kv, src, dst in CASES:
        assert kv_heads_partition(n_kv, src[2])[1] != kv_heads_partition(n_kv, dst[2])[1]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_plan_fills_every_destination_buffer(case):
    n_kv, src_mesh, dst_mesh = case
    config = _config("llama", n_kv_heads=n_kv)
    for a, b in ((src_mesh, dst_mesh), (dst_mesh, src_mesh)):
        src, dst = _layout(a), _layout(b)
        plan = pr.make_realloc_plan(config, src, dst)
        full = _full_state(config, seed=5)
        bufs = {r: _stage_buffer(config, full, src, r) for r in src.global_ranks}
        for r in dst.global_ranks:
            out = torch.full((plan.dst_flat_size[r],), float("nan"))
            count = torch.zeros(plan.dst_flat_size[r], dtype=torch.int64)
            for t in plan.to_rank(r):
                for seg in t.segments:
                    for s, e in seg.dst_intervals.tolist():
                        count[s:e] += 1
                pr._scatter(pr._gather(bufs[t.sender], t), out, t, 1.0)
            assert bool((count == 1).all()), f"rank {r}: covered {count.unique().tolist()} times"
            assert torch.equal(out, _stage_buffer(config, full, dst, r)), f"rank {r}"


def _worker(rank, world, cases):
    global_comm.clear_group_cache()
    for _, src_mesh, dst_mesh in cases:
        for mesh in (src_mesh, dst_mesh):
            for g in _layout(mesh).tp_groups():
                if len(g) > 1:
                    global_comm.new_or_get_group(g)
    out = []
    for i, (n_kv, src_mesh, dst_mesh) in enumerate(cases):
        config = _config("llama", n_kv_heads=n_kv)
        full = _full_state(config, seed=20 + i)
        res = {}
        for name, a_mesh, b_mesh in (("fwd", src_mesh, dst_mesh), ("bwd", dst_mesh, src_mesh)):
            src, dst = _layout(a_mesh), _layout(b_mesh)
            a = _model(config, src, rank, full)
            b = _model(config, dst, rank)
            pr.reallocate(config, src, dst, a, b)
            # Every parameter equals the one of a model built directly in the target layout.
            ref = _sd(_model(config, dst, rank, full))
            got = _sd(b)
            res[name] = None if ref is None else (sorted(got) == sorted(ref)
                                                  and all(torch.equal(got[k], ref[k]) for k in ref))
        out.append(res)
    return out


def test_reallocate_changes_kv_replication():
    results = run_distributed(_worker, 4, timeout=120, args=(CASES,))
    for i, (n_kv, src_mesh, dst_mesh) in enumerate(CASES):
        for name, target in (("fwd", dst_mesh), ("bwd", src_mesh)):
            for r in _layout(target).global_ranks:
                assert results[r][i][name] is True, f"{IDS[i]} {name}: rank {r} differs"
