"""Score generations with reward functions in worker processes, with timeouts.

Reward code (rules, user files) must never stall or crash a training step.
:class:`RewardPool` runs a reward spec (see :mod:`realhf.impl.reward.mixture`)
in ``n_workers`` processes that rebuild the functions from the spec (user
functions are loaded by path and name, never pickled). Each call of a reward
function on an item gets ``timeout_s`` seconds; a worker that exceeds it (a
sleep, an infinite loop, a deadlock) is killed and replaced. A worker that dies
(e.g. ``os._exit`` in user code) is replaced too.

An item whose reward raises, times out or kills its worker is scored
``default`` and counted in :attr:`RewardPool.stats`; with ``default=None`` the
batch raises :class:`RewardError` naming the item, the function and the
cause (after the items already running finished, so the pool stays usable).

``n_workers=0`` scores in the calling process: errors are handled the same
way but timeouts are NOT enforced (a reward that never returns blocks the
caller). Use it for fast trusted rules or debugging.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time
import weakref
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

from realhf.impl.reward.mixture import ComponentFailure, RewardSpec, build_mixture, normalize_spec

RewardItem = Tuple[str, str, Mapping[str, Any]]  # (prompt, completion, metadata)
_IDLE = -1.0
_STARTING = -2.0
#: A worker gets this long to start (imports, user file) before it is replaced;
#: the per-call timeout only runs once it is ready.
STARTUP_TIMEOUT_S = 120.0


class RewardError(RuntimeError):
    """A reward could not be computed for an item and no default is configured."""

    def __init__(self, index: int, item_id: Hashable, function: str, cause: str):
        super().__init__(f"reward of item {index} (id {item_id!r}) failed in {function}: {cause}")
        self.index, self.item_id, self.function, self.cause = index, item_id, function, cause


def _worker_main(conn: Any, entries: List[Dict[str, Any]], state: Any, parent_pid: int) -> None:
    """Worker loop: ``(index, prompt, completion, metadata)`` in, result tuple out.

    ``state`` = [component index, its start time] lets the parent time each
    call; it is reset *before* the result is sent so the parent never times
    a new item against an old start. The loop exits when the parent closes
    the pipe, sends None, or disappears.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        mixture, init_error = build_mixture(entries), None
    except Exception as e:
        mixture, init_error = None, f"{type(e).__name__}: {e}"
    state[0] = _IDLE  # ready: calls are timed from now on

    def started(i: int) -> None:
        state[1] = time.monotonic()
        state[0] = float(i)

    while True:
        try:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, prompt, completion, metadata = msg
        if mixture is None:
            reply = ("err", index, "<reward setup>", init_error)
        else:
            try:
                reply = ("ok", index, mixture.score(prompt, completion, metadata, on_component=started))
            except ComponentFailure as e:
                reply = ("err", index, e.label, e.cause)
        state[0], state[1] = _IDLE, 0.0
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


