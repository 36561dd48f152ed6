"""Generation given both cores (``actor_gen.cpu_threads=2``) trains exactly as with one.

PPO on 2 workers, generation on worker 0 alone (worker 1 idles until its
output exists) with 1 and with 2 threads for the decoding kernels; sampling
is not greedy, so any difference in a logit would change the statistics.
"""

from __future__ import annotations

import os

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.system.pipe_runner import run_with_pipes

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")
MESHES = {"actor_gen": [0], "actor_train": [0], "ref_inf": [0], "rew_inf": [1], "critic_inf": [1],
          "critic_train": [1]}


def _config(threads: int):
    args = ["experiment_name=ppo", "trial_name=t", "n_gpus_per_node=2", "allocation_mode=manual",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=1", "ppo.gen.greedy=False",
            "exp_ctrl.benchmark_steps=2", "ppo.ppo_n_minibatches=1", f"actor_gen.cpu_threads={threads}"]
    for role in ["actor", "critic", "ref", "rew"]:
        args += [f"{role}.path={TINY}", f"{role}.init_from_scratch=True"]
    for call, ranks in MESHES.items():
        args += [f"{call}.device_mesh=localhost:{','.join(map(str, ranks))}",
                 f"{call}.parallel.data_parallel_size={len(ranks)}"]
    return parse_quickstart("ppo", args).initial_setup()


def test_generation_threads_change_nothing_but_speed(tmp_path):
    runs = {}
    for threads in (1, 2):
        cfg = _config(threads)
        assert next(r for r in cfg.model_rpcs if r.name == "actor_gen").cpu_threads == threads
        runs[threads] = run_with_pipes(cfg, "ppo", f"threads{threads}", timeout=300,
                                       fileroot=str(tmp_path)).history
    assert len(runs[1]) == len(runs[2]) == 2
    for a, b in zip(runs[1], runs[2]):
        assert a.n_tokens == b.n_tokens
        assert a.stats == b.stats  # exact float equality, every call, every statistic
