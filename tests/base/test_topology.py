import itertools
import random

import pytest

from realhf.base.topology import (
    ModelParallelLayout,
    PipeDataModelParallelTopology,
    ProcessTopology,
)

# (pp, dp, tp) -> groups written out by hand for the pipe-major mesh
# rank = pp_idx * (dp * tp) + dp_idx * tp + tp_idx.
GROUP_TABLES = {
    (1, 1, 1): {
        "pipe": [[0]],
        "data": [[0]],
        "model": [[0]],
    },
    (2, 2, 2): {
        "pipe": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "data": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "model": [[0, 1], [2, 3], [4, 5], [6, 7]],
    },
    (4, 1, 2): {
        "pipe": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "data": [[0], [1], [2], [3], [4], [5], [6], [7]],
        "model": [[0, 1], [2, 3], [4, 5], [6, 7]],
    },
    (1, 8, 1): {
        "pipe": [[0], [1], [2], [3], [4], [5], [6], [7]],
        "data": [[0, 1, 2, 3, 4, 5, 6, 7]],
        "model": [[0], [1], [2], [3], [4], [5], [6], [7]],
    },
}

# rank -> (pipe, data, model) for (pp, dp, tp) = (2, 2, 2).
COORDS_222 = {
    0: (0, 0, 0),
    1: (0, 0, 1),
    2: (0, 1, 0),
    3: (0, 1, 1),
    4: (1, 0, 0),
    5: (1, 0, 1),
    6: (1, 1, 0),
    7: (1, 1, 1),
}


@pytest.mark.parametrize("shape", sorted(GROUP_TABLES))
def test_group_tables(shape):
    pp, dp, tp = shape
    topo = PipeDataModelParallelTopology(num_pp=pp, num_dp=dp, num_mp=tp)
    assert topo.world_size() == pp * dp * tp
    for axis, expected in GROUP_TABLES[shape].items():
        assert topo.get_axis_comm_lists(axis) == expected, axis
    layout = ModelParallelLayout.contiguous(topo)
    assert layout.pp_groups() == GROUP_TABLES[shape]["pipe"]
    assert layout.dp_groups() == GROUP_TABLES[shape]["data"]
    assert layout.tp_groups() == GROUP_TABLES[shape]["model"]


def test_coordinates_222():
    topo = PipeDataModelParallelTopology(2, 2, 2)
    assert topo.get_axis_names() == ["pipe", "data", "model"]
    for rank, (p, d, m) in COORDS_222.items():
        coord = topo.get_coord(rank)
        assert tuple(coord) == (p, d, m)
        assert (coord.pipe, coord.data, coord.model) == (p, d, m)
        assert topo.get_rank(pipe=p, data=d, model=m) == rank


def test_mesh_offset_example():
    # A model on g8..g15 with dp=2, tp=2, pp=2.
    topo = PipeDataModelParallelTopology(num_pp=2, num_dp=2, num_tp=2)
    layout = ModelParallelLayout(topo, list(range(8, 16)))
    assert layout.pp_groups() == [[8, 12], [9, 13], [10, 14], [11, 15]]
    assert layout.tp_groups() == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert layout.dp_groups() == [[8, 10], [9, 11], [12, 14], [13, 15]]
    assert tuple(layout.coord(13)) == (1, 0, 1)
    assert layout.pp_group_of(13) == [9, 13]
    assert layout.tp_group_of(13) == [12, 13]
    assert layout.dp_group_of(13) == [13, 15]
    assert layout.to_local(13) == 5 and layout.to_global(5) == 13
    assert layout.global_rank_of(pipe=1, data=1, model=0) == 14
    assert 8 in layout and 7 not in layout
    with pytest.raises(ValueError, match="hosts no shard"):
        layout.coord(3)


def test_layout_with_permuted_ranks():
    topo = PipeDataModelParallelTopology(1, 2, 2)
    layout = ModelParallelLayout(topo, [6, 5, 4, 7])
    assert layout.tp_groups() == [[6, 5], [4, 7]]
    assert layout.dp_groups() == [[6, 4], [5, 7]]
    assert layout.pp_groups() == [[6], [5], [4], [7]]
    assert tuple(layout.coord(5)) == (0, 0, 1)


def test_layout_validation():
    topo = PipeDataModelParallelTopology(1, 2, 1)
    with pytest.raises(ValueError, match="needs 2 ranks"):
        ModelParallelLayout(topo, [0, 1, 2])
    with pytest.raises(ValueError, match="distinct"):
        ModelParallelLayout(topo, [3, 3])