class _Worker:
    """One worker process, its pipe end and its shared timing state."""

    def __init__(self, ctx: Any, entries: List[Dict[str, Any]], name: str):
        self.state = ctx.Array("d", [_STARTING, 0.0], lock=False)
        self.started_at = time.monotonic()
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, entries, self.state, os.getpid()),
                                   name=name, daemon=True)
        self.process.start()
        child.close()  # so a dead worker reads as EOF here
        self.item: Optional[int] = None  # index of the item in flight
        self.sent_at = 0.0

    @property
    def starting(self) -> bool:
        return self.state[0] == _STARTING

    def deadline(self, timeout_s: float) -> float:
        """When the running call times out (its start, or the send time before it started)."""
        if self.starting:
            return self.started_at + max(STARTUP_TIMEOUT_S, timeout_s)
        started = self.state[1] if self.state[0] != _IDLE else 0.0
        return max(self.sent_at, started) + timeout_s

    def timeout_cause(self, timeout_s: float) -> str:
        if self.starting:
            return f"reward worker did not start within {max(STARTUP_TIMEOUT_S, timeout_s):g} s"
        return f"timed out after {timeout_s:g} s"

    def running_label(self, labels: List[str]) -> str:
        i = int(self.state[0])
        return labels[i] if 0 <= i < len(labels) else "<reward setup>"

    def stop(self, kill: bool = False, grace_s: float = 1.0) -> None:
        """Ask an idle worker to exit (kill a busy one, or if asked), then release the pipe."""
        if not kill and self.item is None and self.process.is_alive():
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            self.process.join(grace_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.conn.close()
        try:
            self.process.close()
        except ValueError:  # still running after SIGKILL + 5 s: leave it to the OS
            pass


def _shutdown(workers: List[_Worker]) -> None:
    for w in workers:
        w.stop()
    workers.clear()


class RewardPool:
    """Score ``(prompt, completion, metadata)`` items with a reward spec.

    :param spec: reward spec (see :func:`realhf.impl.reward.mixture.normalize_spec`);
        validated (and user files loaded) here, so a bad spec fails at once.
    :param n_workers: worker processes, started on the first :meth:`score`;
        0 scores in-process without timeouts.
    :param timeout_s: limit of one reward function call on one item.
    :param default: reward of a failed item; None raises RewardError instead.
    :param mp_context: ``"fork"`` (default where available: workers start in
        milliseconds) or ``"spawn"``/``"forkserver"`` (workers import
        :mod:`realhf.impl.reward` and load user files themselves).
    """

    def __init__(self, spec: RewardSpec, n_workers: int = 2, timeout_s: float = 10.0,
                 default: Optional[float] = None, mp_context: Optional[str] = None):
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}.")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
        self.entries = normalize_spec(spec)
        self.mixture = build_mixture(self.entries)
        self.n_workers, self.timeout_s = int(n_workers), float(timeout_s)
        self.default = None if default is None else float(default)
        if mp_context is None:
            mp_context = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(mp_context)
        self._workers: List[_Worker] = []
        self._n_started = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self._stats = collections.Counter(scored=0, fallback=0, raised=0, exceptions=0, timeouts=0,
                                          worker_deaths=0, workers_started=0)

    # ----------------------------------------------------------------- public
    @property
    def stats(self) -> Dict[str, int]:
        """Cumulative counters: items ``scored``, ``fallback`` (got ``default``),
        ``raised``; causes ``exceptions``, ``timeouts``, ``worker_deaths``; and
        ``workers_started`` (initial workers plus replacements)."""
        return dict(self._stats)

    def score(self, items: Sequence[RewardItem], ids: Optional[Sequence[Hashable]] = None) -> List[float]:
        """One reward per item, in order; ``ids`` only label errors (default: the index)."""
        if self._closed:
            raise RuntimeError("RewardPool is closed.")
        ids = list(range(len(items))) if ids is None else list(ids)
        if len(ids) != len(items):
            raise ValueError(f"got {len(items)} items but {len(ids)} ids.")
        if self.n_workers == 0:
            return self._score_inline(items, ids)
        return self._score_workers(items, ids)

    def close(self) -> None:
        """Stop all workers (idempotent); the pool cannot score afterwards."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- internals
    def _fail(self, failures: Dict[int, Tuple[str, str]], index: int, function: str, cause: str,
              kind: str) -> None:
        self._stats[kind] += 1
        failures.setdefault(index, (function, cause))

    def _finish(self, results: List[Optional[float]], failures: Dict[int, Tuple[str, str]],
                ids: Sequence[Hashable]) -> List[float]:
        if failures and self.default is None:
            first = min(failures)
            self._stats["raised"] += len(failures)
            self._stats["scored"] += sum(r is not None for r in results)
            raise RewardError(first, ids[first], *failures[first])
        for i in failures:
            results[i] = self.default
        self._stats["fallback"] += len(failures)
        self._stats["scored"] += len(results) - len(failures)
        return [float(r) for r in results]

    def _score_inline(self, items: Sequence[RewardItem], ids: Sequence[Hashable]) -> List[float]:
        results: List[Optional[float]] = [None] * len(items)
        failures: Dict[int, Tuple[str, str]] = {}
        for i, (prompt, completion, metadata) in enumerate(items):
            try:
                results[i] = self.mixture.score(prompt, completion, metadata)
            except ComponentFailure as e:
                self._fail(failures, i, e.label, e.cause, "exceptions")
                if self.default is None:
                    break
        return self._finish(results, failures, ids)

    def _start_worker(self) -> _Worker:
        self._n_started += 1
        self._stats["workers_started"] += 1
        return _Worker(self._ctx, self.entries, f"realhf-reward-worker-{self._n_started}")

    def _replace(self, w: _Worker) -> None:
        """Kill ``w`` (stuck, dead or out of sync) and start a fresh worker in its place."""
        w.stop(kill=True)
        self._workers[self._workers.index(w)] = self._start_worker()

    def _score_workers(self, items: Sequence[RewardItem], ids: Sequence[Hashable]) -> List[float]:
        while len(self._workers) < self.n_workers:
            self._workers.append(self._start_worker())
        try:
            return self._run_batch(items, ids)
        except BaseException:
            # e.g. KeyboardInterrupt: replies still in flight would be taken for
            # the next batch's items, so workers that are busy are replaced.
            for w in list(self._workers):
                if w.item is not None:
                    self._replace(w)
            raise

    def _run_batch(self, items: Sequence[RewardItem], ids: Sequence[Hashable]) -> List[float]:
        """Dispatch one item per idle worker, collect replies, kill calls past their deadline."""
        labels = self.mixture.labels
        results: List[Optional[float]] = [None] * len(items)
        failures: Dict[int, Tuple[str, str]] = {}
        pending = collections.deque(range(len(items)))
        while True:
            if failures and self.default is None:
                pending.clear()  # stop dispatching; let running items finish
            for w in list(self._workers):
                if w.item is None and pending:
                    i = pending.popleft()
                    prompt, completion, metadata = items[i]
                    w.item, w.sent_at = i, time.monotonic()
                    try:
                        w.conn.send((i, prompt, completion, dict(metadata or {})))
                    except (OSError, ValueError) as e:
                        self._fail(failures, i, "<reward worker>", f"worker pipe failed: {e}", "worker_deaths")
                        self._replace(w)
            busy = [w for w in self._workers if w.item is not None]
            if not busy:
                return self._finish(results, failures, ids)
            wait_s = max(0.0, min(w.deadline(self.timeout_s) for w in busy) - time.monotonic())
            ready = mp.connection.wait([w.conn for w in busy], timeout=wait_s)
            for w in busy:
                if w.conn in ready:
                    self._collect(w, results, failures)
                elif time.monotonic() >= w.deadline(self.timeout_s):
                    self._fail(failures, w.item, w.running_label(labels), w.timeout_cause(self.timeout_s),
                               "timeouts")
                    self._replace(w)

    def _collect(self, w: _Worker, results: List[Optional[float]], failures: Dict[int, Tuple[str, str]]) -> None:
        """Read the reply of ``w`` (or note that it died) and mark it idle."""
        i = w.item
        try:
            kind, index, *rest = w.conn.recv()
        except (EOFError, OSError):
            w.process.join(1.0)
            code = w.process.exitcode
            self._fail(failures, i, w.running_label(self.mixture.labels),
                       f"worker process died (exit code {code})", "worker_deaths")
            self._replace(w)
            return
        w.item = None
        if kind == "ok":
            results[index] = rest[0]
        else:
            self._fail(failures, index, rest[0], rest[1], "exceptions")
