"""Job scripts for one worker group: an sbatch script plus a per-task script.

A worker group (all model workers, or the master) is one Slurm job with one
task per worker: the sbatch script holds the ``#SBATCH`` directives and one
``srun`` line; ``srun`` starts the task script once per task, which derives
the worker index from ``$SLURM_PROCID`` and runs the worker command with its
output appended to ``<log_dir>/<worker_type>-<index>`` (the same log files
as ``mode=local``). When the command ends, the task script writes its exit
code to ``<state_dir>/<worker_type>-<index>.rc``; that file lets the
scheduler name the exact worker that failed, whatever sacct records.
Everything is plain text, so the golden tests compare it line by line.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Dict, List, Optional, Sequence, Union

from realhf.scheduler.slurm.spec import SlurmClusterSpec

# Stands for the worker index while the command is quoted; becomes "${REAL_WORKER_INDEX}".
_INDEX_SENTINEL = "\x00REAL_WORKER_INDEX\x00"


@dataclasses.dataclass
class GroupScripts:
    """The two scripts of one worker group and where they go."""

    sbatch_path: str
    sbatch_text: str
    task_path: str
    task_text: str


def quote_command(cmd: Union[str, Sequence[str]]) -> str:
    """Shell-quote ``cmd``, turning the index sentinel into ``"${REAL_WORKER_INDEX}"``."""
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)

    def one(arg: str) -> str:
        if _INDEX_SENTINEL not in arg:
            return shlex.quote(arg)
        return '"${REAL_WORKER_INDEX}"'.join(shlex.quote(p) if p else "" for p in arg.split(_INDEX_SENTINEL))

    return " ".join(one(a) for a in args)


def _mem_per_cpu(mem_mb: int, cpus: int) -> int:
    return max(1, -(-mem_mb // cpus))


def sbatch_directives(spec: SlurmClusterSpec, worker_type: str, job_name: str, count: int, output: str,
                      cwd: str, is_master: bool) -> List[str]:
    """The ``#SBATCH`` lines of a group's job (without the ``#SBATCH`` prefix)."""
    cpus = spec.master_cpus if is_master else spec.cpus_per_worker
    mem = spec.master_mem_mb if is_master else spec.mem_per_worker_mb
    d = [f"--job-name={job_name}", f"--output={output}", f"--chdir={cwd}", f"--ntasks={count}",
         f"--cpus-per-task={cpus}", f"--mem-per-cpu={_mem_per_cpu(mem, cpus)}M"]
    if not is_master:
        d.append(f"--nodes={spec.nodes}")
        if spec.tasks_per_node is not None:
            d.append(f"--ntasks-per-node={spec.tasks_per_node}")
        if spec.gpus_per_worker > 0:
            d.append(f"--gpus-per-task={spec.gpus_per_worker}")
        if spec.nodelist:
            d.append(f"--nodelist={spec.nodelist}")
    if spec.partition:
        d.append(f"--partition={spec.partition}")
    if spec.time_limit:
        d.append(f"--time={spec.time_limit}")
    d.extend(spec.extra_sbatch_args or [])
    return d


def srun_line(spec: SlurmClusterSpec, count: int, task_path: str, cpus_per_task: int = 1) -> str:
    """``srun`` starting the task script once per worker (inside the container, if any).

    ``--cpus-per-task`` is repeated because srun of Slurm 22.05 (to 23.02) does not
    inherit it from the job: each task would be given one CPU.
    """
    args = ["srun", f"--ntasks={count}", f"--cpus-per-task={cpus_per_task}", "--kill-on-bad-exit=1", "--label"]
    if spec.container_image:
        args.append(f"--container-image={spec.container_image}")
        if spec.container_mounts:
            args.append(f"--container-mounts={spec.container_mounts}")
    args += ["bash", task_path]
    return " ".join(shlex.quote(a) for a in args)


def render_group(spec: SlurmClusterSpec, *, run_name: str, worker_type: str, cmd: Union[str, Sequence[str]],
                 count: int, offset: int, env: Dict[str, str], log_dir: str, state_dir: str, cwd: str,
                 submission: int, is_master: Optional[bool] = None) -> GroupScripts:
    """Scripts of ``count`` workers of ``worker_type`` with indices ``offset .. offset+count-1``.

    ``cmd`` is already formatted, except that the worker index appears as the
    sentinel of :func:`quote_command` (see :class:`SlurmSchedulerClient`).
    """
    if is_master is None:
        is_master = worker_type == "master_worker"
    tag = f"{worker_type}-s{submission}"
    sbatch_path = f"{state_dir}/{tag}.sbatch"
    task_path = f"{state_dir}/{tag}.task.sh"
    output = f"{state_dir}/{tag}-%j.out"
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {d}" for d in sbatch_directives(spec, worker_type, f"{run_name}:{worker_type}", count,
                                                          output, cwd, is_master)]
    lines += [
        f"# realhf worker group {worker_type}, indices {offset}..{offset + count - 1} of run {run_name}",
        "set -u",
        f"echo \"realhf: job ${{SLURM_JOB_ID:-?}} ({worker_type}) on ${{SLURM_NODELIST:-?}}\"",
        srun_line(spec, count, task_path, spec.master_cpus if is_master else spec.cpus_per_worker),
    ]
    task = ["#!/bin/bash",
            f"# one task of {worker_type}: worker index = {offset} + SLURM_PROCID",
            f"export REAL_WORKER_INDEX=$(( {offset} + ${{SLURM_PROCID:-0}} ))",
            f"export REAL_WORKER_TYPE={shlex.quote(worker_type)}",
            f"export REAL_WORKER_COUNT={offset + count}",
            f"export REAL_JOB_NAME={shlex.quote(run_name)}:{shlex.quote(worker_type)}/\"${{REAL_WORKER_INDEX}}\""]
    task += [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(env.items())]
    log = f"{shlex.quote(log_dir)}/{shlex.quote(worker_type)}-\"${{REAL_WORKER_INDEX}}\""
    rc = f"{shlex.quote(state_dir)}/{shlex.quote(worker_type)}-\"${{REAL_WORKER_INDEX}}\""
    task += [
        f"hostname > {rc}.host",
        f"{quote_command(cmd)} >> {log} 2>&1",
        "code=$?",
        f"echo \"$code\" > {rc}.rc.tmp && mv {rc}.rc.tmp {rc}.rc",
        "exit $code",
    ]
    return GroupScripts(sbatch_path, "\n".join(lines) + "\n", task_path, "\n".join(task) + "\n")
