"""Byte streams between the model workers of one host, over Unix-domain sockets.

Workers move batches (a few KB) and weights (MBs) to each other between
calls. With gloo on a CPU host each point-to-point message is handed from the
caller to gloo's I/O thread and back through condition variables; right after
a compute phase these wake-ups take 1-5 ms per round on a loaded machine,
while a socket read returns in tens of microseconds. So workers that share a
host also hold a connected socket to each other and exchange through it;
anything else (other hosts, NCCL worlds, a failed setup) keeps using
``torch.distributed``.

:meth:`LocalLinks.connect` is collective over the default process group. Each
rank listens on an abstract socket named by a token rank 0 draws and by its
rank, connects to the lower ranks of its host and accepts the higher ones;
if any rank fails, every rank gets None. A message is an 8-byte length and
the bytes; :meth:`LocalLinks.exchange` moves all sends and receives of one
step at once through non-blocking sockets, so two ranks may send each other
large messages without either waiting for the other to read first.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_LEN = struct.Struct("<Q")
_BUF_BYTES = 4 << 20  # socket buffers: a weight transfer takes few system calls


def host_id() -> str:
    """What identifies this machine (and kernel instance) to the other workers."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _bytes_view(t: torch.Tensor) -> memoryview:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("LocalLinks moves contiguous CPU tensors only.")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


