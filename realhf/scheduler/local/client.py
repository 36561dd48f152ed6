"""Local scheduler: one subprocess per worker on this machine.

Each job runs in its own session (process group) so that stopping it also
stops anything it spawned. On Linux a job also gets SIGTERM when the process
that launched it dies, even by SIGKILL, so no worker outlives its launcher. Its stdout and stderr go to
``<log_dir>/<worker_type>-<index>`` (default log dir:
``constants.get_log_path(exp, trial)``). Every job gets ``REAL_WORKER_TYPE``,
``REAL_WORKER_INDEX``, ``REAL_WORKER_COUNT`` and ``REAL_JOB_NAME`` in its
environment, on top of this process's environment and ``env``.

:meth:`LocalSchedulerClient.wait` stops every other job (SIGTERM, then
SIGKILL after ``grace_period_s``) as soon as one job fails or dies from a
signal, and raises :class:`JobException` naming it, with its exit code or
signal and the tail of its log.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shlex
import signal as signal_lib
import subprocess
import time
from typing import Dict, List, Optional

import psutil

from realhf.base import constants, logging, network
from realhf.scheduler.client import (
    Command,
    JobException,
    JobInfo,
    JobState,
    SchedulerClient,
    format_command,
)

logger = logging.getLogger("local_scheduler")

DEFAULT_GRACE_PERIOD_S = 5.0
LOG_TAIL_LINES = 20


_PR_SET_PDEATHSIG = 1


def _terminate_with(launcher_pid: int):
    """A ``preexec_fn`` asking Linux to send SIGTERM to the job when its launcher dies."""

    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal_lib.SIGTERM))
        except (OSError, AttributeError):
            return  # not Linux: the launcher's own signal handling has to do
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal_lib.SIGTERM)

    return preexec


@dataclasses.dataclass
class _LocalJob:
    name: str
    worker_type: str
    index: int
    popen: subprocess.Popen
    log_path: str
    submit_time: float
    cancelled: bool = False
    end_time: Optional[float] = None


def describe_returncode(code: int) -> str:
    if code < 0:
        try:
            sig = signal_lib.Signals(-code).name
        except ValueError:
            sig = "unknown signal"
        return f"killed by signal {sig} ({-code})"
    return f"exited with code {code}"


# What extension modules print while the interpreter shuts down (nanobind's reference-leak report of
# triton's bindings, dozens of lines after every exit of a process that imported triton): it would push
# the worker's own error out of the tail that a failure report shows.
_EXIT_NOISE = re.compile(r"^(nanobind: | - leaked (instance|type|function) | - \.\.\. skipped remainder$"
                         r"|See https://nanobind\.)")


def read_log_tail(path: str, n_lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    """The last ``n_lines`` lines of a job's log, without interpreter-exit noise."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return f"<log {path} unreadable: {e}>"
    lines = [l for l in data.decode("utf-8", errors="replace").splitlines() if not _EXIT_NOISE.match(l)]
    return "\n".join(lines[-n_lines:])


