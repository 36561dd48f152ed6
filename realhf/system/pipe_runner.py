"""Run an experiment on forked local processes with pipes as transport.

The master runs in the calling process; each model worker is a forked child
that joins a gloo world (one torch thread each) and serves requests over a
``multiprocessing`` pipe. This is the quickest way to run the full master /
model-worker logic inside one test; the local launcher runs the same cores
as separate programs over ZeroMQ.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Optional

import torch
import torch.distributed as dist

from realhf.api.core.system_api import ExperimentConfig
from realhf.base import network
from realhf.system.master_worker import MasterCore, PipeTransport
from realhf.system.model_worker import ModelWorkerCore, serve_pipe


def _worker_main(cfg: ExperimentConfig, rank: int, world: int, port: int, conn, exp: str, trial: str,
                 fileroot: Optional[str]) -> None:
    # One torch thread per worker by default, like launched workers (REAL_WORKER_THREADS).
    torch.set_num_threads(int(os.environ.get("REAL_WORKER_THREADS", "1")))
    if fileroot:
        os.environ["REAL_FILEROOT"] = fileroot
    import traceback

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        core = ModelWorkerCore(cfg, rank, exp, trial)
        core.setup()
    except Exception:
        # Answer the first request with the setup failure so the master reports it.
        err = traceback.format_exc()
        conn.recv()
        conn.send(("error", err))
        os._exit(1)
    serve_pipe(core, conn)
    dist.destroy_process_group()
    os._exit(0)


def run_with_pipes(cfg: ExperimentConfig, experiment_name: str, trial_name: str, timeout: float = 300.0,
                   recover_dir: Optional[str] = None, save_recover_states: bool = False,
                   fileroot: Optional[str] = None, concurrent: bool = True) -> MasterCore:
    """Run ``cfg`` to completion; returns the master (its ``history`` holds per-step logs).
    ``concurrent=False`` issues one call at a time (the reference order)."""
    old_root = os.environ.get("REAL_FILEROOT")
    if fileroot:
        os.environ["REAL_FILEROOT"] = fileroot  # the master writes paths too
    try:
        return _run(cfg, experiment_name, trial_name, timeout, recover_dir, save_recover_states, fileroot,
                    concurrent)
    finally:
        if fileroot:
            if old_root is None:
                os.environ.pop("REAL_FILEROOT", None)
            else:
                os.environ["REAL_FILEROOT"] = old_root


def _run(cfg, experiment_name, trial_name, timeout, recover_dir, save_recover_states, fileroot,
         concurrent) -> MasterCore:
    ctx = mp.get_context("fork")
    world = cfg.n_model_workers
    port = network.find_free_port()
    pipes = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(cfg, r, world, port, pipes[r][1], experiment_name, trial_name, fileroot))
             for r in range(world)]
    for p in procs:
        p.start()
    transport = PipeTransport([p[0] for p in pipes], timeout=timeout)
    try:
        master = MasterCore(cfg, transport, experiment_name, trial_name, recover_dir=recover_dir,
                            save_recover_states=save_recover_states, concurrent=concurrent)
        master.run()
        transport.close()
        for p in procs:
            p.join(timeout=30)
        return master
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
