"""Process groups of several models on overlapping meshes of one world."""

import torch
import torch.distributed as dist

from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.comm import global_comm


def _layouts():
    # actor: tp=2 x dp=2 on all four ranks; critic: pp=2 on ranks 2,3 only;
    # ref: tp=2 on ranks 1,2 (overlaps both).
    return {
        "actor": ModelParallelLayout(PipeDataModelParallelTopology(1, 2, 2), [0, 1, 2, 3]),
        "critic": ModelParallelLayout(PipeDataModelParallelTopology(2, 1, 1), [2, 3]),
        "ref": ModelParallelLayout(PipeDataModelParallelTopology(1, 1, 2), [1, 2]),
    }


def _allreduce_members(group, rank):
    x = torch.tensor([float(1 << rank)])
    dist.all_reduce(x, group=group)
    return int(x.item())


def _worker(rank, world_size):
    constants.reset()
    global_comm.clear_group_cache()
    layouts = _layouts()
    grids = global_comm.setup_global_comm(layouts)
    # A second call must hit the cache and create nothing new.
    n_groups = len(global_comm._group_cache)
    global_comm.setup_global_comm(layouts)
    assert len(global_comm._group_cache) == n_groups
    out = {"hosted": sorted(grids)}
    for name, layout in layouts.items():
        if rank not in layout:
            continue
        coord = layout.coord(rank)
        with constants.model_scope(name):
            res = {
                "tp": (constants.tensor_parallel_rank(), constants.tensor_parallel_world_size()),
                "dp": (constants.data_parallel_rank(), constants.data_parallel_world_size()),
                "pp": (constants.pipe_parallel_rank(), constants.pipe_parallel_world_size()),
                "coord": (coord.model, coord.data, coord.pipe),
                "tp_sum": _allreduce_members(constants.tensor_parallel_group(), rank),
                "dp_sum": _allreduce_members(constants.data_parallel_group(), rank),
                "pp_sum": _allreduce_members(constants.pipe_parallel_group(), rank),
                "mesh_sum": _allreduce_members(constants.parallelism_group(), rank),
                "torch_tp_rank": dist.get_rank(constants.tensor_parallel_group()),
            }
        out[name] = res
    return out


def _mask(ranks):
    return sum(1 << r for r in ranks)


def test_groups_match_topology():
    results = run_distributed(_worker, 4, timeout=60)
    layouts = _layouts()
    for rank, out in enumerate(results):
        assert out["hosted"] == sorted(n for n, l in layouts.items() if rank in l)
        for name, layout in layouts.items():
            if rank not in layout:
                assert name not in out
                continue
            res = out[name]
            topo = layout.topology
            coord = layout.coord(rank)
            assert res["tp"] == (coord.model, topo.get_dim("model"))
            assert res["dp"] == (coord.data, topo.get_dim("data"))
            assert res["pp"] == (coord.pipe, topo.get_dim("pipe"))
            assert res["torch_tp_rank"] == coord.model
            assert res["tp_sum"] == _mask(layout.tp_group_of(rank))
            assert res["dp_sum"] == _mask(layout.dp_group_of(rank))
            assert res["pp_sum"] == _mask(layout.group_of("pipe", rank))
            assert res["mesh_sum"] == _mask(layout.global_ranks)


def test_required_groups_order_independent():
    layouts = _layouts()
    reordered = dict(reversed(list(layouts.items())))
    assert global_comm.required_groups(layouts) == global_comm.required_groups(reordered)


def test_descending_tp_mesh_rejected():
    def worker(rank, world_size):
        global_comm.clear_group_cache()
        bad = {"m": ModelParallelLayout(PipeDataModelParallelTopology(1, 1, 2), [1, 0])}
        try:
            global_comm.setup_global_comm(bad)
        except ValueError as e:
            return "ascending" in str(e)
        return False

    assert run_distributed(worker, 2, timeout=30) == [True, True]
