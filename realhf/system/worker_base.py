"""Generic worker: a poll loop with status, heartbeat and control commands.

A concrete worker subclasses :class:`Worker` and implements ``_configure``
and ``_poll``. The process entry point (:mod:`realhf.apps.remote`) creates
the worker from the registry below, configures it and calls :meth:`Worker.run`.

Status is published in name_resolve under ``names.worker_status(exp, trial,
worker_name)`` as JSON ``{"status", "heartbeat", "pid", "host", "error"}``;
a background thread refreshes the heartbeat, so a status whose heartbeat is
older than a threshold reads as ``LOST`` (see
:func:`realhf.system.worker_control.get_worker_status`). Commands
(``pause``/``start``/``exit``) are read from name_resolve between polls.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import threading
import time
import traceback
from typing import Any, Dict, Optional, Type, Union

from realhf.base import logging, name_resolve, names, network

logger = logging.getLogger("worker")

HEARTBEAT_INTERVAL_S = 2.0
# Seconds between two reads of the control command key.
COMMAND_CHECK_INTERVAL_S = 0.2
# Characters of the traceback kept in the published ERROR status.
_STATUS_TRACEBACK_CHARS = 2000


class WorkerServerStatus(str, enum.Enum):
    READY = "READY"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    UNKNOWN = "UNKNOWN"
    INTERRUPTED = "INTERRUPTED"
    ERROR = "ERROR"
    LOST = "LOST"


@dataclasses.dataclass
class PollResult:
    """What one ``_poll`` call did; all-zero means it was idle."""

    sample_count: int = 0
    batch_count: int = 0


def worker_name(worker_type: str, worker_index: int) -> str:
    return f"{worker_type}/{worker_index}"


def command_key(experiment: str, trial: str, name: str) -> str:
    return names.worker_key(experiment, trial, f"command/{name}")


def short_traceback(exc: BaseException, limit: int = _STATUS_TRACEBACK_CHARS) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text if len(text) <= limit else "...\n" + text[-limit:]


class WorkerExit(Exception):
    """Raise from ``_poll`` to stop the loop cleanly (status COMPLETED)."""


class FatalError(Exception):
    """A failure whose message is the whole explanation (a traceback would not help the user).

    The worker logs it as one line and publishes it with ``"fatal": true`` in its
    status, where the launcher finds it and reports it instead of a log tail.
    """


class Worker:
    """Base class of all workers.

    Subclasses implement :meth:`_configure` (build state from a config) and
    :meth:`_poll` (do one unit of work); optionally :meth:`_exit_hook`.
    """

    def __init__(self, experiment_name: str, trial_name: str, worker_type: str,
                 worker_index: int = 0, name: Optional[str] = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S):
        self.experiment_name = experiment_name
        self.trial_name = trial_name
        self.worker_type = worker_type
        self.worker_index = worker_index
        self.name = name or worker_name(worker_type, worker_index)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.config: Any = None
        self.status: Optional[WorkerServerStatus] = None
        self.error: Optional[str] = None
        self.fatal = False
        self.poll_count = 0
        self.sample_count = 0
        self.batch_count = 0
        self._exiting = False
        self._paused = False
        self._last_command_check = 0.0
        self._status_lock = threading.Lock()
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread: Optional[threading.Thread] = None
        self.logger = logging.getLogger(f"{worker_type}-{worker_index}")

    # -- subclass hooks -------------------------------------------------- #
    def _configure(self, config: Any) -> None:
        """Build the worker from ``config``; the default only stores it."""

    def _poll(self) -> PollResult:
        raise NotImplementedError()

    def _exit_hook(self, status: WorkerServerStatus) -> None:
        """Called once when the loop ends (COMPLETED or ERROR)."""

    # -- status ---------------------------------------------------------- #
    @property
    def status_key(self) -> str:
        return names.worker_status(self.experiment_name, self.trial_name, self.name)

    def _publish(self) -> None:
        with self._status_lock:
            if self.status is None:
                return
            value = json.dumps({
                "status": self.status.value, "heartbeat": time.time(), "pid": os.getpid(),
                "host": network.gethostname(), "error": self.error, "fatal": self.fatal,
            })
            # Kept after exit so the controller can read COMPLETED / ERROR.
            name_resolve.add(self.status_key, value, replace=True, delete_on_exit=False)

    def set_status(self, status: WorkerServerStatus, error: Optional[str] = None, fatal: bool = False) -> None:
        with self._status_lock:
            self.status = WorkerServerStatus(status)
            self.error = error
            self.fatal = fatal
        self._publish()

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.heartbeat_interval_s):
            try:
                self._publish()
            except Exception as e:  # never kill the worker for a missed heartbeat
                self.logger.warning(f"Heartbeat failed: {e!r}")

    def _start_heartbeat(self) -> None:
        if self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name=f"heartbeat-{self.name}", daemon=True)
            self._heartbeat_thread.start()

    def _stop_heartbeat_thread(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)
            self._heartbeat_thread = None

    # -- control --------------------------------------------------------- #
    def load_config(self, timeout: Optional[float] = None) -> Any:
        """Config published for this worker by the controller (see worker_control)."""
        from realhf.system.worker_control import load_worker_config

        return load_worker_config(self.experiment_name, self.trial_name, self.name, timeout)

    def configure(self, config: Any) -> None:
        self.config = config
        self._configure(config)
        self.set_status(WorkerServerStatus.READY)

    def start(self) -> None:
        self._paused = False
        self.set_status(WorkerServerStatus.RUNNING)

    def pause(self) -> None:
        self._paused = True
        self.set_status(WorkerServerStatus.PAUSED)

    def exit(self) -> None:
        """Ask the loop to stop after the current poll."""
        self._exiting = True

    def _check_command(self) -> None:
        now = time.monotonic()
        if now - self._last_command_check < COMMAND_CHECK_INTERVAL_S:
            return
        self._last_command_check = now
        key = command_key(self.experiment_name, self.trial_name, self.name)
        try:
            cmd = name_resolve.get(key)
        except name_resolve.NameEntryNotFoundError:
            return
        try:
            name_resolve.delete(key)
        except name_resolve.NameEntryNotFoundError:
            pass
        self.logger.info(f"Received command {cmd!r}.")
        if cmd == "exit":
            self.exit()
        elif cmd == "pause":
            self.pause()
        elif cmd == "start":
            self.start()
        else:
            self.logger.warning(f"Ignoring unknown command {cmd!r}.")

    # -- main loop ------------------------------------------------------- #
    def run(self, max_polls: Optional[int] = None, idle_sleep_s: float = 0.005) -> int:
        """Poll until :meth:`exit`, :class:`WorkerExit` or ``max_polls``; return the exit code.

        An exception in ``_poll`` publishes ERROR with a short traceback,
        logs it and returns 1.
        """
        if self.status is None:
            self.set_status(WorkerServerStatus.READY)
        if self.status != WorkerServerStatus.PAUSED:
            self.start()
        self._start_heartbeat()
        try:
            while not self._exiting and (max_polls is None or self.poll_count < max_polls):
                self._check_command()
                if self._exiting:
                    break
                if self._paused:
                    time.sleep(0.05)
                    continue
                try:
                    r = self._poll()
                except WorkerExit:
                    break
                self.poll_count += 1
                if r is not None:
                    self.sample_count += r.sample_count
                    self.batch_count += r.batch_count
                    if r.sample_count == 0 and r.batch_count == 0 and idle_sleep_s > 0:
                        time.sleep(idle_sleep_s)
        except FatalError as e:
            self.logger.error(f"{self.name}: {e}")
            self._stop_heartbeat_thread()
            self.set_status(WorkerServerStatus.ERROR, error=str(e), fatal=True)
            self._safe_exit_hook(WorkerServerStatus.ERROR)
            return 1
        except Exception as e:
            tb = short_traceback(e)
            self.logger.error(f"Worker {self.name} failed:\n{tb}")
            self._stop_heartbeat_thread()
            self.set_status(WorkerServerStatus.ERROR, error=tb)
            self._safe_exit_hook(WorkerServerStatus.ERROR)
            return 1
        self._stop_heartbeat_thread()
        self.set_status(WorkerServerStatus.COMPLETED)
        self._safe_exit_hook(WorkerServerStatus.COMPLETED)
        return 0

    def _safe_exit_hook(self, status: WorkerServerStatus) -> None:
        try:
            self._exit_hook(status)
        except Exception as e:
            self.logger.error(f"Exit hook of {self.name} failed: {e!r}")


# ---------------------------------------------------------------------- #
# Registry of worker types.
# ---------------------------------------------------------------------- #
_WORKERS: Dict[str, Union[Type[Worker], str]] = {}


def register_worker(worker_type: str, cls: Union[Type[Worker], str], replace: bool = False) -> None:
    """Register a worker class, or a lazy ``"module:ClassName"`` path."""
    if worker_type in _WORKERS and not replace and _WORKERS[worker_type] is not cls:
        raise ValueError(f"Worker type {worker_type!r} is already registered.")
    _WORKERS[worker_type] = cls


def registered_workers() -> Dict[str, Union[Type[Worker], str]]:
    return dict(_WORKERS)


def get_worker_class(worker_type: str) -> Type[Worker]:
    """Resolve a worker type; unknown types try importing ``realhf.system.<type>``."""
    if worker_type not in _WORKERS:
        try:
            importlib.import_module(f"realhf.system.{worker_type}")
        except ModuleNotFoundError as e:
            if e.name != f"realhf.system.{worker_type}":
                raise
    if worker_type not in _WORKERS:
        raise KeyError(f"Unknown worker type {worker_type!r}; registered: {sorted(_WORKERS)}.")
    cls = _WORKERS[worker_type]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _WORKERS[worker_type] = cls
    return cls


def make_worker(worker_type: str, experiment_name: str, trial_name: str,
                worker_index: int = 0, **kwargs) -> Worker:
    cls = get_worker_class(worker_type)
    return cls(experiment_name, trial_name, worker_type, worker_index, **kwargs)


# ---------------------------------------------------------------------- #
# A tiny worker for tests and smoke checks.
# ---------------------------------------------------------------------- #
class EchoWorker(Worker):
    """Test worker. Config keys (all optional):

    * ``duration`` (s): exit 0 after this long (default: run until told to exit);
    * ``exit_code``: with ``duration``, exit with this code instead;
    * ``stream`` (bool): serve a :class:`WorkerStream`; handles ``echo``
      (reply the data), ``raise`` (raise ValueError(data)), ``sleep`` (sleep
      data seconds, reply it), ``exit`` (reply, then exit).
    """

    def _configure(self, config: Any) -> None:
        config = dict(config or {})
        self._duration = config.get("duration")
        self._exit_code = int(config.get("exit_code", 0))
        self._start_time = time.monotonic()
        self._stream = None
        if config.get("stream"):
            from realhf.system.request_reply_stream import WorkerStream

            self._stream = WorkerStream(self.experiment_name, self.trial_name, self.name)
        print(f"echo worker {self.name} configured (pid {os.getpid()})", flush=True)

    def _poll(self) -> PollResult:
        if self._duration is not None and time.monotonic() - self._start_time >= self._duration:
            if self._exit_code != 0:
                print(f"echo worker {self.name} exiting with {self._exit_code}", flush=True)
                os._exit(self._exit_code)
            raise WorkerExit()
        if self._stream is None:
            time.sleep(0.02)
            return PollResult()
        req = self._stream.poll(block=True, timeout=0.05)
        if req is None:
            return PollResult()
        try:
            if req.handle_name == "raise":
                raise ValueError(req.data)
            if req.handle_name == "sleep":
                time.sleep(float(req.data))
            self._stream.reply(req, req.data)
        except Exception as e:
            self._stream.reply(req, exception=e)
        if req.handle_name == "exit":
            self.exit()
        return PollResult(sample_count=1, batch_count=1)

    def _exit_hook(self, status: WorkerServerStatus) -> None:
        if self._stream is not None:
            self._stream.close()


register_worker("echo", EchoWorker)
