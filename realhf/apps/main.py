"""Launching an experiment: one master worker and one model worker per device.

:func:`launch` takes a resolved :class:`ExperimentConfig`, writes it to the
trial's log directory, publishes each worker's config through name_resolve,
starts the workers with the scheduler of ``mode`` (``local``: one subprocess
each) and waits. When any worker fails, every other worker is stopped and
:class:`~realhf.scheduler.client.JobException` names the failed one; with
``recover_mode="auto"`` the run is started again from the last recover
state, up to ``recover_retries`` times.

:func:`main_start` is what the quickstart CLI calls with a parsed
experiment config (anything with ``initial_setup() -> ExperimentConfig``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence

from realhf.api.core.system_api import ExperimentConfig
from realhf.base import constants, logging, name_resolve
from realhf.scheduler import client as sched_client
from realhf.system import trial_files
from realhf.system import watchdog as wd
from realhf.system import worker_control

logger = logging.getLogger("main")

RECOVER_MODES = ("disabled", "save", "auto", "resume")


def _trial_root(exp: str, trial: str) -> str:
    return f"{constants.get_user()}/{exp}/{trial}"


def launch(
    cfg: ExperimentConfig,
    experiment_name: str,
    trial_name: str,
    mode: str = "local",
    recover_mode: str = "disabled",
    recover_retries: int = 1,
    request_timeout: float = 3600.0,
    wait_timeout: Optional[float] = None,
    user_modules: Sequence[str] = (),
    heartbeat_timeout_s: float = wd.DEFAULT_STALE_AFTER_S,
    debug: bool = True,
    scheduler_kwargs: Optional[Dict[str, Any]] = None,
) -> None:
    """Run ``cfg`` to completion; raises JobException if a worker fails (after retries).

    ``user_modules`` (dotted names or ``.py`` files) are imported by every worker
    before it reads its config, so interfaces, datasets and models a user
    registered in their own script exist in the workers too. A worker whose
    heartbeat is older than ``heartbeat_timeout_s`` (a frozen process; a busy
    one keeps beating from its background thread) stops the run with
    :class:`~realhf.system.watchdog.RunStopped` naming it. ``debug=False`` runs
    the workers with ``python -O`` (assert statements off). ``scheduler_kwargs`` go
    to the scheduler client of ``mode`` (``spec=`` the cluster spec of ``slurm``).
    """
    if recover_mode not in RECOVER_MODES:
        raise ValueError(f"recover_mode must be one of {RECOVER_MODES}, got {recover_mode!r}.")
    constants.set_experiment_trial_names(experiment_name, trial_name)
    log_dir = constants.get_log_path(experiment_name, trial_name)
    recover_dir = constants.get_recover_path(experiment_name, trial_name)
    resumes = _prepare_trial_files(cfg, experiment_name, trial_name, recover_mode)
    cfg_path = os.path.join(log_dir, "experiment_config.pkl")
    with open(cfg_path + ".tmp", "wb") as f:
        pickle.dump(cfg, f)
    os.replace(cfg_path + ".tmp", cfg_path)
    save_states = recover_mode in ("save", "auto")
    attempts = 1 + (recover_retries if recover_mode == "auto" else 0)
    for attempt in range(attempts):
        resume = resumes or attempt > 0
        try:
            _launch_once(cfg, cfg_path, experiment_name, trial_name, mode, request_timeout, wait_timeout,
                         recover_dir if (resume or save_states) else None, save_states, list(user_modules),
                         heartbeat_timeout_s, resume, debug, scheduler_kwargs or {})
            return
        except sched_client.JobException as e:
            if attempt + 1 >= attempts:
                raise
            logger.warning(f"Run failed ({e.reason}); recovering from {recover_dir} "
                           f"(retry {attempt + 1}/{attempts - 1}).")


def _prepare_trial_files(cfg: ExperimentConfig, exp: str, trial: str, recover_mode: str) -> bool:
    """Check and tidy the trial's directories before any worker starts; returns whether the run
    resumes from a recover state (``resume``, or ``auto`` when one exists).

    Raises :class:`~realhf.system.trial_files.LaunchRefused` (unwritable
    directory, nothing to resume, another layout). A run that does not resume
    starts a fresh log: the previous run's files move to ``<log dir>/previous-<time>/``.
    """
    log_dir, recover_dir = constants.get_log_path(exp, trial), constants.get_recover_path(exp, trial)
    save_dir = constants.get_save_path(exp, trial)
    dirs = {"file root": constants.get_fileroot(), "log": log_dir}
    if any(r.is_train for r in cfg.model_rpcs):
        dirs["checkpoint"] = save_dir
    if recover_mode != "disabled":
        dirs["recover"] = recover_dir
    trial_files.check_writable(dirs)
    trial_files.remove_interrupted_writes(save_dir, recover_dir)
    resumes = False
    if recover_mode in ("resume", "auto"):
        resumes = trial_files.check_resumable(cfg, recover_dir, required=recover_mode == "resume") is not None
    if not resumes:
        moved = trial_files.set_aside_logs(log_dir)
        if moved:
            logger.info(f"The previous run's logs of {exp}/{trial} were moved to {moved}.")
    return resumes


def worker_command(worker_type: str, exp: str, trial: str, user_modules: Sequence[str] = (),
                   debug: bool = True) -> List[str]:
    """The command line of one worker job (``{jobstep_id}`` is filled in by the scheduler)."""
    cmd = [sys.executable] + ([] if debug else ["-O"])
    cmd += ["-m", "realhf.apps.remote", "worker", "-w", worker_type, "-e", exp, "-f", trial, "-i", "{jobstep_id}"]
    for module in user_modules:
        cmd += ["--import", module]
    return cmd


def apply_common_options(cfg: ExperimentConfig, config: Any) -> ExperimentConfig:
    """Copy the quickstart options the runtime acts on (``cache_clear_freq``, ``wandb_mode``) onto ``cfg``
    and resolve it (graph and layouts) as it will run."""
    cfg.cache_clear_freq = getattr(config, "cache_clear_freq", None)
    cfg.wandb_mode = getattr(config, "wandb_mode", "disabled")
    # A customized initial_setup() may have edited calls, keys or shards after
    # the base class resolved them: the graph and layouts are rebuilt here.
    cfg.resolve()
    return cfg


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """SIGTERM (a job system, ``kill``) unwinds like Ctrl-C, so the launcher stops its workers too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _launch_once(cfg, cfg_path, exp, trial, mode, request_timeout, wait_timeout, recover_dir, save_states,
                 user_modules: List[str], heartbeat_timeout_s: float, resume: bool, debug: bool,
                 scheduler_kwargs: Dict[str, Any]) -> None:
    name_resolve.clear_subtree(_trial_root(exp, trial))
    n = cfg.n_model_workers
    for i in range(n):
        worker_control.publish_worker_config(exp, trial, f"model_worker/{i}", {"experiment_config": cfg_path})
    worker_control.publish_worker_config(exp, trial, "master_worker/0", {
        "experiment_config": cfg_path, "recover_dir": recover_dir, "save_recover_states": save_states,
        "request_timeout": request_timeout, "resume": resume,
    })
    sched = sched_client.make(mode, exp, trial, **scheduler_kwargs)
    cmd = {t: worker_command(t, exp, trial, user_modules, debug) for t in ("model_worker", "master_worker")}
    env = {"REAL_FILEROOT": constants.get_fileroot()}
    for var in ("REAL_NAME_RESOLVE", "REAL_REDIS_URL", "REAL_MULTI_NODE", "REAL_NO_EXT", "PYTHONPATH"):
        if var in os.environ:
            env[var] = os.environ[var]
    names = [f"model_worker/{i}" for i in range(n)] + ["master_worker/0"]
    watchdog = wd.HeartbeatWatchdog(exp, trial, names, heartbeat_timeout_s)
    master_log = os.path.join(constants.get_log_path(exp, trial), "master_worker-0")
    # A resumed or retried run appends to the master's log; echo only what this launch writes.
    echo_from = os.path.getsize(master_log) if os.path.exists(master_log) else 0
    # One device per model worker (what a Ray actor holds; the local scheduler ignores it).
    resources = {"cpus": 1.0, "gpus": 1.0 if any(w.device.startswith("cuda") for w in cfg.model_worker) else 0.0}
    with _terminate_unwinds():
        _run_jobs(sched, cmd, n, env, master_log, wait_timeout, watchdog, echo_from, resources)


