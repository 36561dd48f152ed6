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

import mmap
import os
import selectors
import socket
import struct
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

_LEN = struct.Struct("<Q")
# In-place reductions of :meth:`LocalLinks.all_reduce`: acc <- acc (op) x.
_COMBINE = {"sum": lambda acc, x: acc.add_(x), "min": lambda acc, x: torch.minimum(acc, x, out=acc),
            "max": lambda acc, x: torch.maximum(acc, x, out=acc)}
_BUF_BYTES = 4 << 20  # socket buffers (the kernel may cap them lower: wmem_max / rmem_max)
# Messages from this size go through a shared-memory region instead of the socket.
SHM_MIN_BYTES = int(os.environ.get("REAL_LINK_SHM_MIN_BYTES", str(1 << 20)))
# ... up to this size: a region stays allocated, so larger ones (big models' weights) use the socket.
SHM_MAX_BYTES = int(os.environ.get("REAL_LINK_SHM_MAX_BYTES", str(256 << 20)))
_FLAG_SHM, _FLAG_FD = 1 << 63, 1 << 62  # header flags: payload in the region / region fd attached
_SIZE_MASK = (1 << 62) - 1
_REGION_HEAD = 64  # u64 messages posted, u64 messages consumed; payload after it
# Poll this long (yielding the core between polls) before sleeping in an exchange.
SPIN_S = float(os.environ.get("REAL_LINK_SPIN_MS", "5")) / 1e3


def _combiner(op: str):
    combine = _COMBINE.get(op)
    if combine is None:
        raise ValueError(f"op must be one of {sorted(_COMBINE)}, got {op!r}")
    return combine


def host_id() -> str:
    """What identifies this machine (and kernel instance) to the other workers."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class _Region:
    """A shared-memory area (memfd) through which one rank hands a peer large messages.

    Socket buffers are kernel memory allocated and freed per message; on a VM
    whose freed pages go back to the host, refaulting them made a 14 MB
    transfer take 30-40 ms instead of 2-3. A region stays mapped in both
    processes and is reused: the writer waits until the reader has counted the
    previous message consumed before writing the next one."""

    def __init__(self, fd: int, capacity: int):
        self.fd = fd
        self.capacity = capacity
        self.mm = mmap.mmap(fd, _REGION_HEAD + capacity)
        self.payload = torch.frombuffer(self.mm, dtype=torch.uint8, offset=_REGION_HEAD, count=capacity)

    @classmethod
    def create(cls, capacity: int) -> "_Region":
        fd = os.memfd_create("realhf-link", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _REGION_HEAD + capacity)
            return cls(fd, capacity)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> "_Region":
        try:
            region = cls(fd, os.fstat(fd).st_size - _REGION_HEAD)
        finally:
            os.close(fd)  # the mapping keeps the memory
        region.fd = -1
        return region

    def counter(self, i: int) -> int:
        return struct.unpack_from("<Q", self.mm, 8 * i)[0]

    def set_counter(self, i: int, value: int) -> None:
        struct.pack_into("<Q", self.mm, 8 * i, value)

    def release_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.release_fd()
        self.payload = None  # the tensor pins the mapping
        self.mm.close()


class _FdHeader:
    """A header to send with a region's file descriptor attached."""

    def __init__(self, header: bytes, region: _Region):
        self.header, self.region = header, region


def _bytes_view(t: torch.Tensor) -> memoryview:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("LocalLinks moves contiguous CPU tensors only.")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