def _random_topologies(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        naxes = rng.randint(1, 4)
        axes = [f"ax{i}" for i in range(naxes)]
        rng.shuffle(axes)
        dims = [rng.randint(1, 4) for _ in axes]
        yield ProcessTopology(axes, dims)


def test_row_major_against_brute_force():
    for topo in _random_topologies(40):
        coords = list(itertools.product(*(range(d) for d in topo.dims)))
        assert topo.world_size() == len(coords)
        for rank, coord in enumerate(coords):
            assert tuple(topo.get_coord(rank)) == coord
            assert topo.get_rank(**dict(zip(topo.axes, coord))) == rank


def test_axis_comm_lists_against_brute_force():
    for topo in _random_topologies(40, seed=1):
        for a, axis in enumerate(topo.axes):
            # Group ranks by their coordinates on the other axes.
            buckets = {}
            for r in range(topo.world_size()):
                c = tuple(topo.get_coord(r))
                buckets.setdefault(c[:a] + c[a + 1 :], []).append(r)
            expected = [buckets[k] for k in sorted(buckets)]
            assert topo.get_axis_comm_lists(axis) == expected


def test_filter_match_and_axis_list():
    topo = PipeDataModelParallelTopology(2, 2, 2)
    assert topo.filter_match(pipe=1) == [4, 5, 6, 7]
    assert topo.filter_match(data=1, model=0) == [2, 6]
    assert topo.filter_match(pipe=0, data=1, model=1) == [3]
    assert topo.filter_match() == list(range(8))
    assert topo.get_axis_list("model", 1) == [1, 3, 5, 7]
    assert topo.get_axis_list("data", 0) == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="Unknown axis"):
        topo.filter_match(tensor=0)


def test_rank_repr():
    topo = PipeDataModelParallelTopology(2, 2, 2)
    assert topo.get_rank_repr(5) == "model_01"
    assert topo.get_rank_repr(5, omit_axes=()) == "pipe_01-data_00-model_01"
    assert topo.get_rank_repr(6, omit_axes=("model",), inner_sep="=", outer_sep="|") == (
        "pipe=01|data=01"
    )


def test_equality_and_hash():
    a = ProcessTopology(["x", "y"], [2, 3])
    assert a == ProcessTopology(["x", "y"], [2, 3])
    assert a != ProcessTopology(["x", "y"], [3, 2])
    assert a != ProcessTopology(["y", "x"], [2, 3])
    assert hash(a) == hash(ProcessTopology(["x", "y"], [2, 3]))
    p = PipeDataModelParallelTopology(2, 1, 4)
    assert p == ProcessTopology(["pipe", "data", "model"], [2, 1, 4])
    assert len({p, PipeDataModelParallelTopology(2, 1, 4), a}) == 2


def test_pipe_data_model_properties():
    t = PipeDataModelParallelTopology(
        4, 2, 1, sequence_parallel=True, gradient_checkpointing=True, max_prompt_len=128
    )
    assert (t.num_pp, t.num_dp, t.num_mp, t.num_tp) == (4, 2, 1, 1)
    assert t.get_dim("pipe") == 4 and t.get_dim_dict() == {"pipe": 4, "data": 2, "model": 1}
    assert t.sequence_parallel and t.gradient_checkpointing and t.max_prompt_len == 128
    assert not t.gradient_accumulation_fusion
    assert PipeDataModelParallelTopology(1, 1, num_tp=3).num_mp == 3
    with pytest.raises(TypeError):
        PipeDataModelParallelTopology(1, 1)
    with pytest.raises(ValueError, match="disagree"):
        PipeDataModelParallelTopology(1, 1, 2, num_tp=3)


def test_invalid_inputs():
    with pytest.raises(ValueError):
        ProcessTopology(["a", "a"], [1, 2])
    with pytest.raises(ValueError):
        ProcessTopology(["a"], [1, 2])
    with pytest.raises(ValueError):
        ProcessTopology(["a"], [0])
    topo = PipeDataModelParallelTopology(2, 2, 2)
    with pytest.raises(ValueError, match="exactly the axes"):
        topo.get_rank(pipe=0, data=0)
    with pytest.raises(ValueError, match="outside"):
        topo.get_rank(pipe=2, data=0, model=0)
    with pytest.raises(ValueError, match="outside"):
        topo.get_coord(8)
    with pytest.raises(ValueError, match="Unknown axis"):
        topo.get_dim("tensor")


def test_topology_pickles_across_processes():
    import pickle

    from realhf.base.topology import PipeDataModelParallelTopology

    t = PipeDataModelParallelTopology(2, 2, 2, sequence_parallel=True)
    u = pickle.loads(pickle.dumps(t))
    assert u.get_coord(5) == t.get_coord(5) and u.sequence_parallel and u.get_dim_dict() == t.get_dim_dict()
