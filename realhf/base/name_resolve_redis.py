"""Name resolution through a Redis server, for runs whose nodes share no file system.

Select it with ``REAL_NAME_RESOLVE=redis`` (or the quickstart option
``name_resolve=redis``) and point it at the server with ``REAL_REDIS_URL``
(or ``name_resolve_address``), e.g. ``redis://head-node:6379/0``. Every key
``a/b`` is stored as the Redis string ``<namespace>/a/b``; creation without
``replace`` is ``SET NX``, so exactly one of several concurrent writers wins,
as with the other backends. Subtrees are found with ``SCAN``.

``keepalive_ttl`` (``REAL_REDIS_KEEPALIVE_TTL`` seconds, off by default)
gives the ``delete_on_exit`` entries of a process a TTL that a background
thread keeps renewing: a process killed before it could clean up (SIGKILL,
a lost node) then loses its entries after the TTL instead of leaving stale
addresses behind.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Optional

from realhf.base.name_resolve import NameEntryExistsError, NameEntryNotFoundError, NameRecordRepository

REDIS_URL_ENV_VAR = "REAL_REDIS_URL"
KEEPALIVE_ENV_VAR = "REAL_REDIS_KEEPALIVE_TTL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "realhf-name-resolve"


def _glob_escape(s: str) -> str:
    """Escape the characters SCAN's MATCH pattern treats specially."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)


class RedisNameRecordRepository(NameRecordRepository):
    """Entries in a Redis server shared by every process and node of the run."""

    def __init__(self, url: Optional[str] = None, namespace: str = DEFAULT_NAMESPACE,
                 keepalive_ttl: Optional[float] = None, client=None):
        super().__init__()
        self.url = url or os.environ.get(REDIS_URL_ENV_VAR) or DEFAULT_URL
        self.namespace = namespace.strip("/")
        if keepalive_ttl is None and os.environ.get(KEEPALIVE_ENV_VAR):
            keepalive_ttl = float(os.environ[KEEPALIVE_ENV_VAR])
        self.keepalive_ttl = keepalive_ttl
        if client is None:
            try:
                import redis
            except ImportError:
                raise ImportError("The redis name-resolve backend needs the redis package: "
                                  "pip install 'realhf[redis]'.") from None
            client = redis.Redis.from_url(self.url, decode_responses=True)
        self._client = client
        self._keeper: Optional[threading.Thread] = None
        self._keeper_pid: Optional[int] = None
        self._stop = threading.Event()

    # -- storage primitives -------------------------------------------- #
    def _rkey(self, key: str) -> str:
        return f"{self.namespace}/{key}"

    def _write(self, key, value, replace):
        px = None if self.keepalive_ttl is None else int(self.keepalive_ttl * 1000)
        ok = self._client.set(self._rkey(key), value, nx=not replace, px=px)
        if not ok:
            raise NameEntryExistsError(key)

    def add(self, name: str, value, delete_on_exit: bool = True, replace: bool = False) -> None:
        """As the base class; only ``delete_on_exit`` entries get the keepalive TTL."""
        if self.keepalive_ttl is None or delete_on_exit:
            super().add(name, value, delete_on_exit=delete_on_exit, replace=replace)
            if self.keepalive_ttl is not None:
                self._ensure_keeper()
            return
        ttl, self.keepalive_ttl = self.keepalive_ttl, None  # a permanent entry: no TTL
        try:
            super().add(name, value, delete_on_exit=False, replace=replace)
        finally:
            self.keepalive_ttl = ttl

    def _read(self, key):
        value = self._client.get(self._rkey(key))
        if value is None:
            raise NameEntryNotFoundError(key)
        return value

    def _remove(self, key):
        if not self._client.delete(self._rkey(key)):
            raise NameEntryNotFoundError(key)

    def _keys_under(self, root):
        base = self._rkey(root)
        keys = [root] if self._client.exists(base) else []
        prefix_len = len(self.namespace) + 1
        for k in self._client.scan_iter(match=_glob_escape(base) + "/*", count=1000):
            keys.append(k[prefix_len:])
        return keys

    # -- keepalive ------------------------------------------------------ #
    def _ensure_keeper(self) -> None:
        """Start the TTL-renewing thread in this process (a forked child needs its own)."""
        if self._keeper_pid == os.getpid() and self._keeper is not None and self._keeper.is_alive():
            return
        self._keeper_pid = os.getpid()
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._renew_loop, name="name-resolve-keepalive", daemon=True)
        self._keeper.start()

    def _renew_loop(self) -> None:
        ttl_ms = int(self.keepalive_ttl * 1000)
        while not self._stop.wait(self.keepalive_ttl / 3):
            pid = os.getpid()
            with self._owned_lock:
                mine = [k for k, p in self._owned if p == pid]
            if not mine:
                continue
            try:
                pipe = self._client.pipeline(transaction=False)
                for key in mine:
                    pipe.pexpire(self._rkey(key), ttl_ms)
                pipe.execute()
            except Exception:  # the server is briefly unreachable: try again next round
                continue

    def reset(self) -> None:
        self._stop.set()
        super().reset()

    def destroy(self) -> None:
        """Delete every key of this namespace, including other processes' entries."""
        for k in self._client.scan_iter(match=_glob_escape(self.namespace) + "/*", count=1000):
            self._client.delete(k)

    def ping(self) -> bool:
        return bool(self._client.ping())


def redis_backend(**kwargs) -> RedisNameRecordRepository:
    """Factory registered as the ``redis`` backend of :mod:`realhf.base.name_resolve`."""
    return RedisNameRecordRepository(**kwargs)