class LocalLinks:
    """Connected sockets from this rank to the other ranks of its host."""

    def __init__(self, rank: int, socks: Dict[int, socket.socket], timeout: float, spin_s: float = SPIN_S):
        self.rank = rank
        self.socks = socks
        self.timeout = timeout
        self.spin_s = spin_s
        self._tx: Dict[int, _Region] = {}  # regions this rank writes to each peer
        self._rx: Dict[int, _Region] = {}  # the regions each peer writes to this rank
        self._shm_ok = hasattr(os, "memfd_create")

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
        for region in list(self._tx.values()) + list(self._rx.values()):
            region.close()
        self.socks, self._tx, self._rx = {}, {}, {}

    def _region_for(self, dst: int, nbytes: int, deadline: float) -> Tuple[_Region, bool]:
        """The region to write a message of ``nbytes`` to ``dst`` into (new: its fd must be sent)."""
        region = self._tx.get(dst)
        if region is None or region.capacity < nbytes:
            if region is not None:
                region.close()  # the peer keeps its own mapping until it attaches the new one
            region = self._tx[dst] = _Region.create(max(nbytes, 2 * (region.capacity if region else 0)))
            return region, True
        while region.counter(1) != region.counter(0):  # the previous message is still being read
            if time.monotonic() > deadline:
                raise TimeoutError(f"Rank {self.rank}: rank {dst} did not read its previous message in time.")
            time.sleep(0.0002)
        return region, False

    def _outgoing(self, t: torch.Tensor, dst: int, deadline: float) -> List[Union[memoryview, _FdHeader]]:
        view = _bytes_view(t)
        n = view.nbytes
        if SHM_MIN_BYTES <= n <= SHM_MAX_BYTES and self._shm_ok:
            try:
                region, new = self._region_for(dst, n, deadline)
            except OSError:
                self._shm_ok = False  # no memfd here: the socket carries everything
            else:
                region.payload[:n].copy_(t.reshape(-1).view(torch.uint8))
                region.set_counter(0, region.counter(0) + 1)
                header = _LEN.pack(n | _FLAG_SHM | (_FLAG_FD if new else 0))
                return [_FdHeader(header, region)] if new else [memoryview(header)]
        return [memoryview(_LEN.pack(n)), view]

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
        writing: Dict[int, List[Union[memoryview, _FdHeader]]] = {}
        reading: Dict[int, list] = {}  # src -> [index, header bytearray, target view, filled, received fd]
        start = time.monotonic()
        deadline, spin_until = start + self.timeout, start + self.spin_s
        for peer in {d for _, d in sends} | {s for s, _ in recvs}:
            if peer not in self.socks:
                raise ValueError(f"Rank {self.rank} has no local link to rank {peer}; linked: {self.peers}.")
        for t, dst in sends:
            if dst in writing:
                raise ValueError(f"LocalLinks.exchange: two sends to rank {dst} in one exchange.")
            writing[dst] = self._outgoing(t, dst, deadline)
        for i, (src, buf) in enumerate(recvs):
            if src in reading:
                raise ValueError(f"LocalLinks.exchange: two receives from rank {src} in one exchange.")
            reading[src] = [i, bytearray(), buf, 0, None]
        for peer in set(writing) | set(reading):
            events = (selectors.EVENT_WRITE if peer in writing else 0) | (selectors.EVENT_READ if peer in reading else 0)
            sel.register(self.socks[peer], events, peer)
        try:
            while writing or reading:
                now = time.monotonic()
                left = deadline - now
                # Poll without sleeping at first: the peer is usually a moment away, and a
                # sleep/wake-up can cost a millisecond on a busy machine.
                ready = sel.select(timeout=0 if now < spin_until else max(0.0, left))
                if not ready and now < spin_until:
                    os.sched_yield()
                    continue
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

    def all_reduce(self, t: torch.Tensor, ranks: Sequence[int], op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` (contiguous, CPU) over ``ranks`` in place with ``op`` ("sum", "min" or "max",
        elementwise); every rank of ``ranks`` calls it.

        Reduce-scatter then all-gather, each rank reducing one chunk, so each
        rank sends and receives ``2 (n - 1) / n`` of the tensor. A chunk is
        reduced in the order of ``ranks``, so the result does not depend on
        which rank reduced it (with two ranks a sum equals any other sum of the
        two, addition being commutative).
        """
        ranks = list(ranks)
        n = len(ranks)
        if n == 1 or t.numel() == 0:
            _combiner(op)
            return t
        chunk = self.reduce_scatter(t, ranks, [t.numel() * i // n for i in range(n + 1)], op)
        me = ranks.index(self.rank)
        others = [i for i in range(n) if i != me]
        self.exchange([(chunk[me], ranks[i]) for i in others], [(ranks[i], chunk[i]) for i in others])
        return t

    def reduce_scatter(self, t: torch.Tensor, ranks: Sequence[int], bounds: Sequence[int],
                       op: str = "sum") -> List[torch.Tensor]:
        """Reduce chunk i of ``t`` (elements ``bounds[i]:bounds[i + 1]``) over ``ranks`` into
        rank ``ranks[i]``'s ``t``, in place, with ``op``; the other chunks of each rank's ``t``
        keep their values. Returns the chunks (views of ``t``)."""
        combine = _combiner(op)
        ranks = list(ranks)
        n = len(ranks)
        if len(bounds) != n + 1 or bounds[0] != 0 or bounds[-1] != t.numel():
            raise ValueError(f"reduce_scatter: bounds {list(bounds)} do not split {t.numel()} elements in {n}.")
        me = ranks.index(self.rank)
        flat = t.view(-1)
        chunk = [flat[bounds[i]:bounds[i + 1]] for i in range(n)]
        others = [i for i in range(n) if i != me]
        parts = self.exchange([(chunk[i], ranks[i]) for i in others],
                              [(ranks[i], torch.empty_like(chunk[me])) for i in others])
        incoming = dict(zip(others, parts))
        total = (chunk[me] if me == 0 else incoming[0]).clone()
        for i in range(1, n):
            combine(total, chunk[me] if i == me else incoming[i])
        chunk[me].copy_(total)
        return chunk

    def all_gather(self, parts: Sequence[torch.Tensor], t: torch.Tensor, ranks: Sequence[int]) -> None:
        """``parts[i]`` = rank ``ranks[i]``'s ``t`` on every rank of ``ranks`` (each calls it);
        ``parts`` are contiguous CPU tensors of ``t``'s size, filled in place."""
        ranks = list(ranks)
        if len(parts) != len(ranks):
            raise ValueError(f"all_gather: {len(parts)} output tensors for {len(ranks)} ranks.")
        me = ranks.index(self.rank)
        if parts[me].data_ptr() != t.data_ptr():
            parts[me].copy_(t)
        others = [i for i in range(len(ranks)) if i != me]
        self.exchange([(t, ranks[i]) for i in others], [(ranks[i], parts[i]) for i in others])

    def _write_some(self, peer: int, writing: Dict[int, List[Union[memoryview, _FdHeader]]]) -> None:
        parts = writing[peer]
        sock = self.socks[peer]
        try:
            if isinstance(parts[0], _FdHeader):
                first = parts[0]
                n = socket.send_fds(sock, [first.header], [first.region.fd])
                first.region.release_fd()  # the peer holds it now
                rest = memoryview(first.header)[n:]
                parts[0] = rest
            else:
                n = sock.send(parts[0])
                parts[0] = parts[0][n:]
        except BlockingIOError:
            return
        except OSError as e:
            raise ConnectionError(f"Rank {self.rank}: the link to rank {peer} broke while sending ({e}).") from e
        while parts and not isinstance(parts[0], _FdHeader) and parts[0].nbytes == 0:
            parts.pop(0)
        if not parts:
            del writing[peer]

    def _read_some(self, peer: int, reading: Dict[int, list], out: List[Optional[torch.Tensor]]) -> None:
        state = reading[peer]
        idx, header, target, filled, _ = state
        s = self.socks[peer]
        try:
            if len(header) < _LEN.size:
                chunk, fds, _, _ = socket.recv_fds(s, _LEN.size - len(header), 1)
                if fds:
                    state[4] = fds[0]
                if not chunk:
                    raise ConnectionError(f"Rank {self.rank}: rank {peer} closed its link.")
                header += chunk
                if len(header) < _LEN.size:
                    return
                (word,) = _LEN.unpack(bytes(header))
                size = word & _SIZE_MASK
                buf = state[2]
                if buf is None:
                    buf = torch.empty(size, dtype=torch.uint8)
                elif buf.numel() * buf.element_size() != size:
                    raise ValueError(f"Rank {self.rank}: rank {peer} sent {size} bytes into a buffer of "
                                     f"{buf.numel() * buf.element_size()}.")
                out[idx] = buf
                if word & _FLAG_SHM:
                    self._read_region(peer, word, buf, state[4])
                    del reading[peer]
                    return
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

    def _read_region(self, peer: int, word: int, buf: torch.Tensor, fd: Optional[int]) -> None:
        """Copy a message out of ``peer``'s region (attaching a new region first) and count it read."""
        if word & _FLAG_FD:
            if fd is None:
                raise ConnectionError(f"Rank {self.rank}: rank {peer} announced a shared region without its fd.")
            old = self._rx.pop(peer, None)
            if old is not None:
                old.close()
            self._rx[peer] = _Region.attach(fd)
        elif fd is not None:
            os.close(fd)
        region = self._rx.get(peer)
        if region is None:
            raise ConnectionError(f"Rank {self.rank}: rank {peer} wrote to a shared region never attached.")
        size = word & _SIZE_MASK
        buf.reshape(-1).view(torch.uint8).copy_(region.payload[:size])
        region.set_counter(1, region.counter(0))  # consumed: the writer may reuse the region


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
