"""Run a quickstart experiment as a user would (a subprocess on CPU) and find its log directory."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def run_quickstart(fileroot: str, exp: str, experiment_name: str, overrides: Sequence[str],
                   timeout: float = 300, imports: Sequence[str] = ()) -> Tuple[subprocess.CompletedProcess, str]:
    """``python -m realhf.apps.quickstart [--import M] <exp> experiment_name=... trial_name=t <overrides>``
    with ``REAL_FILEROOT=fileroot``; (the finished process, the trial's log directory)."""
    from realhf.base import constants

    flags = [x for m in imports for x in ("--import", m)]
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", *flags, exp, f"experiment_name={experiment_name}",
           "trial_name=t", *overrides]
    env = dict(os.environ, REAL_FILEROOT=str(fileroot), REAL_FORCE_CPU="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return res, os.path.join(str(fileroot), "logs", constants.get_user(), experiment_name, "t")


def tiny_sft(*overrides: str) -> list:
    """A from-scratch SFT of the tiny llama on the embedded data, plus ``overrides``."""
    return [f"model.path={TINY}", "model.init_from_scratch=True", f"dataset.train_path={DATA}/sft-train.jsonl",
            *overrides]


def tiny_ppo_4workers(*overrides: str) -> list:
    """PPO of the tiny llama (all four roles from scratch) on 4 model workers with a different layout per
    call: generation dp4, actor training dp2 x tp2, critic dp2 x pp2; 2 steps of 8 prompts, plus ``overrides``."""
    models = [x for role in ("actor", "critic", "ref", "rew")
              for x in (f"{role}.path={TINY}", f"{role}.init_from_scratch=True")]
    return ["n_gpus_per_node=4", "allocation_mode=manual", "actor_gen.parallel.data_parallel_size=4",
            "actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
            "critic_train.parallel.data_parallel_size=2", "critic_train.parallel.pipeline_parallel_size=2",
            "critic_inf.parallel.data_parallel_size=2", "critic_inf.parallel.pipeline_parallel_size=2",
            "ref_inf.parallel.data_parallel_size=4", "rew_inf.parallel.data_parallel_size=4", *models,
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=1", "ppo.ppo_n_minibatches=1",
            "exp_ctrl.benchmark_steps=2", *overrides]


def tiny_ppo_on_meshes(n_workers: int, meshes: dict, *overrides: str) -> list:
    """PPO of the tiny llama (all four roles from scratch, sampling not greedy) with each call
    data-parallel over its ranks of ``meshes`` (``{call: [ranks]}``); 2 steps of 8 prompts."""
    args = ["experiment_name=ppo", "trial_name=t", f"n_gpus_per_node={n_workers}", "allocation_mode=manual",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=1", "ppo.gen.greedy=False",
            "exp_ctrl.benchmark_steps=2", "ppo.ppo_n_minibatches=1"]
    for role in ["actor", "critic", "ref", "rew"]:
        args += [f"{role}.path={TINY}", f"{role}.init_from_scratch=True"]
    for call, ranks in meshes.items():
        args += [f"{call}.device_mesh=localhost:{','.join(map(str, ranks))}",
                 f"{call}.parallel.data_parallel_size={len(ranks)}"]
    return args + list(overrides)
