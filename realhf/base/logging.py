"""Logger factory shared by every realhf process.

All realhf loggers live under one root logger named ``realhf`` so that a
single file handler (see :func:`setup_file_logging`) captures the output of
every component running in a worker process, while each logger keeps its own
console format.  The root level comes from the ``REAL_LOG_LEVEL`` environment
variable (default ``INFO``).

This module is called ``logging`` inside a package; it only ever imports the
standard library module under the private alias ``_logging``.
"""

from __future__ import annotations

import dataclasses
import logging as _logging
import os
import sys
import threading
from typing import Dict, Optional

ROOT_LOGGER_NAME = "realhf"
LEVEL_ENV_VAR = "REAL_LOG_LEVEL"
COLOR_ENV_VAR = "REAL_LOG_COLOR"
DEFAULT_LEVEL = "INFO"
DATE_FORMAT = "%Y%m%d-%H:%M:%S"

_RESET = "\033[0m"
_LEVEL_COLORS: Dict[int, str] = {
    _logging.DEBUG: "\033[36m",  # cyan
    _logging.INFO: "\033[32m",  # green
    _logging.WARNING: "\033[33m",  # yellow
    _logging.ERROR: "\033[31m",  # red
    _logging.CRITICAL: "\033[1;31m",  # bold red
}
_BENCHMARK_COLOR = "\033[35m"  # magenta


@dataclasses.dataclass(frozen=True)
class LogFormat:
    """How one logger type renders records on the console.

    ``color`` is ``"level"`` to color only the level name, ``"line"`` to color
    the whole line by level, or a raw ANSI sequence applied to the whole line.
    """

    fmt: str
    color: str = "level"


LOG_FORMATS: Dict[str, LogFormat] = {
    "system": LogFormat(
        "%(asctime)s.%(msecs)03d %(shortname)s %(levelname)s: %(message)s"
    ),
    "benchmark": LogFormat(
        "%(asctime)s.%(msecs)03d %(shortname)s BENCHMARK: %(message)s",
        color=_BENCHMARK_COLOR,
    ),
    "colored": LogFormat(
        "%(asctime)s.%(msecs)03d %(shortname)s %(levelname)s: %(message)s",
        color="line",
    ),
    "plain": LogFormat("%(message)s", color=""),
}

FILE_FORMAT = "%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s"

_lock = threading.Lock()
_last_env_level: Optional[str] = None


def _short_name(name: str) -> str:
    prefix = ROOT_LOGGER_NAME + "."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _color_enabled(stream) -> bool:
    forced = os.environ.get(COLOR_ENV_VAR)
    if forced is not None:
        return forced.lower() in ("1", "true", "yes", "on")
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


class _ConsoleFormatter(_logging.Formatter):
    """Adds ``shortname`` to records and colors output for terminals."""

    def __init__(self, log_format: LogFormat):
        super().__init__(log_format.fmt, datefmt=DATE_FORMAT)
        self.log_format = log_format
        self.use_color = False

    def format(self, record: _logging.LogRecord) -> str:
        record.shortname = _short_name(record.name)
        color = self.log_format.color
        if not self.use_color or not color:
            return super().format(record)
        code = _LEVEL_COLORS.get(record.levelno, "")
        if color == "level":
            original = record.levelname
            record.levelname = f"{code}{original}{_RESET}"
            try:
                return super().format(record)
            finally:
                record.levelname = original
        line_code = code if color == "line" else color
        return f"{line_code}{super().format(record)}{_RESET}"


class _StdoutHandler(_logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time.

    Binding the stream lazily keeps logging working when stdout is swapped
    after the handler was created (test capture, worker redirection).
    """

    def __init__(self, log_format: LogFormat):
        super().__init__(sys.stdout)
        self.setFormatter(_ConsoleFormatter(log_format))

    def emit(self, record: _logging.LogRecord) -> None:
        self.stream = sys.stdout
        formatter = self.formatter
        if isinstance(formatter, _ConsoleFormatter):
            formatter.use_color = _color_enabled(self.stream)
        super().emit(record)


def parse_level(level) -> int:
    """Turn ``"debug"``, ``"INFO"``, ``"10"`` or ``10`` into a logging level."""
    if isinstance(level, int):
        return level
    text = str(level).strip()
    if text.isdigit():
        return int(text)
    value = _logging.getLevelName(text.upper())
    if not isinstance(value, int):
        raise ValueError(f"Unknown log level {level!r}.")
    return value


def _root() -> _logging.Logger:
    """The realhf root logger; its level tracks ``REAL_LOG_LEVEL``."""
    global _last_env_level
    root = _logging.getLogger(ROOT_LOGGER_NAME)
    env_level = os.environ.get(LEVEL_ENV_VAR)
    with _lock:
        if env_level != _last_env_level or root.level == _logging.NOTSET:
            root.setLevel(parse_level(env_level or DEFAULT_LEVEL))
            _last_env_level = env_level
        # Records stop at the realhf root so a user's basicConfig on the
        # stdlib root does not print every line twice.
        root.propagate = False
    return root


def set_level(level) -> None:
    """Override the level of every realhf logger in this process."""
    _root().setLevel(parse_level(level))


def getLogger(
    name: Optional[str] = None, type_: str = "system"
) -> _logging.Logger:
    """Return the realhf logger ``name`` with a console handler of ``type_``.

    Names outside the ``realhf.`` namespace are placed under it. A logger
    keeps the console type it was first created with.
    """
    if type_ not in LOG_FORMATS:
        raise ValueError(
            f"Unknown logger type {type_!r}; known types: {sorted(LOG_FORMATS)}."
        )
    root = _root()
    if not name or name == ROOT_LOGGER_NAME:
        return root
    if not name.startswith(ROOT_LOGGER_NAME + "."):
        name = f"{ROOT_LOGGER_NAME}.{name}"
    logger = _logging.getLogger(name)
    with _lock:
        if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
            logger.addHandler(_StdoutHandler(LOG_FORMATS[type_]))
            logger.propagate = True  # file handlers sit on the root
    return logger


def setup_file_logging(log_dir: str, worker_name: str) -> str:
    """Mirror all realhf logs of this process into ``<log_dir>/<worker_name>.log``.

    Calling it again with the same path adds nothing. Returns the file path.
    """
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(log_dir, f"{worker_name}.log"))
    root = _root()
    with _lock:
        for handler in root.handlers:
            if (
                isinstance(handler, _logging.FileHandler)
                and handler.baseFilename == path
            ):
                return path
        handler = _logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(_logging.Formatter(FILE_FORMAT, datefmt=DATE_FORMAT))
        root.addHandler(handler)
    return path


def remove_file_logging(log_dir: Optional[str] = None) -> None:
    """Detach and close file handlers added by :func:`setup_file_logging`.

    With ``log_dir`` only handlers writing inside that directory are removed.
    """
    root = _logging.getLogger(ROOT_LOGGER_NAME)
    prefix = os.path.abspath(log_dir) + os.sep if log_dir else None
    with _lock:
        for handler in list(root.handlers):
            if not isinstance(handler, _logging.FileHandler):
                continue
            if prefix is not None and not handler.baseFilename.startswith(prefix):
                continue
            root.removeHandler(handler)
            handler.close()
