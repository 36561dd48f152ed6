"""Request/reply transport between the master worker and the model workers.

Topology (one trial, one stream name)::

    master  --PUSH-->  PULL  worker_0     (one PUSH socket per worker)
            --PUSH-->  PULL  worker_1
    master  PULL  <--PUSH--  every worker (one shared reply socket)

Every socket that *receives* binds (by default on ``network.gethostip()``,
i.e. 127.0.0.1 unless ``$REAL_HOST_IP`` is set) and publishes its address in
name_resolve; the sending side looks the address up and connects. Workers
therefore publish ``<trial>/request_reply_stream/<stream>/worker/<name>`` and
the master publishes ``<trial>/request_reply_stream/<stream>/master``.

Messages are pickled :class:`Payload` objects, so ``data`` may hold tensors or
``SequenceSample`` metadata. Requests to one worker arrive in the order they
were posted. A payload posted with ``no_syn=False`` takes part in a SYN/ACK
exchange: the worker stream answers a SYN as soon as it receives the request
and holds the request back until the master sends the matching ACK. The
master sends the ACKs of one :meth:`MasterStream.request` call back to back,
so every worker releases requests that involve several workers in the same
relative order (needed when they run collectives together).

A reply carrying an exception is raised on the master as :class:`WorkerError`
with the remote traceback text; a reply that does not arrive in time raises
:class:`RequestTimeout` naming the worker and the handle name.

Neither stream is thread-safe: use each from a single thread (or one asyncio
loop, see :meth:`MasterStream.agather`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import pickle
import time
import traceback
import uuid
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

import zmq

from realhf.base import logging, name_resolve, names, network
from realhf.system.transport import Ticket, first_done

logger = logging.getLogger("request_reply_stream")

DEFAULT_STREAM_NAME = "default"
ACK_HANDLE_NAME = "ack"
SYN_HANDLE_NAME = "syn"
# How long a constructor waits for the peer addresses to appear.
DEFAULT_CONNECT_TIMEOUT_S = 300.0
# Granularity of blocking waits, so that Ctrl-C stays responsive.
_WAIT_SLICE_MS = 100
# A worker keeps unsent replies this long when it closes its stream.
_WORKER_LINGER_MS = 2000


# ---------------------------------------------------------------------- #
# Name-resolve keys.
# ---------------------------------------------------------------------- #
def stream_root(experiment: str, trial: str, stream_name: str = DEFAULT_STREAM_NAME) -> str:
    return names.request_reply_stream(experiment, trial, stream_name)


def worker_address_key(
    experiment: str, trial: str, worker_name: str, stream_name: str = DEFAULT_STREAM_NAME
) -> str:
    """Where a worker publishes the address of its request (PULL) socket."""
    return f"{stream_root(experiment, trial, stream_name)}/worker/{worker_name}"


def master_address_key(
    experiment: str, trial: str, stream_name: str = DEFAULT_STREAM_NAME
) -> str:
    """Where the master publishes the address of its reply (PULL) socket."""
    return f"{stream_root(experiment, trial, stream_name)}/master"


# ---------------------------------------------------------------------- #
# Messages and errors.
# ---------------------------------------------------------------------- #
def _new_id() -> str:
    return uuid.uuid4().hex


@dataclasses.dataclass
class RemoteError:
    """An exception raised on a worker, reduced to picklable text."""

    type_name: str
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> "RemoteError":
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc), tb)


@dataclasses.dataclass
class Payload:
    """One request (master -> worker) or one reply (worker -> master).

    ``handler`` names the target: a worker name, an index into the master's
    worker list, or any key of the master's ``routing`` table (e.g. a model
    shard id). On replies it is the name of the answering worker.
    """

    handler: Any
    handle_name: str
    request_id: str = dataclasses.field(default_factory=_new_id)
    data: Any = None
    pre_hooks: List[str] = dataclasses.field(default_factory=list)
    pre_hook_data: List[Any] = dataclasses.field(default_factory=list)
    post_hooks: List[str] = dataclasses.field(default_factory=list)
    post_hook_data: List[Any] = dataclasses.field(default_factory=list)
    send_time: Optional[float] = None
    no_syn: bool = True
    syn_reply_id: str = dataclasses.field(default_factory=_new_id)
    ack_reply_id: str = dataclasses.field(default_factory=_new_id)
    # Set on replies only: the exception the worker raised, and the worker's
    # wall-clock (start, end) of the handler.
    error: Optional[RemoteError] = None
    span: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        if len(self.pre_hooks) != len(self.pre_hook_data):
            if self.pre_hook_data:
                raise ValueError("pre_hooks and pre_hook_data differ in length.")
            self.pre_hook_data = [None] * len(self.pre_hooks)
        if len(self.post_hooks) != len(self.post_hook_data):
            if self.post_hook_data:
                raise ValueError("post_hooks and post_hook_data differ in length.")
            self.post_hook_data = [None] * len(self.post_hooks)


class RequestTimeout(TimeoutError):
    """Replies did not arrive in time; ``missing`` lists (worker, handle_name, request_id)."""

    def __init__(self, timeout: Optional[float], missing: Sequence[Tuple[str, str, str]]):
        self.timeout = timeout
        self.missing = list(missing)
        parts = [f"worker {w!r} handle {h!r} (request {r[:8]})" for w, h, r in self.missing]
        shown = "; ".join(parts[:8])
        if len(parts) > 8:
            shown += f"; and {len(parts) - 8} more"
        super().__init__(
            f"Timed out after {timeout}s waiting for replies from: {shown or 'nothing pending'}."
        )

    @property
    def worker_names(self) -> List[str]:
        return [w for w, _, _ in self.missing]


class WorkerError(RuntimeError):
    """A worker raised while handling a request; carries the remote traceback text."""

    def __init__(self, worker_name: str, handle_name: str, request_id: str, remote: RemoteError):
        self.worker_name = worker_name
        self.handle_name = handle_name
        self.request_id = request_id
        self.remote_type = remote.type_name
        self.remote_message = remote.message
        self.remote_traceback = remote.traceback
        super().__init__(
            f"Worker {worker_name!r} raised {remote.type_name} while handling "
            f"{handle_name!r} (request {request_id[:8]}): {remote.message}\n"
            f"--- remote traceback ---\n{remote.traceback}"
        )


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _bind_random(sock: zmq.Socket, host: str) -> str:
    port = sock.bind_to_random_port(
        f"tcp://{host}", min_port=network.DEFAULT_PORT_LOW, max_port=network.DEFAULT_PORT_HIGH
    )
    return f"tcp://{host}:{port}"


def _remaining_ms(deadline: Optional[float]) -> int:
    if deadline is None:
        return _WAIT_SLICE_MS
    return max(0, min(_WAIT_SLICE_MS, int((deadline - time.monotonic()) * 1000)))


# ---------------------------------------------------------------------- #
# Master side.
# ---------------------------------------------------------------------- #
class MasterStream:
    """Posts requests to named workers and collects their replies.

    Args:
        experiment, trial: identify the trial (name_resolve namespace).
        worker_names: the workers to talk to; payload handlers that are ints
            index this list.
        timeout_s: default timeout of :meth:`poll` / :meth:`gather` (None:
            wait forever).
        host: address to bind the reply socket on.
        routing: optional extra handler -> worker (name or index) table.
        connect_timeout_s: how long to wait for workers to publish addresses.
    """

    def __init__(
        self,
        experiment: str,
        trial: str,
        worker_names: Sequence[str],
        timeout_s: Optional[float] = None,
        host: Optional[str] = None,
        stream_name: str = DEFAULT_STREAM_NAME,
        routing: Optional[Dict[Hashable, Union[int, str]]] = None,
        connect_timeout_s: Optional[float] = DEFAULT_CONNECT_TIMEOUT_S,
    ):
        if len(set(worker_names)) != len(worker_names):
            raise ValueError(f"Duplicate worker names: {list(worker_names)}.")
        self.experiment, self.trial = experiment, trial
        self.worker_names: List[str] = list(worker_names)
        self.timeout_s = timeout_s
        self.stream_name = stream_name
        self._routing = dict(routing or {})
        self._ctx = zmq.Context()
        self._send: Dict[str, zmq.Socket] = {}
        # request_id -> (worker name, handle name) of replies still expected.
        self._pending: Dict[str, Tuple[str, str]] = {}
        self._internal: set = set()  # SYN reply ids, never shown to callers
        self._replies: "collections.OrderedDict[str, Payload]" = collections.OrderedDict()
        self._closed = False
        try:
            self._recv = self._ctx.socket(zmq.PULL)
            self._recv.setsockopt(zmq.LINGER, 0)
            self.address = _bind_random(self._recv, host or network.gethostip())
            name_resolve.add(
                master_address_key(experiment, trial, stream_name), self.address, replace=True
            )
            for name in self.worker_names:
                key = worker_address_key(experiment, trial, name, stream_name)
                try:
                    addr = name_resolve.wait(key, timeout=connect_timeout_s)
                except TimeoutError:
                    raise RequestTimeout(
                        connect_timeout_s, [(name, "<connect>", "-" * 8)]
                    ) from None
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(addr)
                self._send[name] = sock
        except BaseException:
            self.close()
            raise

    # -- routing --------------------------------------------------------- #
    def route(self, handler: Any) -> str:
        """Worker name that serves ``handler``."""
        if isinstance(handler, str) and handler in self._send:
            return handler
        if isinstance(handler, int) and not isinstance(handler, bool):
            if not 0 <= handler < len(self.worker_names):
                raise IndexError(f"Handler index {handler} out of range [0, {len(self.worker_names)}).")
            return self.worker_names[handler]
        try:
            target = self._routing[handler]
        except (KeyError, TypeError):
            raise ValueError(
                f"Cannot route handler {handler!r}: not a worker name, index or routing key."
            ) from None
        return self.route(target)

    # -- sending --------------------------------------------------------- #
    def _send_payload(self, worker: str, payload: Payload, expect_reply: bool) -> None:
        payload.send_time = time.time()
        msg = _dumps(payload)
        if expect_reply:
            self._pending[payload.request_id] = (worker, payload.handle_name)
        self._send[worker].send(msg)

    def post(self, payload: Payload) -> str:
        """Send one request; return its request id (SYN/ACK done if ``no_syn`` is False)."""
        return self.request([payload])[0]

    def request(self, payloads: Iterable[Payload], timeout: Optional[float] = None) -> List[str]:
        """Send several requests; those with ``no_syn=False`` are released together.

        The requests are sent first, then the SYNs of all synchronized ones are
        awaited (``timeout``, default ``timeout_s``) and the ACKs are sent back
        to back. Returns the request ids in input order.
        """
        self._check_open()
        payloads = list(payloads)
        synced: List[Tuple[str, Payload]] = []
        for p in payloads:
            worker = self.route(p.handler)
            self._send_payload(worker, p, expect_reply=True)
            if not p.no_syn:
                self._pending[p.syn_reply_id] = (worker, f"{p.handle_name}:{SYN_HANDLE_NAME}")
                self._internal.add(p.syn_reply_id)
                synced.append((worker, p))
        if synced:
            syn_ids = [p.syn_reply_id for _, p in synced]
            self._wait_for(syn_ids, timeout)
            for sid in syn_ids:
                self._replies.pop(sid, None)
                self._internal.discard(sid)
            for worker, p in synced:
                ack = Payload(handler=worker, handle_name=ACK_HANDLE_NAME,
                              request_id=p.ack_reply_id, data=p.request_id)
                self._send_payload(worker, ack, expect_reply=False)
        return [p.request_id for p in payloads]

    def call(self, handlers: Sequence[Any], handle_name: str, datas: Optional[Sequence[Any]] = None,
             timeout: Optional[float] = None, no_syn: bool = True, **payload_kwargs) -> List[Any]:
        """Post ``handle_name`` to every handler and return the reply data in order."""
        datas = [None] * len(handlers) if datas is None else list(datas)
        if len(datas) != len(handlers):
            raise ValueError("handlers and datas differ in length.")
        ids = self.request(
            [Payload(handler=h, handle_name=handle_name, data=d, no_syn=no_syn, **payload_kwargs)
             for h, d in zip(handlers, datas)],
            timeout=timeout,
        )
        replies = self.gather(ids, timeout=timeout)
        return [replies[i] for i in ids]

    @property
    def n_workers(self) -> int:
        return len(self.worker_names)

    def call_all(self, handle: str, data: Any = None, timeout: Optional[float] = None) -> List[Any]:
        """Send the same ``data`` to every worker; reply data in worker order."""
        return self.call(list(range(self.n_workers)), handle, [data] * self.n_workers, timeout=timeout)

    def submit(self, ranks: Sequence[int], handle: str, data: Any = None) -> Ticket:
        """Send ``handle`` with the same ``data`` to the workers ``ranks`` (indices); see
        :mod:`realhf.system.transport`."""
        ticket = Ticket(handle, list(ranks))
        ids = self.request([Payload(handler=r, handle_name=handle, data=data) for r in ticket.ranks])
        ticket.request_ids = dict(zip(ids, ticket.ranks))
        return ticket

    def wait_any(self, tickets: Sequence[Ticket], timeout: Optional[float] = None) -> Ticket:
        """Block until one of ``tickets`` has all its replies; return it."""
        self._check_open()
        timeout, deadline = self._deadline(timeout)
        while True:
            for t in tickets:
                for rid in [i for i in t.request_ids if i in self._replies]:
                    reply = self._replies.pop(rid)
                    t.accept(t.request_ids[rid], reply.data, reply.span)
            ready = first_done(tickets)
            if ready is not None:
                return ready
            if deadline is not None and time.monotonic() >= deadline:
                if self._drain():
                    continue
                raise RequestTimeout(timeout, self._missing(
                    [i for t in tickets for i, r in t.request_ids.items() if r not in t.replies]))
            self._recv_some(deadline)

    # -- receiving ------------------------------------------------------- #
    def _accept(self, msg: bytes) -> None:
        reply: Payload = pickle.loads(msg)
        origin = self._pending.pop(reply.request_id, None)
        worker, handle = origin if origin is not None else (str(reply.handler), reply.handle_name)
        if reply.error is not None:
            raise WorkerError(worker, handle, reply.request_id, reply.error)
        if origin is None:
            logger.warning(f"Dropping unexpected reply {reply.request_id[:8]} "
                           f"({handle!r}) from worker {worker!r}.")
            return
        self._replies[reply.request_id] = reply

    def _drain(self) -> bool:
        """Accept every reply available now; True if there was any."""
        got = False
        while True:
            try:
                msg = self._recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return got
            self._accept(msg)
            got = True

    def _recv_some(self, deadline: Optional[float]) -> None:
        """Wait (at most one slice, not past ``deadline``) for replies and accept them."""
        if self._drain():
            return
        if self._recv.poll(_remaining_ms(deadline)):
            self._drain()

    def _deadline(self, timeout: Optional[float]) -> Tuple[Optional[float], Optional[float]]:
        timeout = self.timeout_s if timeout is None else timeout
        return timeout, (None if timeout is None else time.monotonic() + timeout)

    def _missing(self, ids: Iterable[str]) -> List[Tuple[str, str, str]]:
        return [(*self._pending.get(i, ("?", "?")), i) for i in ids if i not in self._replies]

    def _wait_for(self, ids: Sequence[str], timeout: Optional[float]) -> None:
        timeout, deadline = self._deadline(timeout)
        for i in ids:
            if i not in self._replies and i not in self._pending:
                raise ValueError(f"Unknown or already consumed request id {i!r}.")
        while True:
            if all(i in self._replies for i in ids):
                return
            if deadline is not None and time.monotonic() >= deadline:
                self._drain()
                if all(i in self._replies for i in ids):
                    return
                raise RequestTimeout(timeout, self._missing(ids))
            self._recv_some(deadline)

    def poll(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Payload]:
        """Next unconsumed reply payload.

        Non-blocking: None if nothing arrived. Blocking: waits up to
        ``timeout`` (default ``timeout_s``) and raises :class:`RequestTimeout`
        listing the outstanding requests.
        """
        self._check_open()
        timeout, deadline = self._deadline(timeout)
        while True:
            for rid in self._replies:
                if rid not in self._internal:
                    return self._replies.pop(rid)
            if not block:
                if self._drain():
                    continue
                return None
            if deadline is not None and time.monotonic() >= deadline:
                if self._drain():
                    continue
                outstanding = [i for i in self._pending if i not in self._internal]
                raise RequestTimeout(timeout, self._missing(outstanding))
            self._recv_some(deadline)

    def gather(self, request_ids: Sequence[str], timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait for the replies of ``request_ids``; return ``{request_id: reply data}``."""
        return {rid: p.data for rid, p in self.gather_payloads(request_ids, timeout).items()}

    def gather_payloads(self, request_ids: Sequence[str], timeout: Optional[float] = None) -> Dict[str, Payload]:
        """Like :meth:`gather` but returns the reply :class:`Payload` objects."""
        self._check_open()
        self._wait_for(list(request_ids), timeout)
        return {rid: self._replies.pop(rid) for rid in request_ids}

    async def agather(self, request_ids: Sequence[str], timeout: Optional[float] = None,
                      interval: float = 0.002) -> Dict[str, Any]:
        """Asyncio version of :meth:`gather`; yields to the loop while waiting."""
        self._check_open()
        ids = list(request_ids)
        timeout, deadline = self._deadline(timeout)
        while True:
            self._drain()
            if all(i in self._replies for i in ids):
                return {i: self._replies.pop(i).data for i in ids}
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestTimeout(timeout, self._missing(ids))
            await asyncio.sleep(interval)

    @property
    def pending_requests(self) -> Dict[str, Tuple[str, str]]:
        """Outstanding request ids -> (worker name, handle name)."""
        return {k: v for k, v in self._pending.items() if k not in self._internal}

    # -- lifetime -------------------------------------------------------- #
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MasterStream is closed.")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in list(self._send.values()) + [getattr(self, "_recv", None)]:
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "MasterStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- #
# Worker side.
# ---------------------------------------------------------------------- #
class WorkerStream:
    """Receives requests for one worker and sends replies to the master.

    The request socket binds and its address is published at construction;
    the reply socket connects to the master lazily, on the first reply.
    """

    def __init__(
        self,
        experiment: str,
        trial: str,
        worker_name: str,
        host: Optional[str] = None,
        stream_name: str = DEFAULT_STREAM_NAME,
        connect_timeout_s: Optional[float] = DEFAULT_CONNECT_TIMEOUT_S,
    ):
        self.experiment, self.trial = experiment, trial
        self.worker_name = worker_name
        self.stream_name = stream_name
        self.connect_timeout_s = connect_timeout_s
        self._ctx = zmq.Context()
        self._send: Optional[zmq.Socket] = None
        self._ready: "collections.deque[Payload]" = collections.deque()
        self._held: Dict[str, Payload] = {}  # ack_reply_id -> request awaiting its ACK
        self._handles: Dict[str, str] = {}  # request_id -> handle name, until replied
        self._closed = False
        self._recv = self._ctx.socket(zmq.PULL)
        self._recv.setsockopt(zmq.LINGER, 0)
        try:
            self.address = _bind_random(self._recv, host or network.gethostip())
            name_resolve.add(
                worker_address_key(experiment, trial, worker_name, stream_name),
                self.address, replace=True,
            )
        except BaseException:
            self.close()
            raise

    def _reply_socket(self) -> zmq.Socket:
        if self._send is None:
            addr = name_resolve.wait(
                master_address_key(self.experiment, self.trial, self.stream_name),
                timeout=self.connect_timeout_s,
            )
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, _WORKER_LINGER_MS)
            sock.connect(addr)
            self._send = sock
        return self._send

    def _accept(self, msg: bytes) -> None:
        p: Payload = pickle.loads(msg)
        if p.handle_name == ACK_HANDLE_NAME and p.request_id in self._held:
            self._ready.append(self._held.pop(p.request_id))
            return
        self._handles[p.request_id] = p.handle_name
        if p.no_syn:
            self._ready.append(p)
            return
        self._held[p.ack_reply_id] = p
        syn = Payload(handler=self.worker_name, handle_name=SYN_HANDLE_NAME,
                      request_id=p.syn_reply_id)
        syn.send_time = time.time()
        self._reply_socket().send(_dumps(syn))

    def _drain(self) -> None:
        while True:
            try:
                msg = self._recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._accept(msg)

    def poll(self, block: bool = False, timeout: Optional[float] = None) -> Optional[Payload]:
        """Next request released to this worker, or None (non-blocking / timed out)."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain()
            if self._ready:
                return self._ready.popleft()
            if not block or (deadline is not None and time.monotonic() >= deadline):
                return None
            self._recv.poll(_remaining_ms(deadline))

    def reply(self, request: Union[str, Payload], data: Any = None,
              exception: Optional[BaseException] = None,
              span: Optional[Tuple[float, float]] = None) -> None:
        """Answer ``request`` (a Payload or its id) with ``data`` or an exception.

        Passing an exception instance as ``data`` is the same as passing it as
        ``exception``. Data that cannot be pickled is reported as an error.
        """
        self._check_open()
        rid = request.request_id if isinstance(request, Payload) else request
        handle = self._handles.pop(rid, request.handle_name if isinstance(request, Payload) else "?")
        if exception is None and isinstance(data, BaseException):
            data, exception = None, data
        reply = Payload(handler=self.worker_name, handle_name=handle, request_id=rid, data=data, span=span)
        if exception is not None:
            reply.data = None
            reply.error = RemoteError.from_exception(exception)
        reply.send_time = time.time()
        try:
            msg = _dumps(reply)
        except Exception as e:  # unpicklable reply data
            reply.data = None
            reply.error = RemoteError.from_exception(e)
            msg = _dumps(reply)
        self._reply_socket().send(msg)

    @property
    def n_held(self) -> int:
        """Requests received but still waiting for their ACK."""
        return len(self._held)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("WorkerStream is closed.")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._recv.close(linger=0)
        if self._send is not None:
            self._send.close()  # keeps unsent replies up to the linger period
        self._ctx.term()

    def __enter__(self) -> "WorkerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