class LocalSchedulerClient(SchedulerClient):
    """Runs every job as a local subprocess; see the module docstring."""

    def __init__(self, expr_name: str, trial_name: str, log_dir: Optional[str] = None,
                 grace_period_s: float = DEFAULT_GRACE_PERIOD_S, poll_interval_s: float = 0.1):
        super().__init__(expr_name, trial_name)
        self.log_dir = log_dir or constants.get_log_path(expr_name, trial_name)
        self.grace_period_s = grace_period_s
        self.poll_interval_s = poll_interval_s
        self.host = network.gethostname()
        self._jobs: Dict[str, _LocalJob] = {}
        self._next_index: Dict[str, int] = {}

    # -- submission ------------------------------------------------------ #
    def log_path(self, worker_type: str, index: int) -> str:
        return os.path.join(self.log_dir, f"{worker_type}-{index}")

    def submit_array(self, worker_type: str, cmd: Command, count: int,
                     env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                     **kwargs) -> List[str]:
        if count < 1:
            raise ValueError(f"count must be positive, got {count}.")
        if kwargs:
            logger.debug(f"Local scheduler ignores resource options {sorted(kwargs)}.")
        os.makedirs(self.log_dir, exist_ok=True)
        offset = self._next_index.get(worker_type, 0)
        submitted = []
        try:
            for j in range(count):
                index = offset + j
                args = format_command(
                    cmd, jobstep_id=index, n_jobsteps=offset + count,
                    worker_submission_index=0, wprocs_per_jobstep=1,
                    wprocs_in_job=offset + count, wproc_offset=offset,
                )
                if isinstance(args, str):
                    args = shlex.split(args)
                name = self.job_name(worker_type, index)
                job_env = dict(os.environ)
                job_env.update(env or {})
                job_env.update(REAL_WORKER_TYPE=worker_type, REAL_WORKER_INDEX=str(index),
                               REAL_WORKER_COUNT=str(offset + count), REAL_JOB_NAME=name)
                path = self.log_path(worker_type, index)
                with open(path, "ab") as log:
                    popen = subprocess.Popen(
                        list(args), env=job_env, cwd=cwd, stdin=subprocess.DEVNULL,
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                        preexec_fn=_terminate_with(os.getpid()),
                    )
                self._jobs[name] = _LocalJob(name, worker_type, index, popen, path, time.time())
                self._next_index[worker_type] = index + 1
                submitted.append(name)
                logger.info(f"Started {name} (pid {popen.pid}), log: {path}")
        except BaseException:
            for name in submitted:
                self.stop(name, signal_lib.SIGKILL)
            raise
        return submitted

    # -- inspection ------------------------------------------------------ #
    def _state(self, job: _LocalJob) -> JobState:
        code = job.popen.poll()
        if code is None:
            return JobState.RUNNING
        if job.end_time is None:
            job.end_time = time.time()
        if job.cancelled:
            return JobState.CANCELLED
        return JobState.COMPLETED if code == 0 else JobState.FAILED

    def _info(self, job: _LocalJob) -> JobInfo:
        state = self._state(job)
        return JobInfo(
            name=job.name, state=state, worker_type=job.worker_type, worker_index=job.index,
            host=self.host, pid=job.popen.pid, submit_time=job.submit_time,
            start_time=job.submit_time, end_time=job.end_time,
            exit_code=job.popen.returncode, log_path=job.log_path,
        )

    def find(self, job_name: str) -> JobInfo:
        job = self._jobs.get(job_name)
        if job is None:
            return JobInfo(name=job_name, state=JobState.NOT_FOUND)
        return self._info(job)

    def find_all(self, job_name_regex: str = ".*") -> List[JobInfo]:
        pattern = re.compile(job_name_regex)
        return [self._info(j) for n, j in self._jobs.items() if pattern.match(n)]

    # -- stopping -------------------------------------------------------- #
    def _signal(self, job: _LocalJob, sig: int) -> None:
        """Send ``sig`` to the job's process group and any escaped descendants."""
        pid = job.popen.pid
        try:
            escaped = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            escaped = []
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in escaped:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def stop(self, job_name: str, signal: int = signal_lib.SIGTERM) -> None:
        job = self._jobs.get(job_name)
        if job is not None:
            self._stop_jobs([job], signal)

    def stop_all(self, signal: int = signal_lib.SIGTERM) -> None:
        self._stop_jobs(list(self._jobs.values()), signal)

    def _stop_jobs(self, jobs: List[_LocalJob], sig: int) -> None:
        alive = [j for j in jobs if j.popen.poll() is None]
        for job in alive:
            job.cancelled = True
            self._signal(job, sig)
        # SIGKILL cannot be ignored; the short wait only lets the kernel reap the process.
        deadline = time.monotonic() + (2.0 if sig == signal_lib.SIGKILL else self.grace_period_s)
        for job in alive:
            try:
                job.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(f"{job.name} ignored signal {sig}; sending SIGKILL.")
                self._signal(job, signal_lib.SIGKILL)
        for job in alive:
            # Leftover members of the group (e.g. a child that ignored SIGTERM).
            self._signal(job, signal_lib.SIGKILL)
            try:
                job.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.error(f"{job.name} (pid {job.popen.pid}) survived SIGKILL.")
            self._state(job)

    # -- waiting --------------------------------------------------------- #
    def _failure(self, info: JobInfo) -> JobException:
        job = self._jobs.get(info.name)
        if info.state == JobState.NOT_FOUND or job is None:
            return JobException(self.run_name, info.name, None, "job not found")
        reason = describe_returncode(job.popen.returncode)
        if info.state == JobState.CANCELLED:
            reason = f"cancelled ({reason})"
        return JobException(
            self.run_name, job.worker_type, self.host, reason, worker_index=job.index,
            exit_code=job.popen.returncode, log_tail=read_log_tail(job.log_path),
        )

    def _job_names(self) -> List[str]:
        return list(self._jobs)

    def _after_failure(self, name: str) -> None:
        if name in self._jobs:  # what the failed job left in its group
            self._signal(self._jobs[name], signal_lib.SIGKILL)

    def __enter__(self) -> "LocalSchedulerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
