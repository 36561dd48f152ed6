"""Slurm scheduler: one sbatch job per worker group, watched with squeue/sacct.

:meth:`SlurmSchedulerClient.submit_array` writes the group's scripts (see
:mod:`realhf.scheduler.slurm.scripts`) under ``<log_dir>/slurm/`` and submits
them with ``sbatch --parsable``. A worker's state comes first from its exit
code file (written by its task script on the shared file system), then from
the state of its job (``squeue --states=all``, which also lists jobs that ended
less than ``MinJobAge`` ago; ``sacct`` only for jobs the controller forgot,
and never again once it reports that accounting storage is disabled):
so a crashed worker is reported by group and index, and a job that Slurm
ended (timeout, node failure, scancel) is reported for every worker that had
not finished. A worker that exited 0 counts as completed once its job left the
queue too (or ``grace_period_s`` after it exited), so a finished run leaves no
job behind. :meth:`stop_all` runs ``scancel`` and waits until the queue no
longer lists the jobs.

The commands (``sbatch``, ``squeue``, ``sacct``, ``scancel``) are looked up
on ``PATH`` when called, so a test can put fakes first on ``PATH``; their
names can also be replaced through ``commands=``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal as signal_lib
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from realhf.base import constants, logging
from realhf.scheduler.client import (
    Command,
    JobException,
    JobInfo,
    JobState,
    SchedulerClient,
    SchedulerError,
    SchedulerUnavailableError,
    format_command,
)
from realhf.scheduler.local.client import read_log_tail
from realhf.scheduler.slurm import scripts
from realhf.scheduler.slurm.spec import SlurmClusterSpec

logger = logging.getLogger("slurm_scheduler")

DEFAULT_COMMANDS = {"sbatch": "sbatch", "squeue": "squeue", "sacct": "sacct", "scancel": "scancel"}

_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED"}


def slurm_state(name: str) -> JobState:
    """JobState of a Slurm state name (``CANCELLED by 0`` counts as CANCELLED)."""
    name = name.strip().split()[0].rstrip("+").upper() if name.strip() else ""
    if name in _PENDING:
        return JobState.PENDING
    if name in _RUNNING:
        return JobState.RUNNING
    if name == "COMPLETED":
        return JobState.COMPLETED
    if name.startswith("CANCELLED"):
        return JobState.CANCELLED
    if not name:
        return JobState.NOT_FOUND
    return JobState.FAILED  # FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, BOOT_FAIL, PREEMPTED, DEADLINE


@dataclasses.dataclass
class _Group:
    """One submitted job: ``count`` workers of ``worker_type`` from index ``offset``."""

    job_id: str
    worker_type: str
    offset: int
    count: int
    submit_time: float
    state: JobState = JobState.PENDING
    slurm_state: str = "PENDING"
    cancelled: bool = False


class SlurmSchedulerClient(SchedulerClient):
    """Submits worker groups to Slurm; see the module docstring."""

    def __init__(self, expr_name: str, trial_name: str, spec: Optional[SlurmClusterSpec] = None,
                 log_dir: Optional[str] = None, commands: Optional[Dict[str, str]] = None,
                 poll_interval_s: Optional[float] = None, grace_period_s: float = 30.0):
        super().__init__(expr_name, trial_name)
        self.spec = spec or SlurmClusterSpec()
        self.spec.validate()
        self.log_dir = log_dir or constants.get_log_path(expr_name, trial_name)
        self.state_dir = os.path.join(self.log_dir, "slurm")
        self.commands = dict(DEFAULT_COMMANDS, **(commands or {}))
        self.poll_interval_s = self.spec.poll_interval_s if poll_interval_s is None else poll_interval_s
        self.grace_period_s = grace_period_s
        self._groups: List[_Group] = []
        self._next_index: Dict[str, int] = {}
        self._last_poll = 0.0
        self._use_sacct = True

    # -- commands ------------------------------------------------------- #
    def _exe(self, name: str) -> str:
        exe = shutil.which(self.commands[name])
        if exe is None:
            raise SchedulerUnavailableError(
                f"mode='slurm' needs '{self.commands[name]}' on PATH; is this a Slurm login node?")
        return exe

    def _call(self, name: str, args: List[str], check: bool = True, timeout: float = 60.0) \
            -> subprocess.CompletedProcess:
        res = subprocess.run([self._exe(name)] + args, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise SchedulerError(f"{self.commands[name]} {' '.join(args)} failed ({res.returncode}): "
                                 f"{(res.stderr or res.stdout).strip()}")
        return res

    # -- submission ----------------------------------------------------- #
    def submit_array(self, worker_type: str, cmd: Command, count: int, env: Optional[Dict[str, str]] = None,
                     cwd: Optional[str] = None, **kwargs) -> List[str]:
        if count < 1:
            raise ValueError(f"count must be positive, got {count}.")
        if kwargs:
            logger.debug(f"Slurm scheduler takes resources from its cluster spec; ignores {sorted(kwargs)}.")
        os.makedirs(self.state_dir, exist_ok=True)
        offset = self._next_index.get(worker_type, 0)
        args = format_command(cmd, jobstep_id=scripts._INDEX_SENTINEL, n_jobsteps=offset + count,
                              worker_submission_index=0, wprocs_per_jobstep=1, wprocs_in_job=offset + count,
                              wproc_offset=offset)
        for i in range(offset, offset + count):  # a resubmitted index must not see the old exit code
            for suffix in (".rc", ".host"):
                path = os.path.join(self.state_dir, f"{worker_type}-{i}{suffix}")
                if os.path.exists(path):
                    os.unlink(path)
        group = scripts.render_group(
            self.spec, run_name=self.run_name, worker_type=worker_type, cmd=args, count=count, offset=offset,
            env=dict(env or {}), log_dir=self.log_dir, state_dir=self.state_dir, cwd=cwd or os.getcwd(),
            submission=len(self._groups))
        for path, text in ((group.task_path, group.task_text), (group.sbatch_path, group.sbatch_text)):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)
        out = self._call("sbatch", ["--parsable", group.sbatch_path]).stdout.strip()
        job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
        if not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise SchedulerError(f"sbatch --parsable printed {out!r}, not a job id.")
        self._groups.append(_Group(job_id, worker_type, offset, count, time.time()))
        self._next_index[worker_type] = offset + count
        logger.info(f"Submitted {worker_type} {offset}..{offset + count - 1} as Slurm job {job_id} "
                    f"({group.sbatch_path}).")
        return [self.job_name(worker_type, i) for i in range(offset, offset + count)]

    # -- job states ----------------------------------------------------- #
    def _poll(self, force: bool = False) -> None:
        """Refresh every unfinished group's Slurm state (one squeue, then sacct for jobs it no longer lists)."""
        if not force and time.monotonic() - self._last_poll < self.poll_interval_s:
            return
        self._last_poll = time.monotonic()
        open_groups = [g for g in self._groups if g.state.active()]
        if not open_groups:
            return
        ids = ",".join(g.job_id for g in open_groups)
        listed = self._squeue(ids)
        missing = [g for g in open_groups if g.job_id not in listed]
        finished = self._sacct(",".join(g.job_id for g in missing)) if missing and self._use_sacct else {}
        for g in open_groups:
            state = listed.get(g.job_id) or finished.get(g.job_id)
            if state is None:  # neither queue nor accounting knows it (accounting off, or purged)
                state = "CANCELLED" if g.cancelled else "LOST"
            g.slurm_state = state
            g.state = slurm_state(state) if state != "LOST" else JobState.FAILED
            if g.cancelled and g.state == JobState.FAILED:
                g.state = JobState.CANCELLED

    def _squeue(self, ids: str) -> Dict[str, str]:
        # --states=all: without it squeue lists only pending/running jobs, and a cluster without
        # accounting storage (no sacct) would leave no way to learn how a job ended.
        res = self._call("squeue", ["-h", "--states=all", "-j", ids, "-o", "%i|%T"], check=False)
        states = {}
        for line in res.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job and state:
                states[job.strip()] = state.strip()
        return states

    def _sacct(self, ids: str) -> Dict[str, str]:
        if shutil.which(self.commands["sacct"]) is None:
            logger.info(f"'{self.commands['sacct']}' is not on PATH; job states come from squeue only.")
            self._use_sacct = False
            return {}
        res = self._call("sacct", ["-n", "-P", "-X", "-j", ids, "-o", "JobID,State,ExitCode"], check=False)
        if res.returncode != 0 and "accounting storage is disabled" in (res.stderr + res.stdout).lower():
            logger.info("Slurm accounting storage is disabled (no sacct); job states come from squeue only.")
            self._use_sacct = False
            return {}
        states = {}
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[0]:
                states[parts[0].split(".")[0]] = parts[1]
        return states

    def _worker_file(self, worker_type: str, index: int, suffix: str) -> str:
        return os.path.join(self.state_dir, f"{worker_type}-{index}{suffix}")

    def _exit_code(self, worker_type: str, index: int) -> Optional[int]:
        try:
            with open(self._worker_file(worker_type, index, ".rc")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _exit_time(self, worker_type: str, index: int) -> Optional[float]:
        """When the worker wrote its exit code file (None if it has not)."""
        try:
            return os.path.getmtime(self._worker_file(worker_type, index, ".rc"))
        except OSError:
            return None

    def _exited_long_ago(self, worker_type: str, index: int) -> bool:
        when = self._exit_time(worker_type, index)
        return when is None or time.time() - when > self.grace_period_s

    def _host(self, worker_type: str, index: int) -> Optional[str]:
        try:
            with open(self._worker_file(worker_type, index, ".host")) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _info(self, g: _Group, index: int) -> JobInfo:
        code = self._exit_code(g.worker_type, index)
        if code is not None:
            state = JobState.COMPLETED if code == 0 else JobState.FAILED
            if g.cancelled and code != 0:
                state = JobState.CANCELLED
            if code == 0 and g.state.active() and not self._exited_long_ago(g.worker_type, index):
                # The worker is done but its job is still ending (srun, the batch script, an epilog):
                # a finished run leaves nothing in the queue, unless Slurm takes over a grace period.
                state = JobState.RUNNING
        elif g.state.active():
            state = g.state
        else:  # the job ended before this worker wrote its exit code
            state = JobState.CANCELLED if g.cancelled else (
                JobState.FAILED if g.state != JobState.CANCELLED else JobState.CANCELLED)
        return JobInfo(name=self.job_name(g.worker_type, index), state=state, worker_type=g.worker_type,
                       worker_index=index, host=self._host(g.worker_type, index), submit_time=g.submit_time,
                       exit_code=code, log_path=os.path.join(self.log_dir, f"{g.worker_type}-{index}"))

    def _all(self) -> List[Tuple[_Group, int]]:
        return [(g, i) for g in self._groups for i in range(g.offset, g.offset + g.count)]

    def find(self, job_name: str) -> JobInfo:
        self._poll()
        for g, i in self._all():
            if self.job_name(g.worker_type, i) == job_name:
                return self._info(g, i)
        return JobInfo(name=job_name, state=JobState.NOT_FOUND)

    def find_all(self, job_name_regex: str = ".*") -> List[JobInfo]:
        self._poll()
        pattern = re.compile(job_name_regex)
        return [self._info(g, i) for g, i in self._all() if pattern.match(self.job_name(g.worker_type, i))]

    def slurm_job_id(self, job_name: str) -> Optional[str]:
        for g, i in self._all():
            if self.job_name(g.worker_type, i) == job_name:
                return g.job_id
        return None

    # -- stopping ------------------------------------------------------- #
    def stop(self, job_name: str, signal: int = signal_lib.SIGTERM) -> None:
        """Cancel the Slurm job holding ``job_name`` (that is: its whole worker group)."""
        groups = [g for g, i in self._all() if self.job_name(g.worker_type, i) == job_name]
        self._cancel(groups[:1], signal)

    def stop_all(self, signal: int = signal_lib.SIGTERM) -> None:
        self._cancel(list(self._groups), signal)

    def _cancel(self, groups: List[_Group], sig: int) -> None:
        self._poll(force=True)
        live = [g for g in groups if g.state.active()]
        if not live:
            return
        for g in live:
            g.cancelled = True
        ids = [g.job_id for g in live]
        if sig == signal_lib.SIGKILL:
            self._call("scancel", ["--signal=KILL", "--full"] + ids, check=False)
        self._call("scancel", ids, check=False)
        deadline = time.monotonic() + self.grace_period_s
        while time.monotonic() < deadline:
            self._poll(force=True)
            if not any(g.state.active() for g in live):
                return
            time.sleep(min(self.poll_interval_s, 0.5))
        logger.warning(f"Slurm jobs {ids} still listed {self.grace_period_s}s after scancel; sending KILL.")
        self._call("scancel", ["--signal=KILL", "--full"] + ids, check=False)

    # -- waiting -------------------------------------------------------- #
    def _first_crash(self) -> Optional[JobInfo]:
        """The worker that first exited with a non-zero code (by its exit code file), if any."""
        crashed = []
        for g, i in self._all():
            code = self._exit_code(g.worker_type, i)
            when = self._exit_time(g.worker_type, i)
            if code not in (None, 0) and when is not None:
                crashed.append((when, g, i))
        if not crashed:
            return None
        _, g, i = min(crashed, key=lambda c: c[0])
        return self._info(g, i)

    def _failure(self, info: JobInfo) -> JobException:
        # srun --kill-on-bad-exit stops a crashed worker's siblings before they write an exit code, and
        # their job may end before the next poll: name the worker that crashed, not one it took along.
        if info.state == JobState.FAILED:
            cause = self._first_crash()
            if cause is not None and cause.state == JobState.FAILED:
                info = cause
        g = next((g for g, i in self._all() if self.job_name(g.worker_type, i) == info.name), None)
        if g is None:
            return JobException(self.run_name, info.name, None, "job not found")
        if info.exit_code is not None:
            reason = f"exited with code {info.exit_code}"
        else:
            reason = f"Slurm job {g.job_id} ended as {g.slurm_state} before the worker exited"
        if info.state == JobState.CANCELLED:
            reason = f"cancelled ({reason})"
        reason += f" (Slurm job {g.job_id})"
        return JobException(self.run_name, info.worker_type, info.host, reason, worker_index=info.worker_index,
                            exit_code=info.exit_code, log_tail=read_log_tail(info.log_path))

    def _job_names(self) -> List[str]:
        return [self.job_name(g.worker_type, i) for g, i in self._all()]

    def _poll_jobs(self, names: List[str]) -> Dict[str, JobInfo]:
        self._poll()
        return {i.name: i for i in self.find_all()}

    def __enter__(self) -> "SlurmSchedulerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
