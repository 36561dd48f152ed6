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


def gethostip(loopback: bool = True) -> str:
    """IP other processes should use to reach this host.

    ``$REAL_HOST_IP`` wins; otherwise the loopback address, or with
    ``loopback=False`` the address the host name resolves to.
    """
    override = os.environ.get(HOST_IP_ENV_VAR)
    if override:
        return override
    if loopback:
        return LOOPBACK
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return LOOPBACK
