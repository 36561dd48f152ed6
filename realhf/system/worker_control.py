"""Controller-side helpers: worker configs, statuses and commands via name_resolve.

* :func:`publish_worker_config` / :func:`load_worker_config`: a controller
  (or the launcher) publishes a pickled config per worker name; the worker
  entry point loads it before :meth:`Worker.configure`.
* :func:`get_worker_status` reads the status a :class:`Worker` publishes and
  reports ``LOST`` when its heartbeat is stale or ``UNKNOWN`` if absent.
* :func:`send_command` asks a worker to ``pause``, ``start`` or ``exit``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
import time
from typing import Any, Dict, Iterable, Optional, Sequence

from realhf.base import name_resolve, names
from realhf.system.worker_base import (
    HEARTBEAT_INTERVAL_S,
    WorkerServerStatus,
    command_key,
)

# A live status whose heartbeat is older than this reads as LOST.
DEFAULT_LOST_AFTER_S = 5 * HEARTBEAT_INTERVAL_S
_LIVE = (WorkerServerStatus.READY, WorkerServerStatus.RUNNING, WorkerServerStatus.PAUSED)


def config_key(experiment: str, trial: str, worker_name: str) -> str:
    return names.worker_key(experiment, trial, f"config/{worker_name}")


def publish_worker_config(experiment: str, trial: str, worker_name: str, config: Any) -> None:
    blob = base64.b64encode(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")
    name_resolve.add(config_key(experiment, trial, worker_name), blob,
                     replace=True, delete_on_exit=False)


def load_worker_config(experiment: str, trial: str, worker_name: str,
                       timeout: Optional[float] = None) -> Any:
    blob = name_resolve.wait(config_key(experiment, trial, worker_name), timeout=timeout)
    return pickle.loads(base64.b64decode(blob.encode("ascii")))


@dataclasses.dataclass
class WorkerStatusInfo:
    worker_name: str
    status: WorkerServerStatus
    heartbeat: Optional[float] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    error: Optional[str] = None
    fatal: bool = False  # ``error`` is a complete one-line explanation (see worker_base.FatalError)


def get_worker_status(experiment: str, trial: str, worker_name: str,
                      lost_after_s: float = DEFAULT_LOST_AFTER_S) -> WorkerStatusInfo:
    try:
        raw = name_resolve.get(names.worker_status(experiment, trial, worker_name))
    except name_resolve.NameEntryNotFoundError:
        return WorkerStatusInfo(worker_name, WorkerServerStatus.UNKNOWN)
    d = json.loads(raw)
    status = WorkerServerStatus(d["status"])
    hb = d.get("heartbeat")
    if status in _LIVE and hb is not None and time.time() - hb > lost_after_s:
        status = WorkerServerStatus.LOST
    return WorkerStatusInfo(worker_name, status, hb, d.get("pid"), d.get("host"), d.get("error"),
                            bool(d.get("fatal", False)))


def get_worker_statuses(experiment: str, trial: str, worker_names: Iterable[str],
                        **kwargs) -> Dict[str, WorkerStatusInfo]:
    return {w: get_worker_status(experiment, trial, w, **kwargs) for w in worker_names}


def wait_worker_status(experiment: str, trial: str, worker_names: Sequence[str],
                       statuses: Iterable[WorkerServerStatus], timeout: Optional[float] = None,
                       poll_interval: float = 0.05) -> Dict[str, WorkerStatusInfo]:
    """Wait until every worker is in one of ``statuses``.

    Raises RuntimeError as soon as a worker is ERROR or LOST (unless those
    are awaited), TimeoutError after ``timeout``.
    """
    wanted = {WorkerServerStatus(s) for s in statuses}
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        infos = get_worker_statuses(experiment, trial, worker_names)
        for info in infos.values():
            if info.status in (WorkerServerStatus.ERROR, WorkerServerStatus.LOST) \
                    and info.status not in wanted:
                raise RuntimeError(f"Worker {info.worker_name!r} is {info.status.value}"
                                   + (f":\n{info.error}" if info.error else "."))
        if all(i.status in wanted for i in infos.values()):
            return infos
        if deadline is not None and time.monotonic() >= deadline:
            now = {w: i.status.value for w, i in infos.items()}
            raise TimeoutError(f"Workers did not reach {sorted(s.value for s in wanted)} "
                               f"within {timeout}s: {now}.")
        time.sleep(poll_interval)


def send_command(experiment: str, trial: str, worker_name: str, command: str) -> None:
    if command not in ("pause", "start", "exit"):
        raise ValueError(f"Unknown worker command {command!r}.")
    name_resolve.add(command_key(experiment, trial, worker_name), command,
                     replace=True, delete_on_exit=False)
