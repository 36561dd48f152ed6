"""Sockets between the workers of one host: every pairing of sends and receives
arrives intact (both directions at once, large and empty messages, into given
buffers), and a broken or mismatched link raises instead of hanging."""

import pytest
import torch
import torch.distributed as dist

from realhf.base.testing import run_distributed
from realhf.impl.model.comm.local_links import LocalLinks

pytestmark = pytest.mark.distributed


def _payload(src: int, dst: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * src + dst)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _exchange_worker(rank, world):
    links = LocalLinks.connect()
    out = {"peers": links.peers}
    # Everyone sends everyone a message of a different size, all at once; 6 MB ones
    # exceed the socket buffers in both directions.
    sizes = {(s, d): (6 << 20) if (s + d) % 2 else 1000 + 10 * s + d for s in range(world) for d in range(world)}
    sends = [(_payload(rank, d, sizes[rank, d]), d) for d in range(world) if d != rank]
    got = links.exchange(sends, [(s, None) for s in range(world) if s != rank])
    out["all_to_all"] = all(torch.equal(t, _payload(s, rank, sizes[s, rank]))
                            for t, s in zip(got, [s for s in range(world) if s != rank]))
    # Typed tensors into given buffers, an empty message, and a one-way transfer.
    if rank == 0:
        floats = torch.linspace(0, 1, 3000)
        links.exchange([(floats, 1), (torch.empty(0), 2)], [])
    elif rank == 1:
        buf = torch.empty(3000)
        (filled,) = links.exchange([], [(0, buf)])
        out["into_buffer"] = filled is buf and torch.equal(buf, torch.linspace(0, 1, 3000))
    else:
        (empty,) = links.exchange([], [(0, None)])
        out["empty"] = empty.numel() == 0
    # A buffer of the wrong size is refused with both sizes named.
    if rank == 0:
        links.exchange([(torch.zeros(8, dtype=torch.uint8), 1)], [])
    elif rank == 1:
        try:
            links.exchange([], [(0, torch.empty(4, dtype=torch.uint8))])
        except ValueError as e:
            out["size_error"] = str(e)
    dist.barrier()
    links.close()
    return out


def test_exchange_between_three_ranks():
    res = run_distributed(_exchange_worker, 3, timeout=120)
    assert [r["peers"] for r in res] == [[1, 2], [0, 2], [0, 1]]
    assert all(r["all_to_all"] for r in res)
    assert res[1]["into_buffer"] and res[2]["empty"]
    assert "sent 8 bytes into a buffer of 4" in res[1]["size_error"]


def _broken_worker(rank, world):
    links = LocalLinks.connect(timeout=60)
    if rank == 1:
        links.close()  # as if the process had died
        dist.barrier()
        return None
    dist.barrier()
    try:
        links.exchange([], [(1, None)])
    except ConnectionError as e:
        return str(e)
    return "no error"


def test_a_closed_link_raises_instead_of_hanging():
    res = run_distributed(_broken_worker, 2, timeout=120)
    assert "rank 1 closed its link" in res[0]


def _single_worker(rank, world):
    return LocalLinks.connect()


def test_nothing_to_link_alone():
    assert run_distributed(_single_worker, 1, timeout=60) == [None]


def _all_reduce_worker(rank, world):
    links = LocalLinks.connect()
    out = {}
    for n in (1, 7, 1000, 3_000_001):
        g = torch.Generator().manual_seed(1000 * rank + n)
        x = torch.randn(n, generator=g, dtype=torch.float32)
        via_links = x.clone()
        links.all_reduce(via_links, list(range(world)))
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        out[n] = (via_links, parts)
    # A sub-group of two ranks, the others idle.
    if rank in (0, 2):
        y = torch.full((5,), float(rank + 1))
        links.all_reduce(y, [0, 2])
        out["pair"] = y
    dist.barrier()
    return out


def test_all_reduce_sum_equals_the_rank_ordered_sum_on_every_rank():
    res = run_distributed(_all_reduce_worker, 3, timeout=120)
    for n in (1, 7, 1000, 3_000_001):
        parts = res[0][n][1]
        expected = parts[0].clone()
        for p in parts[1:]:
            expected += p
        for r in res:
            assert torch.equal(r[n][0], expected), n
    assert torch.equal(res[0]["pair"], torch.full((5,), 4.0)) and torch.equal(res[2]["pair"], torch.full((5,), 4.0))


