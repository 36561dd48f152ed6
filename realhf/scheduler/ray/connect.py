"""Finding and joining the Ray cluster a run uses.

``mode=ray`` never starts a cluster of its own: a run joins the one at
``ray_address`` (experiment config) or ``$RAY_ADDRESS``, so a stray launcher
cannot silently run everything in a private single-node cluster. Addresses
are ``host:port`` of the cluster's GCS (what ``ray start --head`` prints),
``ray://host:port`` (Ray Client) or ``auto`` (the cluster this node belongs to).
A ``host:port`` that does not accept connections fails within seconds, naming
the option, before any worker starts.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Optional, Tuple

from realhf.scheduler.client import SchedulerError

RAY_ADDRESS_ENV = "RAY_ADDRESS"
NAMESPACE = "realhf"
_HOST_PORT = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


class RayConnectError(SchedulerError):
    """No usable Ray cluster at the configured address."""


def resolve_address(address: Optional[str]) -> Tuple[str, str]:
    """(address, where it came from); ``ray_address`` wins over ``$RAY_ADDRESS``."""
    if address:
        return address.strip(), "ray_address"
    env = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if env:
        return env, f"${RAY_ADDRESS_ENV}"
    raise RayConnectError(
        "mode='ray' needs the address of a running Ray cluster: pass ray_address=<host>:<port> "
        f"(printed by `ray start --head`) or set {RAY_ADDRESS_ENV}; or use mode=local.")


def address_problem(address: str) -> Optional[str]:
    """Why ``address`` is malformed, or None."""
    if address == "auto":
        return None
    m = _HOST_PORT.match(address)
    if m is None:
        return "expected <host>:<port>, ray://<host>:<port> or auto"
    if not 0 < int(m.group(3)) < 65536:
        return f"port {m.group(3)} is out of range"
    return None


def check_reachable(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Raise RayConnectError naming ``source`` if ``address`` is malformed or refuses connections."""
    problem = address_problem(address)
    if problem is not None:
        raise RayConnectError(f"{source}={address!r} is not a Ray address: {problem}.")
    if address == "auto":
        return
    m = _HOST_PORT.match(address)
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayConnectError(
            f"{source}={address!r}: no Ray cluster answers there ({e.strerror or e}); start one with "
            f"`ray start --head` and pass the address it prints, or use mode=local.") from None


def connect(address: Optional[str]) -> bool:
    """Join the cluster (unless this process already did); returns whether this call connected."""
    import ray

    if ray.is_initialized():
        return False
    addr, source = resolve_address(address)
    check_reachable(addr, source)
    try:
        ray.init(address=addr, namespace=NAMESPACE, log_to_driver=False)
    except Exception as e:
        raise RayConnectError(f"{source}={addr!r}: joining the Ray cluster failed: {e}") from None
    return True
