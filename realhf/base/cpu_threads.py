"""How many CPU threads the native kernels of the current call may use.

A model worker on a CPU host owns one core (its process runs one torch
thread). Some calls leave the other workers' cores idle: generation on one
worker, say, while the rest wait for its output. Such a call may be given
more threads (``MFCConfig.cpu_threads``); the worker sets them here for the
call's duration and the native kernels that split their work over a thread
team of their own (the decoding steps of ``realhf._C.decode_step``) read them.
torch's own intra-op threads are left as they are: workers are forked, and a
process forked from one that has used OpenMP hangs when it starts an OpenMP
team of its own.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

MAX_THREADS = 256

_state = threading.local()


def current() -> int:
    """Threads the native kernels of the running call may use (1 outside any call)."""
    return getattr(_state, "threads", 1)


def check(value: Optional[int], field: str = "cpu_threads") -> None:
    """Refuse anything but None or an int in [1, MAX_THREADS], naming ``field``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        raise ValueError(f"{field} must be None or an integer in [1, {MAX_THREADS}], got {value!r}.")


@contextlib.contextmanager
def using(threads: Optional[int]) -> Iterator[int]:
    """Within the block, :func:`current` is ``threads`` (None keeps the current value)."""
    check(threads)
    before = current()
    _state.threads = before if threads is None else threads
    try:
        yield _state.threads
    finally:
        _state.threads = before
