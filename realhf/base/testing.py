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
# Reading this long after a rank exited finds any message it sent before.
_DRAIN_S = 0.2


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


def _raise_root_cause(
    procs: List[mp.Process], failures: Dict[int, str], silent: List[int]
) -> None:
    """Raise for the rank that most likely broke the run.

    A silent death outranks a reported exception; among exceptions, the
    first one reported wins (later ones are usually peers losing it).
    """
    if silent:
        rank = silent[0]
        message = (
            f"Rank {rank} exited with code {procs[rank].exitcode} without "
            "reporting a result."
        )
        if failures:
            message += f" Ranks {sorted(failures)} failed after it."
        raise DistributedRunError(rank, message)
    rank = next(iter(failures))
    raise DistributedRunError(rank, f"Rank {rank} failed:\n{failures[rank]}")


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
    failures: Dict[int, str] = {}
    first_failure_at: float | None = None
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
                if ok:
                    results[rank] = pickle.loads(payload)
                else:
                    failures[rank] = payload
                    if first_failure_at is None:
                        first_failure_at = time.monotonic()
                continue
            now = time.monotonic()
            silent = [
                r for r, p in enumerate(procs)
                if r not in results and r not in failures and p.exitcode is not None
            ]
            for rank in silent:
                exited_at.setdefault(rank, now)
            if first_failure_at is not None:
                # A rank that died without a word usually caused its peers'
                # failures (they lose the rendezvous or a collective), so
                # give it the grace period to show before blaming a peer. An
                # exited rank's message is already in the pipe: after
                # _DRAIN_S of reading, a rank still without one said nothing.
                settled = [r for r in silent if now - exited_at[r] > _DRAIN_S]
                if settled or now - first_failure_at > _EXIT_GRACE_S:
                    _raise_root_cause(procs, failures, settled)
                continue
            for rank in silent:
                if now - exited_at[rank] > _EXIT_GRACE_S:
                    _raise_root_cause(procs, failures, [rank])
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
