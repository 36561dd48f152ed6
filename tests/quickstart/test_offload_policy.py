"""Frozen models that share devices are offloaded after their call on GPUs, not on the CPU."""

from __future__ import annotations

import os

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.core.dfg import OffloadHook
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.experiments.common import utils

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def _ppo():
    args = ["experiment_name=ppo", "trial_name=t", "n_gpus_per_node=2", "allocation_mode=manual",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8"]
    for role in ("actor", "critic", "ref", "rew"):
        args += [f"{role}.path={TINY}", f"{role}.init_from_scratch=True"]
    for call in ("actor_gen", "actor_train", "ref_inf", "rew_inf", "critic_inf", "critic_train"):
        args.append(f"{call}.parallel.data_parallel_size=2")
    return parse_quickstart("ppo", args).initial_setup()


def _dpo():
    args = ["experiment_name=dpo", "trial_name=t", "n_gpus_per_node=2", "allocation_mode=manual",
            f"dataset.train_path={DATA}/rw_pair-train.jsonl", "dataset.train_bs_n_seqs=8",
            f"actor.path={TINY}", "actor.init_from_scratch=True", f"ref.path={TINY}", "ref.init_from_scratch=True",
            "actor_train.parallel.data_parallel_size=2", "ref_inf.parallel.data_parallel_size=2"]
    return parse_quickstart("dpo", args).initial_setup()


@pytest.mark.parametrize("device,offloaded", [("cuda", True), ("cpu", False)])
@pytest.mark.parametrize("build,frozen", [(_ppo, {"ref_inf", "rew_inf"}), (_dpo, {"ref_inf"})])
def test_frozen_models_offloaded_on_gpu_only(monkeypatch, device, offloaded, build, frozen):
    monkeypatch.setattr(utils, "device", lambda: device)
    cfg = build()
    hooks = {r.name: [h for h in r.post_hooks if isinstance(h, OffloadHook)] for r in cfg.model_rpcs}
    for call, found in hooks.items():
        assert bool(found) == (offloaded and call in frozen), (call, found)
