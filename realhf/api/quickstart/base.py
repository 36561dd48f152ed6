"""Errors and small checks shared by the quickstart config dataclasses.

Every check names the dotted key of the offending field (as it would be typed
on the command line, e.g. ``model.optimizer.lr``), the bad value and what is
allowed, so a user can fix the command without reading code.
"""

import functools
import math
import os
from typing import Any, Iterable, Optional


class ConfigError(ValueError):
    """An invalid experiment configuration; the message says which key and why."""


def join_key(prefix: str, name: str) -> str:
    """``join_key("model", "lr") -> "model.lr"``; an empty prefix gives ``name``."""
    return f"{prefix}.{name}" if prefix else name


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {choices}.")


def check_range(
    key: str,
    value: Any,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Require ``lo <= value <= hi`` (strict where ``*_open``); None bounds are not checked."""
    bad = value is None or isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad and isinstance(value, float) and math.isnan(value):
        bad = True
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value >= hi if hi_open else value > hi
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ConfigError(f"{key}={value!r} is out of range; it must be in {left}{lo_s}, {hi_s}{right}.")


def check_positive_int(key: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or null" if allow_none else "")
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {allowed}.")


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether this machine has a usable CUDA device (imports torch lazily).

    ``REAL_FORCE_CPU=1`` makes the answer False, as if no GPU were present.
    """
    if os.environ.get("REAL_FORCE_CPU", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def check_finite_floats(value: Any, prefix: str = "") -> None:
    """Refuse inf/nan anywhere in a parsed config (nested dicts, lists and dataclasses).

    Every float of an experiment config is a rate, a coefficient or a bound
    that must be a real number; the message names the dotted key.
    """
    import dataclasses

    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{prefix or 'value'}={value!r} is not a finite number; "
                              "every float option must be finite (no inf or nan).")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite_floats(v, join_key(prefix, str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite_floats(v, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_finite_floats(getattr(value, f.name), join_key(prefix, f.name))
