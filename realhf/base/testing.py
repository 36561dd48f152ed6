"""Running a function on several local processes joined by torch.distributed.

:func:`run_distributed` is meant for tests: it either returns every rank's
result or raises with the failing rank's traceback, and it never hangs past
its timeout.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import queue as queue_lib
import time
import traceback
from typing import Any, Callable, Dict, List, Sequence

from realhf.base import network

# Seconds to keep draining the result queue after a rank exited, since its
# message may still be in flight.
_EXIT_GRACE_S = 1.0


class DistributedRunError(RuntimeError):
    """A rank raised or died; ``rank`` names it."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    args: Sequence[Any],
    results: "mp.Queue",
) -> None:
    import torch

    # Forked children inherit the parent's OpenMP pool size; more than one
    # thread per process can deadlock after fork.
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{network.LOOPBACK}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        payload = pickle.dumps(fn(rank, world_size, *args))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, payload))
    # Keep rank 0, which hosts the rendezvous store, alive until every rank
    # is done. The result is already delivered, so a failure here (a peer
    # failed or was stopped) is the parent's to report, not ours.
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        pass


def _stop(procs: List[mp.Process], grace: float = 0.0) -> None:
    """Wait up to ``grace`` seconds for a clean exit, then terminate, then kill."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    timeout: float = 60,
    backend: str = "gloo",
    args: Sequence[Any] = (),
    start_method: str = "fork",
) -> List[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` new processes.

    Each process joins a fresh process group over a loopback TCP rendezvous
    and runs with one torch thread. Returns the results ordered by rank.
    Raises :class:`DistributedRunError` carrying the traceback if a rank
    fails, and ``TimeoutError`` naming unfinished ranks after ``timeout``
    seconds; in both cases all processes are killed first.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}.")
    ctx = mp.get_context(start_method)
    results_q = ctx.Queue()
    port = network.find_free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, backend, timeout, args, results_q),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    exited_at: Dict[int, float] = {}
    deadline = time.monotonic() + timeout
    succeeded = False
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = results_q.get(timeout=0.05)
            except queue_lib.Empty:
                pass
            else:
                if not ok:
                    raise DistributedRunError(rank, f"Rank {rank} failed:\n{payload}")
                results[rank] = pickle.loads(payload)
                continue
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in results or p.exitcode is None:
                    continue
                first_seen = exited_at.setdefault(rank, now)
                if now - first_seen > _EXIT_GRACE_S:
                    raise DistributedRunError(
                        rank,
                        f"Rank {rank} exited with code {p.exitcode} without "
                        "reporting a result.",
                    )
            if now > deadline:
                missing = [r for r in range(world_size) if r not in results]
                raise TimeoutError(
                    f"Ranks {missing} did not finish within {timeout}s "
                    f"(world size {world_size})."
                )
        succeeded = True
    finally:
        _stop(procs, grace=2.0 if succeeded else 0.0)
        results_q.close()
        results_q.join_thread()
    return [results[r] for r in range(world_size)]
