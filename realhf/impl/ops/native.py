"""Lazy access to the compiled extensions in ``realhf._C``.

The extensions are optional (``REAL_NO_EXT=1`` builds none, CUDA ones need a
CUDA toolkit), so they are imported on first use and a failed import is
remembered together with its reason, which backend errors then report.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType
from typing import Callable, Dict, Optional

import torch

_import_errors: Dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def load(name: str) -> Optional[ModuleType]:
    """``realhf._C.<name>``, or None when it was not built or fails to load."""
    try:
        return importlib.import_module(f"realhf._C.{name}")
    except ImportError as e:
        _import_errors[name] = str(e) or type(e).__name__
        return None


def import_error(name: str) -> Optional[str]:
    """Why ``load(name)`` returned None (None if it loaded)."""
    if load(name) is not None:
        return None
    return f"extension realhf._C.{name} is unavailable ({_import_errors[name]})"


def cpu_probe(name: str) -> Callable[[], Optional[str]]:
    """Probe for a CPU extension: usable when it imports."""

    def probe() -> Optional[str]:
        return import_error(name)

    return probe


def cuda_probe(name: str) -> Callable[[], Optional[str]]:
    """Probe for a CUDA extension: needs the module and a visible GPU."""

    def probe() -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return import_error(name)

    return probe


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in (
        "1", "true", "yes", "on")


def triton_probe() -> Optional[str]:
    """Triton kernels need the package, and a GPU or TRITON_INTERPRET=1."""
    if ("realhf.impl.ops.triton_kernels" not in sys.modules
            and not _interpret_requested() and not torch.cuda.is_available()):
        # Nothing to serve: skip the (slow) triton import.
        return "triton needs a CUDA device or TRITON_INTERPRET=1"
    try:
        from realhf.impl.ops import triton_kernels
    except ImportError as e:
        return f"triton is unavailable ({e})"
    if not (triton_kernels.INTERPRETED or torch.cuda.is_available()):
        return "triton needs a CUDA device or TRITON_INTERPRET=1"
    return None


def triton_serves(device: torch.device) -> bool:
    """GPU tensors always; CPU tensors only under the Triton interpreter."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    from realhf.impl.ops import triton_kernels

    return triton_kernels.INTERPRETED
