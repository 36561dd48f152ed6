import pytest
import torch
import torch.distributed as dist

from realhf.base.testing import run_distributed
from realhf.impl.model.parallelism.pipeline_parallel import p2p

pytestmark = pytest.mark.distributed


def _make(i: int, rank: int) -> torch.Tensor:
    """Deterministic tensor number i sent by ``rank`` (shape and dtype vary)."""
    g = torch.Generator().manual_seed(1000 * rank + i)
    kind = i % 6
    if kind == 0:
        return torch.randn(3 + i, 5, generator=g)
    if kind == 1:
        return torch.randint(-2**40, 2**40, (i + 1,), generator=g, dtype=torch.int64)
    if kind == 2:
        return torch.rand(2, i + 1, 3, generator=g) > 0.5
    if kind == 3:
        return torch.empty(0, 7)
    if kind == 4:
        return torch.randn(4, generator=g).to(torch.bfloat16)
    return torch.tensor(3.5, dtype=torch.float16)  # 0-dim


def _check(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b)


def _chain(rank, world):
    # Stage r sends to r + 1, like activations along a pipeline.
    group = dist.new_group(list(range(world)))
    n = 0
    for i in range(12):
        if rank > 0:
            _check(p2p.recv_tensor(rank - 1, group), _make(i, rank - 1))
            n += 1
        if rank < world - 1:
            p2p.send_tensor(_make(i, rank), rank + 1, group)
    return n


@pytest.mark.parametrize("world", [2, 3])
def test_send_recv_chain(world):
    out = run_distributed(_chain, world, timeout=60)
    assert out == [0] + [12] * (world - 1)


def _isend(rank, world):
    if rank == 0:
        works = []
        ts = [_make(i, 0) for i in range(6)]
        for t in ts:
            works += p2p.isend_tensor(t, 1)
        for w in works:
            w.wait()
        return 0
    for i in range(6):
        _check(p2p.recv_tensor(0), _make(i, 0))
    return 6


def test_isend_then_recv():
    assert run_distributed(_isend, 2, timeout=60) == [0, 6]


def _ring(rank, world):
    # Every rank sends to both neighbours and receives from both at once,
    # which would deadlock with blocking sends in the same order everywhere.
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for i in range(5):
        sends = [(_make(2 * i, rank), nxt), (_make(2 * i + 1, rank), prv)]
        got = p2p.batch_send_recv(sends, [prv, nxt])
        _check(got[0], _make(2 * i, prv))
        _check(got[1], _make(2 * i + 1, nxt))
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_batch_send_recv_ring(world):
    assert all(run_distributed(_ring, world, timeout=60))


def _subgroup(rank, world):
    # A pipeline group made of global ranks 1 and 2; rank 0 is not in it.
    group = dist.new_group([1, 2])
    if rank == 1:
        p2p.send_tensor(torch.arange(5), 2, group)
        return None
    if rank == 2:
        return p2p.recv_tensor(1, group).tolist()
    return None


def test_subgroup_global_ranks():
    assert run_distributed(_subgroup, 3, timeout=60)[2] == [0, 1, 2, 3, 4]


def test_header_round_trip_and_errors():
    for t in [torch.zeros(2, 3, dtype=torch.int32), torch.zeros(()), torch.zeros(0, dtype=torch.bool)]:
        assert p2p.decode_header(p2p.encode_header(t, torch.device("cpu"))) == (t.dtype, tuple(t.shape))
    with pytest.raises(TypeError):
        p2p.encode_header(torch.zeros(2, dtype=torch.complex64), torch.device("cpu"))
    with pytest.raises(ValueError):
        p2p.encode_header(torch.zeros([1] * 9), torch.device("cpu"))
