"""How the master reaches model workers: requests to some ranks, replies gathered per request.

The master issues *operations* (a call, a data transfer, a hook) to the
ranks that take part in them and keeps several in flight. A model worker
serves its requests one at a time in the order they arrive, and the master
sends from a single thread, so every worker sees the operations it takes
part in in one global order. Collectives and point-to-point exchanges of an
operation therefore always meet: the earliest unfinished operation has every
participant either running it or done with everything before it.

:class:`Ticket` is one operation in flight; ``submit`` creates it and
``wait_any`` returns one whose replies have all arrived. Each reply carries
the worker's own wall-clock span of the handler, which makes overlap between
calls visible. Two transports implement this: :class:`PipeTransport`
(forked local workers, tests and benchmarks) and
:class:`realhf.system.request_reply_stream.MasterStream` (ZeroMQ, the
launched system).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from multiprocessing.connection import wait as wait_connections
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

Span = Tuple[float, float]

_ticket_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Ticket:
    """One operation sent to ``ranks``; ``replies``/``spans`` fill in as workers answer."""

    handle: str
    ranks: List[int]
    sent_at: float = dataclasses.field(default_factory=time.time)
    replies: Dict[int, Any] = dataclasses.field(default_factory=dict)
    spans: Dict[int, Span] = dataclasses.field(default_factory=dict)
    uid: int = dataclasses.field(default_factory=lambda: next(_ticket_ids))
    request_ids: Dict[str, int] = dataclasses.field(default_factory=dict)  # stream transports: id -> rank

    @property
    def done(self) -> bool:
        return len(self.replies) == len(self.ranks)

    @property
    def received_at(self) -> Optional[float]:
        return getattr(self, "_received_at", None)

    def accept(self, rank: int, value: Any, span: Optional[Span]) -> None:
        self.replies[rank] = value
        if span is not None:
            self.spans[rank] = span
        if self.done:
            self._received_at = time.time()

    def span(self) -> Optional[Span]:
        """Earliest start and latest end over the ranks that reported one."""
        if not self.spans:
            return None
        return min(s for s, _ in self.spans.values()), max(e for _, e in self.spans.values())

    def ordered(self) -> List[Any]:
        return [self.replies[r] for r in self.ranks]


class WorkerTransport(Protocol):
    n_workers: int

    def submit(self, ranks: Sequence[int], handle: str, data: Any = None) -> Ticket:
        ...

    def wait_any(self, tickets: Sequence[Ticket], timeout: Optional[float] = None) -> Ticket:
        ...

    def call_all(self, handle: str, data: Any = None) -> List[Any]:
        ...


def first_done(tickets: Sequence[Ticket]) -> Optional[Ticket]:
    return next((t for t in tickets if t.done), None)


class PipeTransport:
    """Tickets over multiprocessing connections to workers running ``serve_pipe``.

    A worker answers ``(status, value[, span])`` per request, in request
    order, so each connection keeps a queue of the tickets awaiting its next
    replies.
    """

    def __init__(self, conns: Sequence[Any], timeout: float = 300.0):
        self.conns = list(conns)
        self.n_workers = len(self.conns)
        self.timeout = timeout
        self._queues: List[Deque[Ticket]] = [deque() for _ in self.conns]

    def submit(self, ranks: Sequence[int], handle: str, data: Any = None) -> Ticket:
        ticket = Ticket(handle, list(ranks))
        for r in ticket.ranks:
            self.conns[r].send((handle, data))
            self._queues[r].append(ticket)
        return ticket

    def wait_any(self, tickets: Sequence[Ticket], timeout: Optional[float] = None) -> Ticket:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            ready = first_done(tickets)
            if ready is not None:
                return ready
            busy = [c for c, q in zip(self.conns, self._queues) if q]
            left = deadline - time.monotonic()
            got = wait_connections(busy, timeout=max(0.0, left)) if busy and left > 0 else []
            if not got:
                waiting = sorted({r for t in tickets for r in t.ranks if r not in t.replies})
                raise TimeoutError(f"Model workers {waiting} did not answer "
                                   f"{sorted({t.handle for t in tickets})} within {timeout}s.")
            for conn in got:
                self._receive(self.conns.index(conn))

    def _receive(self, rank: int) -> None:
        msg = self.conns[rank].recv()
        ticket = self._queues[rank].popleft()
        status, value = msg[0], msg[1]
        if status == "error":
            raise RuntimeError(f"Model worker {rank} failed in {ticket.handle!r}:\n{value}")
        ticket.accept(rank, value, msg[2] if len(msg) > 2 else None)

    def call_all(self, handle: str, data: Any = None) -> List[Any]:
        ticket = self.submit(range(self.n_workers), handle, data)
        return self.wait_any([ticket]).ordered()

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("exit", None))
            except (BrokenPipeError, OSError):
                pass
