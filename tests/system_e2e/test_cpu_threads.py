"""Generation given both cores (``actor_gen.cpu_threads=2``) trains exactly as with one.

PPO on 2 workers, generation on worker 0 alone (worker 1 idles until its
output exists) with 1 and with 2 threads for the decoding kernels; sampling
is not greedy, so any difference in a logit would change the statistics.
"""

from __future__ import annotations

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.system.pipe_runner import run_with_pipes
from tests.system_e2e._cli import tiny_ppo_on_meshes

pytestmark = pytest.mark.distributed

MESHES = {"actor_gen": [0], "actor_train": [0], "ref_inf": [0], "rew_inf": [1], "critic_inf": [1],
          "critic_train": [1]}


def _config(threads: int):
    args = tiny_ppo_on_meshes(2, MESHES, f"actor_gen.cpu_threads={threads}")
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