def _collective_worker(rank, world):
    """global_comm.all_reduce and all_gather over the links against gloo, for every op, dtype and group."""
    from realhf.impl.model.comm import global_comm

    links = LocalLinks.connect()
    out = {}
    pair = dist.new_group([0, 2])
    cases = [("sum", dist.ReduceOp.SUM, torch.float64, None), ("min", dist.ReduceOp.MIN, torch.int64, None),
             ("max", dist.ReduceOp.MAX, torch.float32, None), ("pair_sum", dist.ReduceOp.SUM, torch.float32, pair)]
    for name, op, dtype, group in cases:
        if group is pair and rank not in (0, 2):
            continue
        g = torch.Generator().manual_seed(7 * rank + len(name))
        x = (torch.randn(5, generator=g) * 100).to(dtype)
        want = x.clone()
        dist.all_reduce(want, op=op, group=group)
        global_comm.set_local_links(links)
        got = global_comm.all_reduce(x.clone(), group, op)
        global_comm.set_local_links(None)
        out[name] = torch.equal(got, want)
    # all_gather: large (through the shared region) and small, into views of one buffer.
    for name, n in (("gather_small", 3), ("gather_large", 1 << 19)):
        g = torch.Generator().manual_seed(11 * rank + n)
        x = torch.randn(n, generator=g)
        want = [torch.empty(n) for _ in range(world)]
        dist.all_gather(want, x)
        buf = torch.full((world * n,), float("nan"))
        global_comm.set_local_links(links)
        global_comm.all_gather(list(buf.chunk(world)), x)
        global_comm.set_local_links(None)
        out[name] = torch.equal(buf, torch.cat(want))
    # reduce_scatter with uneven chunks: each rank's own chunk is the sum, the others untouched.
    g = torch.Generator().manual_seed(5 * rank)
    x = torch.randint(-1000, 1000, (10,), generator=g).double()  # exact sums in any order
    want = x.clone()
    dist.all_reduce(want)
    bounds = [0, 1, 7, 10]
    got = x.clone()
    links.reduce_scatter(got, [0, 1, 2], bounds)
    mine = slice(bounds[rank], bounds[rank + 1])
    rest = torch.ones(10, dtype=torch.bool)
    rest[mine] = False
    out["reduce_scatter"] = torch.equal(got[mine], want[mine]) and torch.equal(got[rest], x[rest])
    try:
        links.all_reduce(torch.ones(2), [0, 1, 2], "prod")
    except ValueError as e:
        out["bad_op"] = str(e)
    dist.barrier()
    links.close()
    return out


def test_small_collectives_over_the_links_equal_gloo():
    res = run_distributed(_collective_worker, 3, timeout=120)
    for r, out in enumerate(res):
        for name in ("sum", "min", "max", "gather_small", "gather_large", "reduce_scatter") + (
                ("pair_sum",) if r in (0, 2) else ()):
            assert out[name] is True, (r, name)
        assert "op must be one of ['max', 'min', 'sum'], got 'prod'" in out["bad_op"]


def _region_worker(rank, world):
    links = LocalLinks.connect()
    peer = 1 - rank
    ok = []
    # Large messages go through a reused shared region: same size, larger (a new region), smaller,
    # in both directions at once, with a small socket message from the other rank in between.
    for step, mb in enumerate([2, 2, 5, 1.5, 5]):
        n = int(mb * (1 << 20))
        mine = _payload(rank + 10 * step, peer, n)
        (got,) = links.exchange([(mine, peer)], [(peer, None)])
        ok.append(torch.equal(got, _payload(peer + 10 * step, rank, n)))
        small = links.exchange([(torch.full((5,), step, dtype=torch.uint8), peer)], [(peer, None)])[0]
        ok.append(small.tolist() == [step] * 5)
    out = {"ok": ok, "regions": sorted(links._tx), "capacity": links._tx[peer].capacity}
    # Above the size cap a message takes the socket and leaves the region as it was.
    import realhf.impl.model.comm.local_links as ll

    ll.SHM_MAX_BYTES = 3 << 20
    n, posted = 4 << 20, links._tx[peer].counter(0)
    (got,) = links.exchange([(_payload(rank, peer, n), peer)], [(peer, None)])
    ok.append(torch.equal(got, _payload(peer, rank, n)) and links._tx[peer].counter(0) == posted)
    dist.barrier()
    links.close()
    return out


def test_large_messages_reuse_a_shared_region():
    res = run_distributed(_region_worker, 2, timeout=120)
    for r, peer in zip(res, (1, 0)):
        assert all(r["ok"]) and r["regions"] == [peer]
        assert r["capacity"] >= 5 << 20