def _run_jobs(sched, cmd: Dict[str, List[str]], n: int, env, master_log: str, wait_timeout: Optional[float],
              watchdog: Optional[wd.HeartbeatWatchdog] = None, echo_from: int = 0,
              resources: Optional[Dict[str, Any]] = None) -> None:
    try:
        sched.submit_array("model_worker", cmd["model_worker"], count=n, env=env, **(resources or {}))
        sched.submit_array("master_worker", cmd["master_worker"], count=1, env=env)
        _wait_and_echo(sched, master_log, wait_timeout, watchdog=watchdog, start_pos=echo_from)
    except sched_client.JobException as e:
        if isinstance(e, wd.RunStopped) and e.worker_index is not None:
            # A frozen process cannot act on SIGTERM; do not wait a grace period for it.
            sched.stop(sched.job_name(e.worker_type, e.worker_index), signal.SIGKILL)
        sched.stop_all()
        fatal = None if watchdog is None else wd.fatal_message(watchdog.experiment, watchdog.trial,
                                                               ["master_worker/0"] + watchdog.worker_names)
        if fatal is not None:
            raise wd.RunStopped(e.run_name, fatal.partition(":")[0], fatal, e.exit_code) from None
        raise
    except BaseException:
        sched.stop_all()
        raise


def _wait_and_echo(sched, master_log: str, timeout: Optional[float], echo: bool = True,
                   watchdog: Optional[wd.HeartbeatWatchdog] = None, start_pos: int = 0) -> None:
    """Wait for the jobs, copying the master's new log lines to stdout meanwhile (step logs, progress);
    ``watchdog`` is asked between waits whether a worker froze."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    pos = start_pos

    def echo_new() -> None:
        nonlocal pos
        if not echo or not os.path.exists(master_log):
            return
        with open(master_log, "r", errors="replace") as f:
            f.seek(pos)
            chunk = f.read()
            pos = f.tell()
        if chunk:
            sys.stdout.write(chunk)
            sys.stdout.flush()

    while True:
        try:
            sched.wait(timeout=0.5)
            echo_new()
            return
        except TimeoutError:
            echo_new()
            stale = watchdog.stale() if watchdog is not None else None
            if stale is not None:
                raise stale
            if deadline is not None and time.monotonic() > deadline:
                raise
        except BaseException:
            echo_new()
            raise


def user_modules_of_this_run() -> List[str]:
    """Modules the user loaded into this process: ``--import`` ones and the launching
    script itself when it is not part of realhf (``python my_exp.py my-ppo ...``)."""
    from realhf.api.quickstart import entrypoint

    mods = list(getattr(entrypoint, "IMPORTED_USER_MODULES", []))
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        path = os.path.abspath(main_file)
        pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not path.startswith(pkg_dir + os.sep) and path not in mods:
            mods.append(path)
    return mods


def configure_cluster_env(config: Any) -> None:
    """Apply the run's name-resolve backend and multi-node addressing to this process and
    (through the environment the launcher passes on) to its workers."""
    backend = getattr(config, "name_resolve", None)
    if backend:
        os.environ[name_resolve.BACKEND_ENV_VAR] = backend
        address = getattr(config, "name_resolve_address", None)
        if address:
            os.environ["REAL_REDIS_URL"] = address
        name_resolve.reconfigure(backend)
    if getattr(config, "n_nodes", 1) > 1:
        from realhf.base import network

        os.environ[network.MULTI_NODE_ENV_VAR] = "1"


def scheduler_kwargs_of(config: Any) -> Dict[str, Any]:
    """Scheduler options taken from the quickstart config (the cluster spec for ``mode=slurm``)."""
    if getattr(config, "mode", "local") == "slurm" and hasattr(config, "slurm_cluster_spec"):
        return {"spec": config.slurm_cluster_spec()}
    if getattr(config, "mode", "local") == "ray":
        return {"address": getattr(config, "ray_address", None),
                "workers_per_node": getattr(config, "n_gpus_per_node", None)}
    return {}


def main_start(config: Any) -> int:
    """Build the experiment from a quickstart config and run it; returns the exit code."""
    from realhf.api.core.dfg import GraphError
    from realhf.api.core.system_api import ExperimentConfigError
    from realhf.base.json_records import DatasetFormatError

    exp, trial = config.experiment_name, config.trial_name
    configure_cluster_env(config)
    try:
        cfg = apply_common_options(config.initial_setup(), config)
    except (DatasetFormatError, GraphError, ExperimentConfigError) as e:
        # Refused before any worker starts, in one line.
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    try:
        launch(cfg, exp, trial, mode=getattr(config, "mode", "local"),
               recover_mode=getattr(config, "recover_mode", "disabled"),
               recover_retries=getattr(config, "recover_retries", 1), user_modules=user_modules_of_this_run(),
               heartbeat_timeout_s=getattr(config, "heartbeat_timeout_s", wd.DEFAULT_STALE_AFTER_S),
               debug=getattr(config, "debug", True), scheduler_kwargs=scheduler_kwargs_of(config))
    except (trial_files.LaunchRefused, sched_client.SchedulerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sched_client.JobException as e:
        logger.error(str(e))
        print(f"realhf: experiment {exp}/{trial} failed: {e}", file=sys.stderr)
        return 1
    logger.info(f"Experiment {exp}/{trial} finished. Logs: {constants.get_log_path(exp, trial)}")
    return 0