class LocalLinks:
    """Connected sockets from this rank to the other ranks of its host."""

    def __init__(self, rank: int, socks: Dict[int, socket.socket], timeout: float):
        self.rank = rank
        self.socks = socks
        self.timeout = timeout

    @property
    def peers(self) -> List[int]:
        return sorted(self.socks)

    def reaches(self, ranks: Sequence[int]) -> bool:
        return all(r == self.rank or r in self.socks for r in ranks)

    # ------------------------------------------------------------------ setup
    @classmethod
    def connect(cls, timeout: float = 600.0) -> Optional["LocalLinks"]:
        """Link every pair of ranks that share a host (collective; None where nothing to link
        or when any rank failed)."""
        if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() != "gloo":
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
        info = [None] * world
        dist.all_gather_object(info, (host_id(), uuid.uuid4().hex if rank == 0 else None))
        token = info[0][1]
        local = [r for r in range(world) if r != rank and info[r][0] == info[rank][0]]
        socks: Dict[int, socket.socket] = {}
        listener, error = None, None
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(_address(token, rank))
            listener.listen(max(1, world))
        except OSError as e:
            error = e
        dist.barrier()  # every listener is up
        if error is None:
            try:
                for peer in [r for r in local if r < rank]:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(30.0)
                    s.connect(_address(token, peer))
                    s.sendall(_LEN.pack(rank))
                    socks[peer] = s
                listener.settimeout(30.0)
                for _ in [r for r in local if r > rank]:
                    s, _addr = listener.accept()
                    s.settimeout(30.0)
                    (peer,) = _LEN.unpack(_recv_exact(s, _LEN.size))
                    socks[int(peer)] = s
            except OSError as e:
                error = e
        if listener is not None:
            listener.close()
        ok = torch.tensor([0 if error is not None or sorted(socks) != local else 1], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok.item()) or not local:
            for s in socks.values():
                s.close()
            return None
        for s in socks.values():
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUF_BYTES)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF_BYTES)
            s.setblocking(False)
        return cls(rank, socks, timeout)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks = {}

    # --------------------------------------------------------------- exchange
    def exchange(self, sends: Sequence[Tuple[torch.Tensor, int]],
                 recvs: Sequence[Tuple[int, Optional[torch.Tensor]]]) -> List[torch.Tensor]:
        """Send each ``(tensor, dst)`` and receive one message from each ``(src, buffer)``.

        A given buffer must have exactly the incoming size and is filled in place;
        with None a uint8 tensor of the message's size is allocated. Returns the
        received tensors in ``recvs`` order. At most one send and one receive per
        peer; messages of one pair arrive in the order they were sent.
        """
        sel = selectors.DefaultSelector()
        out: List[Optional[torch.Tensor]] = [None] * len(recvs)
        writing: Dict[int, List[memoryview]] = {}
        reading: Dict[int, list] = {}  # src -> [index, header bytearray, target view, filled]
        for t, dst in sends:
            if dst in writing:
                raise ValueError(f"LocalLinks.exchange: two sends to rank {dst} in one exchange.")
            view = _bytes_view(t)
            writing[dst] = [memoryview(_LEN.pack(view.nbytes)), view]
        for i, (src, buf) in enumerate(recvs):
            if src in reading:
                raise ValueError(f"LocalLinks.exchange: two receives from rank {src} in one exchange.")
            reading[src] = [i, bytearray(), buf, 0]
        for peer in set(writing) | set(reading):
            if peer not in self.socks:
                raise ValueError(f"Rank {self.rank} has no local link to rank {peer}; linked: {self.peers}.")
            events = (selectors.EVENT_WRITE if peer in writing else 0) | (selectors.EVENT_READ if peer in reading else 0)
            sel.register(self.socks[peer], events, peer)
        deadline = time.monotonic() + self.timeout
        try:
            while writing or reading:
                left = deadline - time.monotonic()
                ready = sel.select(timeout=max(0.0, left))
                if not ready and left <= 0:
                    waiting = sorted(set(writing) | set(reading))
                    raise TimeoutError(f"Rank {self.rank}: no progress with ranks {waiting} within {self.timeout}s.")
                for key, mask in ready:
                    peer = key.data
                    if mask & selectors.EVENT_WRITE and peer in writing:
                        self._write_some(peer, writing)
                    if mask & selectors.EVENT_READ and peer in reading:
                        self._read_some(peer, reading, out)
                    events = ((selectors.EVENT_WRITE if peer in writing else 0)
                              | (selectors.EVENT_READ if peer in reading else 0))
                    if events:
                        sel.modify(key.fileobj, events, peer)
                    else:
                        sel.unregister(key.fileobj)
        finally:
            sel.close()
        return out  # type: ignore[return-value]

    def all_reduce_sum(self, t: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
        """Sum ``t`` (contiguous, CPU) over ``ranks`` in place; every rank of ``ranks`` calls it.

        Reduce-scatter then all-gather, each rank reducing one chunk, so each
        rank sends and receives ``2 (n - 1) / n`` of the tensor. A chunk is
        summed in the order of ``ranks``, so the result does not depend on
        which rank reduced it (with two ranks it equals any other sum of the
        two, addition being commutative).
        """
        ranks = list(ranks)
        n = len(ranks)
        if n == 1 or t.numel() == 0:
            return t
        me = ranks.index(self.rank)
        flat = t.view(-1)
        bounds = [flat.numel() * i // n for i in range(n + 1)]
        chunk = [flat[bounds[i]:bounds[i + 1]] for i in range(n)]
        others = [i for i in range(n) if i != me]
        parts = self.exchange([(chunk[i], ranks[i]) for i in others],
                              [(ranks[i], torch.empty_like(chunk[me])) for i in others])
        incoming = dict(zip(others, parts))
        total = (chunk[me] if me == 0 else incoming[0]).clone()
        for i in range(1, n):
            total += chunk[me] if i == me else incoming[i]
        chunk[me].copy_(total)
        self.exchange([(chunk[me], ranks[i]) for i in others], [(ranks[i], chunk[i]) for i in others])
        return t

    def _write_some(self, peer: int, writing: Dict[int, List[memoryview]]) -> None:
        parts = writing[peer]
        try:
            n = self.socks[peer].send(parts[0])
        except BlockingIOError:
            return
        except OSError as e:
            raise ConnectionError(f"Rank {self.rank}: the link to rank {peer} broke while sending ({e}).") from e
        if n < len(parts[0]):
            parts[0] = parts[0][n:]
        else:
            parts.pop(0)
            while parts and parts[0].nbytes == 0:
                parts.pop(0)
        if not parts:
            del writing[peer]

    def _read_some(self, peer: int, reading: Dict[int, list], out: List[Optional[torch.Tensor]]) -> None:
        state = reading[peer]
        idx, header, target, filled = state
        s = self.socks[peer]
        try:
            if target is None or len(header) < _LEN.size:
                chunk = s.recv(_LEN.size - len(header))
                if not chunk:
                    raise ConnectionError(f"Rank {self.rank}: rank {peer} closed its link.")
                header += chunk
                if len(header) < _LEN.size:
                    return
                (size,) = _LEN.unpack(bytes(header))
                buf = state[2]
                if buf is None:
                    buf = torch.empty(size, dtype=torch.uint8)
                elif buf.numel() * buf.element_size() != size:
                    raise ValueError(f"Rank {self.rank}: rank {peer} sent {size} bytes into a buffer of "
                                     f"{buf.numel() * buf.element_size()}.")
                out[idx] = buf
                state[2] = _bytes_view(buf)
                target = state[2]
            if filled < target.nbytes:
                n = s.recv_into(target[filled:])
                if n == 0:
                    raise ConnectionError(f"Rank {self.rank}: rank {peer} closed its link mid-message.")
                filled += n
                state[3] = filled
        except BlockingIOError:
            return
        if state[3] >= state[2].nbytes:
            del reading[peer]


def _address(token: str, rank: int) -> str:
    # Abstract namespace (leading NUL): no file to clean up, gone with the process.
    return f"\0realhf-{token}-{rank}-{os.getuid()}"


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("Local link closed during the handshake.")
        data += chunk
    return data
