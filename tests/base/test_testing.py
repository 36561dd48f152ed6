import os
import time

import pytest
import torch
import torch.distributed as dist

from realhf.base.testing import DistributedRunError, run_distributed

pytestmark = pytest.mark.distributed


def _all_reduce(rank, world_size, scale):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": t.item() * scale,
            "threads": torch.get_num_threads()}


def test_success_returns_results_in_rank_order():
    out = run_distributed(_all_reduce, 3, timeout=60, args=(2.0,))
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["sum"] == 12.0 and o["threads"] == 1 for o in out)
    assert not dist.is_initialized()  # the parent never joins the group


def test_single_rank():
    assert run_distributed(lambda r, w: (r, w), 1, timeout=30) == [(0, 1)]


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError(f"boom from rank {rank}")
    dist.barrier()  # blocks: rank 1 never arrives
    return rank


def test_failing_rank_surfaces_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout=30)
    assert time.monotonic() - start < 15
    err = info.value
    assert err.rank == 1
    msg = str(err)
    assert "Rank 1 failed" in msg
    assert "Traceback (most recent call last)" in msg
    assert "_fail_on_rank_one" in msg and "ValueError: boom from rank 1" in msg


def _hang_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def test_hanging_rank_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run_distributed(_hang_on_rank_one, 2, timeout=2)
    assert time.monotonic() - start < 10
    assert "Ranks [1] did not finish within 2s" in str(info.value)


def _exit_silently(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_rank_dying_without_result():
    with pytest.raises(DistributedRunError, match="Rank 0 exited with code 3") as info:
        run_distributed(_exit_silently, 2, timeout=30)
    assert info.value.rank == 0


def _exit_silently_then_peer_fails(rank, world_size):
    if rank == 0:
        os._exit(3)
    time.sleep(0.3)  # rank 0 is gone by now, as after a lost rendezvous
    raise ConnectionResetError("peer closed the connection")


def test_silent_death_is_blamed_before_the_peer_it_broke():
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_exit_silently_then_peer_fails, 2, timeout=30)
    assert info.value.rank == 0
    msg = str(info.value)
    assert "Rank 0 exited with code 3 without reporting a result" in msg
    assert "Ranks [1] failed after it" in msg


def _fail_everywhere(rank, world_size):
    raise ValueError(f"boom from rank {rank}")


def test_ranks_that_all_raise_are_not_taken_for_silent_deaths():
    # Every rank exits right after reporting; none may be blamed as having died without a word.
    for _ in range(3):
        with pytest.raises(DistributedRunError) as info:
            run_distributed(_fail_everywhere, 3, timeout=30)
        msg = str(info.value)
        assert f"Rank {info.value.rank} failed" in msg and f"boom from rank {info.value.rank}" in msg
        assert "without reporting a result" not in msg


def test_unpicklable_result_is_reported():
    with pytest.raises(DistributedRunError, match="pickle"):
        run_distributed(lambda r, w: (lambda: None), 1, timeout=30)


def test_invalid_world_size():
    with pytest.raises(ValueError):
        run_distributed(_all_reduce, 0)
