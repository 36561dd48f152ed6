"""Keep a worker's freed host memory for reuse instead of returning it to the kernel.

glibc serves allocations above a threshold (128 KB, raised on the fly up to
32 MB) with ``mmap`` and gives them back with ``munmap`` when freed, and trims
the top of its heap past 128 KB. A training step allocates and frees the same
activation-sized CPU tensors (MBs each) again and again, so every step pays
fresh page faults for them: ~5k minor faults and ~8% of a PPO actor's step at
the benchmark shape, ~10% of an inference forward. Raising both thresholds
makes freed blocks stay in the heap and be reused without faults, the same
trade as PyTorch's caching allocators (memory is held at its peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; False where they do not apply (another
    libc, or ``REAL_MALLOC_TUNING=0``)."""
    global _done
    if _done:
        return True
    if os.environ.get("REAL_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
