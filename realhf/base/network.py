"""Host address and port discovery for rendezvous endpoints."""

from __future__ import annotations

import os
import random
import socket
import threading
from typing import Iterable, List, Set

HOST_IP_ENV_VAR = "REAL_HOST_IP"
LOOPBACK = "127.0.0.1"
DEFAULT_PORT_LOW = 10000
DEFAULT_PORT_HIGH = 60000

# A bind test releases the port again, so remember what this process handed
# out to avoid giving the same port to two callers in quick succession.
_handed_out: Set[int] = set()
_lock = threading.Lock()
# Independent of the global `random` state: seeded workers must not all
# probe the same ports.
_rng = random.SystemRandom()


def is_port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(
    low: int = DEFAULT_PORT_LOW,
    high: int = DEFAULT_PORT_HIGH,
    exclude: Iterable[int] = (),
    host: str = LOOPBACK,
) -> int:
    """A port in ``[low, high)`` that is bindable on ``host`` right now.

    Random probes come first so concurrent processes rarely race for the
    same port; a linear scan guarantees an answer if one exists.
    """
    if not 0 < low < high <= 65536:
        raise ValueError(f"Invalid port range [{low}, {high}).")
    excluded = set(exclude)
    with _lock:
        excluded |= _handed_out
        candidates = (_rng.randrange(low, high) for _ in range(64))
        for port in _chain_scan(candidates, low, high):
            if port in excluded:
                continue
            if is_port_free(port, host):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"No free port in [{low}, {high}) on {host}.")


def _chain_scan(candidates, low: int, high: int):
    yield from candidates
    start = _rng.randrange(low, high)
    yield from range(start, high)
    yield from range(low, start)


def find_multiple_free_ports(
    n: int,
    low: int = DEFAULT_PORT_LOW,
    high: int = DEFAULT_PORT_HIGH,
    exclude: Iterable[int] = (),
    host: str = LOOPBACK,
) -> List[int]:
    """``n`` distinct free ports."""
    ports: List[int] = []
    excluded = set(exclude)
    for _ in range(n):
        port = find_free_port(low, high, excluded, host)
        excluded.add(port)
        ports.append(port)
    return ports


def gethostname() -> str:
    return socket.gethostname()


MULTI_NODE_ENV_VAR = "REAL_MULTI_NODE"


def multi_node() -> bool:
    """Whether this run spans several nodes (``$REAL_MULTI_NODE``, set by the launcher when n_nodes > 1)."""
    return os.environ.get(MULTI_NODE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


def routable_ip() -> str:
    """An address of this host that other hosts can reach, or the loopback if none is found.

    A UDP socket "connected" to an outside address makes the kernel pick the
    source address of its default route (no packet is sent); the address the
    host name resolves to is the fallback (often 127.0.1.1 on Debian, so loopbacks are skipped).
    """
    for probe in ("10.255.255.255", "192.0.2.1"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((probe, 1))
                ip = s.getsockname()[0]
            if ip and not _is_loopback(ip) and ip != "0.0.0.0":
                return ip
        except OSError:
            continue
    try:
        for ip in socket.gethostbyname_ex(socket.gethostname())[2]:
            if not _is_loopback(ip):
                return ip
    except OSError:
        pass
    return LOOPBACK


def select_host_ip(override: str = "", multi: bool = False, loopback: bool = True) -> str:
    """The address rule: an explicit override wins; a multi-node run (or ``loopback=False``)
    uses the routable address; a single-node run stays on the loopback."""
    if override:
        return override
    if multi or not loopback:
        return routable_ip()
    return LOOPBACK


def gethostip(loopback: bool = True) -> str:
    """IP other processes should use to reach this host (what sockets bind to and publish).

    ``$REAL_HOST_IP`` wins; otherwise the routable address when the run spans
    several nodes (``$REAL_MULTI_NODE=1``) or with ``loopback=False``, else 127.0.0.1.
    """
    return select_host_ip(os.environ.get(HOST_IP_ENV_VAR, ""), multi_node(), loopback)
