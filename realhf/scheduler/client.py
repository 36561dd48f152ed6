"""Scheduler interface: submit worker jobs, watch them, stop them.

A scheduler client belongs to one trial (``run_name = <exp>_<trial>``) and
tracks jobs named ``<run_name>:<worker_type>/<index>``. Use :func:`make` to
get a client for a mode: ``local`` (subprocesses, :mod:`realhf.scheduler.local`),
``slurm`` (sbatch jobs, :mod:`realhf.scheduler.slurm`), ``ray`` (actors on an
existing Ray cluster, :mod:`realhf.scheduler.ray`).

Commands may contain the placeholders ``{jobstep_id}``, ``{n_jobsteps}``,
``{worker_submission_index}``, ``{wprocs_per_jobstep}``, ``{wprocs_in_job}``
and ``{wproc_offset}``; they are replaced per job (other braces are kept).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import signal as signal_lib
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from realhf.base import logging

Command = Union[str, Sequence[str]]
_logger = logging.getLogger("scheduler")


class JobState(enum.Enum):
    NOT_FOUND = 0
    PENDING = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    def active(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING)


@dataclasses.dataclass
class JobInfo:
    name: str
    state: JobState
    worker_type: Optional[str] = None
    worker_index: Optional[int] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    submit_time: Optional[float] = None
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    exit_code: Optional[int] = None
    log_path: Optional[str] = None


class JobException(Exception):
    """A job failed (or was cancelled / lost) while the trial was being watched."""

    def __init__(self, run_name: str, worker_type: str, host: Optional[str], reason: str,
                 worker_index: Optional[int] = None, exit_code: Optional[int] = None,
                 log_tail: Optional[str] = None):
        self.run_name = run_name
        self.worker_type = worker_type
        self.worker_index = worker_index
        self.host = host
        self.reason = reason
        self.exit_code = exit_code
        self.log_tail = log_tail
        worker = worker_type if worker_index is None else f"{worker_type}-{worker_index}"
        msg = f"Job {run_name}:{worker} failed on host {host or '?'}: {reason}"
        if log_tail:
            msg += f"\n--- last lines of its log ---\n{log_tail}"
        super().__init__(msg)


class SchedulerError(RuntimeError):
    pass


class SchedulerUnavailableError(SchedulerError, NotImplementedError):
    """The requested scheduler mode is not available in this installation."""


_PLACEHOLDERS = ("jobstep_id", "n_jobsteps", "worker_submission_index",
                 "wprocs_per_jobstep", "wprocs_in_job", "wproc_offset")


def format_command(cmd: Command, **values) -> Command:
    """Replace known ``{placeholder}``s in a command string or argument list."""

    def fill(s: str) -> str:
        for k in _PLACEHOLDERS:
            if k in values:
                s = s.replace("{" + k + "}", str(values[k]))
        return s

    return fill(cmd) if isinstance(cmd, str) else [fill(a) for a in cmd]


class SchedulerClient(abc.ABC):
    """Submits and watches the jobs of one trial."""

    def __init__(self, expr_name: str, trial_name: str):
        self.expr_name = expr_name
        self.trial_name = trial_name
        self.run_name = f"{expr_name}_{trial_name}"

    def job_name(self, worker_type: str, index: int) -> str:
        return f"{self.run_name}:{worker_type}/{index}"

    def submit(self, worker_type: str, cmd: Command, count: int = 1,
               env: Optional[Dict[str, str]] = None, **kwargs) -> List[str]:
        """Submit ``count`` jobs of ``worker_type``; returns their job names."""
        return self.submit_array(worker_type, cmd, count, env=env, **kwargs)

    @abc.abstractmethod
    def submit_array(self, worker_type: str, cmd: Command, count: int,
                     env: Optional[Dict[str, str]] = None, **kwargs) -> List[str]:
        """Submit ``count`` jobs (indices continue after earlier submissions)."""

    @abc.abstractmethod
    def stop(self, job_name: str, signal: int = signal_lib.SIGTERM) -> None:
        """Stop one job."""

    @abc.abstractmethod
    def stop_all(self, signal: int = signal_lib.SIGTERM) -> None:
        """Stop every job of this client; must not return before they are gone."""

    @abc.abstractmethod
    def find(self, job_name: str) -> JobInfo:
        """Info of one job (state NOT_FOUND if unknown)."""

    @abc.abstractmethod
    def find_all(self, job_name_regex: str = ".*") -> List[JobInfo]:
        """Infos of every job whose name matches ``job_name_regex``."""

    poll_interval_s: float = 0.1

    def wait(self, timeout: Optional[float] = None,
             check_status: Iterable[JobState] = (JobState.CANCELLED, JobState.FAILED,
                                                 JobState.NOT_FOUND),
             remove_status: Iterable[JobState] = (JobState.COMPLETED,),
             update: bool = False, job_names: Optional[Iterable[str]] = None) -> List[JobInfo]:
        """Block until every job (or every one of ``job_names``) reached a ``remove_status`` state.

        A job entering a ``check_status`` state stops all jobs and raises
        :class:`JobException`. Raises TimeoutError after ``timeout`` seconds
        (jobs keep running). Returns the final infos of the removed jobs.
        Schedulers differ only in how they learn the jobs' states
        (:meth:`_poll_jobs`) and describe a failure (:meth:`_failure`).
        """
        check, remove = set(check_status), set(remove_status)
        left = self._job_names() if job_names is None else list(job_names)
        done: List[JobInfo] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while left:
            infos = self._poll_jobs(left)
            for name in list(left):
                info = infos.get(name) or JobInfo(name=name, state=JobState.NOT_FOUND)
                if info.state in check:
                    exc = self._failure(info)
                    _logger.error(f"{exc}\nStopping all jobs of {self.run_name}.")
                    self.stop_all()
                    self._after_failure(name)
                    raise exc
                if info.state in remove:
                    left.remove(name)
                    done.append(info)
            if not left:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Timed out after {timeout}s waiting for jobs of "
                                   f"{self.run_name}; still pending: {left}.")
            time.sleep(self.poll_interval_s if deadline is None
                       else max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
        return done

    @abc.abstractmethod
    def _job_names(self) -> List[str]:
        """Names of every job this client submitted."""

    def _poll_jobs(self, names: List[str]) -> Dict[str, JobInfo]:
        """Current infos of ``names`` (one query where the scheduler allows it)."""
        return {n: self.find(n) for n in names}

    @abc.abstractmethod
    def _failure(self, info: JobInfo) -> JobException:
        """The exception that reports a failed job: worker, host, cause, log tail."""

    def _after_failure(self, name: str) -> None:
        """Clean-up after :meth:`stop_all` when ``name`` failed (e.g. processes it left)."""


# ---------------------------------------------------------------------- #
# Registry.
# ---------------------------------------------------------------------- #
SchedulerFactory = Callable[..., SchedulerClient]
_SCHEDULERS: Dict[str, SchedulerFactory] = {}


def register_scheduler(mode: str, factory: SchedulerFactory) -> None:
    _SCHEDULERS[mode] = factory


def registered_modes() -> List[str]:
    return sorted(_SCHEDULERS)


def make(mode: str, expr_name: str, trial_name: str, **kwargs) -> SchedulerClient:
    """Scheduler client for ``mode`` (``local``, ``slurm``, ``ray``)."""
    if mode not in _SCHEDULERS:
        raise ValueError(f"Unknown scheduler mode {mode!r}; known: {registered_modes()}.")
    return _SCHEDULERS[mode](expr_name, trial_name, **kwargs)


def _make_local(expr_name: str, trial_name: str, **kwargs) -> SchedulerClient:
    from realhf.scheduler.local.client import LocalSchedulerClient

    return LocalSchedulerClient(expr_name, trial_name, **kwargs)


def _make_slurm(expr_name: str, trial_name: str, **kwargs) -> SchedulerClient:
    from realhf.scheduler.slurm.client import SlurmSchedulerClient

    return SlurmSchedulerClient(expr_name, trial_name, **kwargs)


def _make_ray(expr_name: str, trial_name: str, **kwargs) -> SchedulerClient:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SchedulerUnavailableError("Scheduler mode 'ray' needs the 'ray' package "
                                        "(pip install -e '.[ray]'); or use mode='local'.")
    from realhf.scheduler.ray.client import RaySchedulerClient

    return RaySchedulerClient(expr_name, trial_name, **kwargs)


register_scheduler("local", _make_local)
register_scheduler("slurm", _make_slurm)
register_scheduler("ray", _make_ray)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
