"""Worker process entry point.

``python -m realhf.apps.remote worker -w <worker_type> -e <exp> -f <trial> -i <jobstep_id>
[-g <n_jobsteps>] [-r <submission_index>] [-p <procs_per_jobstep>] [-j <procs_in_job>]
[-o <proc_offset>] [--config-json JSON] [--import MODULE ...]``

The worker index is ``proc_offset + jobstep_id * procs_per_jobstep`` (one
process per job step here). The worker class comes from the registry of
:mod:`realhf.system.worker_base` (unknown types import
``realhf.system.<worker_type>``, whose module registers itself; ``--import``
loads further modules). The config is ``--config-json`` if given, otherwise
the one published for ``<worker_type>/<index>`` through
:func:`realhf.system.worker_control.publish_worker_config`. The process exits
with the worker's exit code: 0 when it completed, 1 on an error (published as
ERROR with a short traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from realhf.base import constants, logging

logger = logging.getLogger("remote")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m realhf.apps.remote")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run one worker process")
    w.add_argument("-w", "--worker_type", required=True)
    w.add_argument("-e", "--experiment_name", required=True)
    w.add_argument("-f", "--trial_name", required=True)
    w.add_argument("-i", "--jobstep_id", type=int, required=True)
    w.add_argument("-g", "--n_jobsteps", type=int, default=1)
    w.add_argument("-r", "--worker_submission_index", type=int, default=0)
    w.add_argument("-p", "--wprocs_per_jobstep", type=int, default=1)
    w.add_argument("-j", "--wprocs_in_job", type=int, default=1)
    w.add_argument("-o", "--wproc_offset", type=int, default=0)
    w.add_argument("--config-json", default=None,
                   help="worker config as JSON (instead of the published one)")
    w.add_argument("--config-timeout", type=float, default=300.0,
                   help="seconds to wait for the published config")
    w.add_argument("--import", dest="imports", action="append", default=[],
                   help="module to import first (registers extra worker types)")
    return parser


def import_user_module(spec: str) -> None:
    """Import a dotted module or a ``.py`` file, so its registrations (interfaces,
    datasets, experiments) exist in this worker as in the launching process."""
    import importlib.util
    import os

    if not (spec.endswith(".py") or os.sep in spec):
        importlib.import_module(spec)
        return
    path = os.path.abspath(spec)
    name = "_realhf_user_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    if name in sys.modules:
        return
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)


def worker_index(args: argparse.Namespace) -> int:
    return args.wproc_offset + args.jobstep_id * args.wprocs_per_jobstep


def run_worker(args: argparse.Namespace) -> int:
    from realhf.system import worker_base

    for module in args.imports:
        import_user_module(module)
    constants.set_experiment_trial_names(args.experiment_name, args.trial_name)
    index = worker_index(args)
    worker = worker_base.make_worker(
        args.worker_type, args.experiment_name, args.trial_name, index)
    try:
        if args.config_json is not None:
            config = json.loads(args.config_json)
        else:
            config = worker.load_config(timeout=args.config_timeout)
        worker.configure(config)
    except Exception as e:
        tb = worker_base.short_traceback(e)
        logger.error(f"Configuring worker {worker.name} failed:\n{tb}")
        worker.set_status(worker_base.WorkerServerStatus.ERROR, error=tb)
        return 1
    logger.info(f"Worker {worker.name} configured; running.")
    return worker.run()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
