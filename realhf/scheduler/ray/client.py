"""Ray scheduler: every worker job is a Ray actor on an existing Ray cluster.

Each job is one :class:`~realhf.scheduler.ray.host.WorkerHost` actor that
starts the worker's command line (the one ``mode=local`` runs) as its child
process and holds the job's resources: ``cpus`` logical CPUs and ``gpus``
GPUs, in a bundle of the array's placement groups
(:mod:`realhf.scheduler.ray.placement`: ``jobs_per_node`` consecutive jobs
share a node, as the device mesh needs). Actors are named after their jobs in
the ``realhf`` namespace, so ``ray list actors`` shows which run they belong to.

The child's stdout and stderr go to ``<log_dir>/<worker_type>-<index>`` on
its node, as with ``mode=local``; ``log_dir`` should be on a filesystem the
nodes share (as ``REAL_FILEROOT`` must be for name_resolve), and a log the
launcher cannot see is copied into its own log directory when the job ends.

:meth:`RaySchedulerClient.wait` polls the actors. A worker that exits
non-zero or dies from a signal, or whose actor dies (killed, node lost),
stops every job and raises :class:`JobException` naming it (type and index),
with the cause and the tail of its log. Stopping a job signals its process
group, then kills its actor; when no job of an array is left its placement
groups are removed. A launcher killed outright leaves nothing either: Ray
ends the actors and placement groups of a departed driver, and a dying actor
takes its child with it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal as signal_lib
import time
from typing import Dict, Iterable, List, Optional

from realhf.base import constants, logging
from realhf.scheduler.client import (
    Command,
    JobException,
    JobInfo,
    JobState,
    SchedulerClient,
    SchedulerError,
    format_command,
)
from realhf.scheduler.local.client import LOG_TAIL_LINES, describe_returncode, read_log_tail
from realhf.scheduler.ray import connect as ray_connect
from realhf.scheduler.ray.host import WorkerHost
from realhf.scheduler.ray.placement import JobResources, MeshPlacement

logger = logging.getLogger("ray_scheduler")

DEFAULT_GRACE_PERIOD_S = 5.0
# Launcher variables a worker needs on any node (the rest of its environment is the node's own).
FORWARDED_ENV_PREFIXES = ("REAL_", "PYTHON", "TRITON_", "OMP_", "MKL_", "TORCH", "NCCL_", "GLOO_", "HF_",
                          "TRANSFORMERS_", "TOKENIZERS_", "WANDB_")
_LOG_CHUNK = 4 * 1024 * 1024


@dataclasses.dataclass
class _RayJob:
    name: str
    worker_type: str
    index: int
    actor: object
    placement: MeshPlacement
    log_path: str
    submit_time: float
    host: Optional[str] = None
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    actor_error: Optional[str] = None
    cancelled: bool = False
    end_time: Optional[float] = None
    released: bool = False
    log_tail: Optional[str] = None

    def finished(self) -> bool:
        return self.exit_code is not None or self.actor_error is not None or self.released


def forwarded_env(environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The launcher's variables that workers get on top of their node's environment."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


class RaySchedulerClient(SchedulerClient):
    """Runs every job as a Ray actor; see the module docstring.

    Joins the cluster at ``address`` (or ``$RAY_ADDRESS``) on construction, so
    a wrong address fails before any job is submitted. ``workers_per_node``
    is the mesh's devices per node (``n_gpus_per_node``).
    """

    def __init__(self, expr_name: str, trial_name: str, address: Optional[str] = None,
                 log_dir: Optional[str] = None, grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
                 poll_interval_s: float = 0.2, placement_timeout_s: float = 60.0,
                 start_timeout_s: float = 120.0, workers_per_node: Optional[int] = None):
        super().__init__(expr_name, trial_name)
        self.log_dir = log_dir or constants.get_log_path(expr_name, trial_name)
        self.grace_period_s = grace_period_s
        self.poll_interval_s = poll_interval_s
        self.placement_timeout_s = placement_timeout_s
        self.start_timeout_s = start_timeout_s
        self.workers_per_node = workers_per_node
        self._jobs: Dict[str, _RayJob] = {}
        self._next_index: Dict[str, int] = {}
        self._placements: List[MeshPlacement] = []
        self._connected_here = ray_connect.connect(address)
        import ray

        self._ray = ray
        self._host_cls = ray.remote(WorkerHost)

    # -- submission ------------------------------------------------------ #
    def log_path(self, worker_type: str, index: int) -> str:
        return os.path.join(self.log_dir, f"{worker_type}-{index}")

    def submit_array(self, worker_type: str, cmd: Command, count: int,
                     env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                     cpus: float = 1.0, gpus: float = 0.0, jobs_per_node: Optional[int] = None,
                     **kwargs) -> List[str]:
        """Start ``count`` actors; ``jobs_per_node`` consecutive jobs share a node (default: the
        client's ``workers_per_node``, i.e. ``n_gpus_per_node``; None: all of them)."""
        if count < 1:
            raise ValueError(f"count must be positive, got {count}.")
        if kwargs:
            logger.debug(f"Ray scheduler ignores options {sorted(kwargs)}.")
        os.makedirs(self.log_dir, exist_ok=True)
        offset = self._next_index.get(worker_type, 0)
        resources = JobResources(cpus=cpus, gpus=gpus)
        placement = MeshPlacement(f"{self.run_name}:{worker_type}[{offset}:{offset + count}]", count,
                                  resources, jobs_per_node or self.workers_per_node)
        placement.create(self.placement_timeout_s)
        self._placements.append(placement)
        cwd = os.getcwd() if cwd is None else cwd
        base_env = forwarded_env()
        base_env.update(env or {})
        new: List[_RayJob] = []
        try:
            for j in range(count):
                new.append(self._create(worker_type, offset + j, placement, j, resources))
            starts = [job.actor.start.remote(*args) for job, args in _start_args(new, cmd, base_env, cwd,
                                                                                   offset, count)]
            for job, ref in zip(new, starts):
                try:
                    job.host, job.pid = self._ray.get(ref, timeout=self.start_timeout_s)
                except self._ray.exceptions.GetTimeoutError:
                    raise SchedulerError(f"{job.name} did not start within {self.start_timeout_s:.0f}s "
                                         "(its Ray actor is still pending).") from None
                logger.info(f"Started {job.name} on {job.host} (pid {job.pid}), log: {job.log_path}")
        except BaseException:
            self._stop_jobs(new, signal_lib.SIGKILL)
            self._drop_unused_placements()
            raise
        self._next_index[worker_type] = offset + count
        return [job.name for job in new]

    def _create(self, worker_type: str, index: int, placement: MeshPlacement, slot: int,
                resources: JobResources) -> _RayJob:
        name = self.job_name(worker_type, index)
        if name in self._jobs and not self._jobs[name].finished():
            raise SchedulerError(f"{name} is already running.")
        options = dict(name=name, namespace=ray_connect.NAMESPACE, num_cpus=resources.cpus,
                       num_gpus=resources.gpus, max_restarts=0, max_concurrency=1,
                       scheduling_strategy=placement.strategy(slot))
        try:
            actor = self._host_cls.options(**options).remote(name, self.log_path(worker_type, index))
        except ValueError as e:  # a live actor of that name: another launcher runs this trial
            raise SchedulerError(f"Cannot start {name} on the Ray cluster: {e}") from None
        job = _RayJob(name, worker_type, index, actor, placement, self.log_path(worker_type, index), time.time())
        self._jobs[name] = job
        return job

    # -- polling --------------------------------------------------------- #
    def _refresh(self, jobs: Iterable[_RayJob]) -> None:
        """Ask the live actors whether their workers ended; record exits and actor deaths."""
        live = [j for j in jobs if not j.finished()]
        if not live:
            return
        refs = {j.actor.poll.remote(): j for j in live}
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=10.0)
        for ref in ready:
            job = refs[ref]
            try:
                code = self._ray.get(ref)
            except self._ray.exceptions.RayActorError as e:
                self._ended(job, actor_error=_first_line(e))
                continue
            if code is not None:
                self._ended(job, exit_code=code)

    def _ended(self, job: _RayJob, exit_code: Optional[int] = None, actor_error: Optional[str] = None) -> None:
        job.exit_code, job.actor_error = exit_code, actor_error
        job.end_time = time.time()
        if actor_error is not None or exit_code != 0:
            job.log_tail = self._fetch_tail(job)
        self._release(job)
        self._drop_unused_placements()

    def _state(self, job: _RayJob) -> JobState:
        if job.cancelled:
            return JobState.CANCELLED
        if job.actor_error is not None:
            return JobState.FAILED
        if job.exit_code is None:
            return JobState.RUNNING
        return JobState.COMPLETED if job.exit_code == 0 else JobState.FAILED

    def _info(self, job: _RayJob) -> JobInfo:
        return JobInfo(name=job.name, state=self._state(job), worker_type=job.worker_type,
                       worker_index=job.index, host=job.host, pid=job.pid, submit_time=job.submit_time,
                       start_time=job.submit_time, end_time=job.end_time, exit_code=job.exit_code,
                       log_path=job.log_path)

    def find(self, job_name: str) -> JobInfo:
        job = self._jobs.get(job_name)
        if job is None:
            return JobInfo(name=job_name, state=JobState.NOT_FOUND)
        self._refresh([job])
        return self._info(job)

    def find_all(self, job_name_regex: str = ".*") -> List[JobInfo]:
        pattern = re.compile(job_name_regex)
        jobs = [j for n, j in self._jobs.items() if pattern.match(n)]
        self._refresh(jobs)
        return [self._info(j) for j in jobs]

    # -- stopping -------------------------------------------------------- #
    def stop(self, job_name: str, signal: int = signal_lib.SIGTERM) -> None:
        job = self._jobs.get(job_name)
        if job is not None:
            self._stop_jobs([job], signal)
            self._drop_unused_placements()

    def stop_all(self, signal: int = signal_lib.SIGTERM) -> None:
        self._stop_jobs(list(self._jobs.values()), signal)
        self._drop_unused_placements()

    def _stop_jobs(self, jobs: List[_RayJob], sig: int) -> None:
        alive = [j for j in jobs if not j.finished()]
        grace = 0.0 if sig == signal_lib.SIGKILL else self.grace_period_s
        refs = {}
        for job in alive:
            job.cancelled = True
            try:
                refs[job.actor.stop.remote(int(sig), grace)] = job
            except Exception:  # the actor handle is unusable; killing it below is all that is left
                pass
        if refs:
            ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=grace + 15.0)
            for ref in ready:
                try:
                    refs[ref].exit_code = self._ray.get(ref)
                except self._ray.exceptions.RayActorError as e:
                    refs[ref].actor_error = _first_line(e)
        for job in alive:
            job.end_time = job.end_time or time.time()
            self._release(job)

    def _release(self, job: _RayJob) -> None:
        """Copy a log the launcher cannot see, then kill the actor (idempotent)."""
        if job.released:
            return
        if not os.path.exists(job.log_path):
            self._collect_log(job)
        try:
            self._ray.kill(job.actor, no_restart=True)
        except Exception:  # already dead
            pass
        job.released = True

    def _drop_unused_placements(self) -> None:
        for placement in list(self._placements):
            if all(j.released for j in self._jobs.values() if j.placement is placement):
                placement.remove()
                self._placements.remove(placement)

    # -- logs ------------------------------------------------------------ #
    def _fetch_tail(self, job: _RayJob) -> str:
        if os.path.exists(job.log_path):
            return read_log_tail(job.log_path)
        try:
            return self._ray.get(job.actor.log_tail.remote(LOG_TAIL_LINES), timeout=10)
        except Exception as e:
            return f"<log of {job.name} on {job.host} unreadable: {_first_line(e)}>"

    def _collect_log(self, job: _RayJob) -> None:
        try:
            os.makedirs(os.path.dirname(job.log_path), exist_ok=True)
            with open(job.log_path, "wb") as out:
                offset = 0
                while True:
                    chunk = self._ray.get(job.actor.read_log.remote(offset, _LOG_CHUNK), timeout=30)
                    if not chunk:
                        break
                    out.write(chunk)
                    offset += len(chunk)
        except Exception as e:
            logger.warning(f"Could not collect the log of {job.name} from {job.host}: {_first_line(e)}")

    # -- waiting --------------------------------------------------------- #
    def _failure(self, info: JobInfo) -> JobException:
        job = self._jobs.get(info.name)
        if job is None:
            return JobException(self.run_name, info.name, None, "job not found")
        if job.actor_error is not None:
            reason = f"its Ray actor died ({job.actor_error})"
        elif job.exit_code is not None:
            reason = describe_returncode(job.exit_code)
        else:
            reason = "stopped"
        if info.state == JobState.CANCELLED:
            reason = f"cancelled ({reason})"
        tail = job.log_tail if job.log_tail is not None else self._fetch_tail(job)
        return JobException(self.run_name, job.worker_type, job.host, reason, worker_index=job.index,
                            exit_code=job.exit_code, log_tail=tail)

    def _job_names(self) -> List[str]:
        return list(self._jobs)

    def _poll_jobs(self, names: List[str]) -> Dict[str, JobInfo]:
        self._refresh([self._jobs[n] for n in names if n in self._jobs])
        return {n: self._info(self._jobs[n]) for n in names if n in self._jobs}

    def close(self) -> None:
        """Stop everything; leave the cluster if this client joined it."""
        self.stop_all()
        if self._connected_here and self._ray.is_initialized():
            self._ray.shutdown()
            self._connected_here = False

    def __enter__(self) -> "RaySchedulerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_args(jobs: List[_RayJob], cmd: Command, env: Dict[str, str], cwd: str, offset: int, count: int):
    """(job, arguments of ``WorkerHost.start``) for each new job: the filled command and its environment."""
    for job in jobs:
        args = format_command(cmd, jobstep_id=job.index, n_jobsteps=offset + count, worker_submission_index=0,
                              wprocs_per_jobstep=1, wprocs_in_job=offset + count, wproc_offset=offset)
        if isinstance(args, str):
            args = shlex.split(args)
        job_env = dict(env)
        job_env.update(REAL_WORKER_TYPE=job.worker_type, REAL_WORKER_INDEX=str(job.index),
                       REAL_WORKER_COUNT=str(offset + count), REAL_JOB_NAME=job.name)
        yield job, (list(args), job_env, cwd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
