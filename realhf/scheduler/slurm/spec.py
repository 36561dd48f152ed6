"""What a Slurm run asks the cluster for: the cluster spec and its validation.

:class:`SlurmOptions` is the ``slurm.*`` section of a quickstart config
(resources per worker, time limit, extra sbatch arguments); together with the
experiment's ``partition``, ``nodelist``, ``image_name`` and ``n_nodes`` it
becomes a :class:`SlurmClusterSpec`, the input of the script writer. Every
check runs before any job is submitted and names the offending key, so a bad
value fails in one line instead of as a rejected or misplaced job.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional


class ClusterSpecError(ValueError):
    """An invalid cluster spec; the message names the key and the allowed values."""


# Slurm accepts: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and UNLIMITED / INFINITE).
_TIME_RE = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_NODELIST_RE = re.compile(r"[A-Za-z0-9_.\-\[\],]+")


@dataclasses.dataclass
class SlurmOptions:
    """Resources of a ``mode=slurm`` run (the ``slurm.*`` keys of a quickstart config).

    :param cpus_per_worker: CPU cores per model worker (``--cpus-per-task``).
    :param mem_per_worker_mb: memory per model worker in MiB.
    :param gpus_per_worker: GPUs per model worker (``--gpus-per-task``; 0 on CPU clusters).
    :param master_cpus: CPU cores of the master worker.
    :param master_mem_mb: memory of the master worker in MiB.
    :param time_limit: ``--time`` of every job (e.g. ``2-00:00:00``); null = partition default.
    :param container_mounts: pyxis ``--container-mounts`` (used with ``image_name``);
        the file root and the code must be visible inside the container.
    :param extra_sbatch_args: further ``--option=value`` lines for every job script.
    :param poll_interval_s: how often squeue is asked about the jobs.
    """

    cpus_per_worker: int = 4
    mem_per_worker_mb: int = 32768
    gpus_per_worker: int = 1
    master_cpus: int = 2
    master_mem_mb: int = 8192
    time_limit: Optional[str] = None
    container_mounts: Optional[str] = None
    extra_sbatch_args: List[str] = dataclasses.field(default_factory=list)
    poll_interval_s: float = 2.0


@dataclasses.dataclass
class SlurmClusterSpec(SlurmOptions):
    """:class:`SlurmOptions` plus where the jobs run.

    :param partition: ``--partition`` (null: the cluster's default).
    :param nodelist: ``--nodelist`` of the model workers, e.g. ``NODE[01-02]``.
    :param container_image: pyxis ``--container-image`` of every task (null: no container).
    :param nodes: nodes of the model worker job (``--nodes``).
    :param tasks_per_node: model workers per node (``--ntasks-per-node``; null: let Slurm place them).
    """

    partition: Optional[str] = None
    nodelist: Optional[str] = None
    container_image: Optional[str] = None
    nodes: int = 1
    tasks_per_node: Optional[int] = None

    def validate(self, keys: Optional[Dict[str, str]] = None) -> None:
        """Raise :class:`ClusterSpecError` naming the first bad field.

        ``keys`` maps a field name to the key the user typed (e.g.
        ``container_image -> image_name``); other fields are named ``slurm.<field>``.
        """
        keys = keys or {}

        def key(name: str) -> str:
            return keys.get(name, f"slurm.{name}")

        def bad(name: str, why: str) -> ClusterSpecError:
            return ClusterSpecError(f"{key(name)}={getattr(self, name)!r} {why}")

        for name in ("cpus_per_worker", "mem_per_worker_mb", "master_cpus", "master_mem_mb", "nodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "is not allowed; it must be a positive integer.")
        for name in ("gpus_per_worker",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "is not allowed; it must be a non-negative integer.")
        if self.tasks_per_node is not None and (not isinstance(self.tasks_per_node, int) or self.tasks_per_node < 1):
            raise bad("tasks_per_node", "is not allowed; it must be a positive integer or null.")
        if isinstance(self.poll_interval_s, bool) or not isinstance(self.poll_interval_s, (int, float)) \
                or not 0 < self.poll_interval_s <= 600:
            raise bad("poll_interval_s", "is out of range; it must be in (0, 600] seconds.")
        if self.time_limit is not None:
            t = str(self.time_limit)
            if t.upper() not in ("UNLIMITED", "INFINITE") and not _TIME_RE.fullmatch(t):
                raise bad("time_limit", "is not a Slurm time; use minutes, HH:MM:SS or D-HH:MM:SS "
                          "(e.g. 2-00:00:00), or null for the partition default.")
        if self.partition is not None and not _NAME_RE.fullmatch(str(self.partition)):
            raise bad("partition", "is not a partition name (letters, digits, '_', '.', '-').")
        if self.nodelist is not None and not _NODELIST_RE.fullmatch(str(self.nodelist)):
            raise bad("nodelist", "is not a Slurm nodelist (e.g. NODE[01-02],COM08).")
        for name in ("container_image", "container_mounts"):
            v = getattr(self, name)
            if v is not None and (not str(v) or re.search(r"\s", str(v))):
                raise bad(name, "must be non-empty and contain no whitespace.")
        if self.container_mounts is not None and self.container_image is None:
            raise bad("container_mounts", f"needs a container image; set {key('container_image')} too.")
        for i, arg in enumerate(self.extra_sbatch_args or []):
            if not isinstance(arg, str) or not re.fullmatch(r"--?[A-Za-z][A-Za-z0-9\-]*(=\S.*)?", arg) \
                    or "\n" in arg:
                raise ClusterSpecError(
                    f"{key('extra_sbatch_args')}[{i}]={arg!r} is not an sbatch option; write it as "
                    "'--option' or '--option=value' (e.g. '--account=proj1')."
                )
            if arg.split("=", 1)[0] in ("--ntasks", "--array", "--output", "--error", "--job-name", "--parsable"):
                raise ClusterSpecError(
                    f"{key('extra_sbatch_args')}[{i}]={arg!r} sets an option the scheduler writes itself; "
                    "remove it."
                )
