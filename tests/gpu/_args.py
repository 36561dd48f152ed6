"""Command lines of the GPU smoke runs (one worker, one GPU, a few steps)."""

from __future__ import annotations

import os
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


def sft_args(steps: int = 4) -> List[str]:
    """bf16 SFT of the tiny llama, from scratch, on the embedded data."""
    return ["experiment_name=gpu-sft", "trial_name=t", "n_nodes=1", "n_gpus_per_node=1", "allocation_mode=manual",
            f"model.path={TINY}", "model.init_from_scratch=True", "model.enable_bf16=True",
            "model.optimizer.lr=1e-3", f"dataset.train_path={DATA}/sft-train.jsonl", "dataset.train_bs_n_seqs=8",
            f"exp_ctrl.benchmark_steps={steps}"]


def ppo_args(steps: int = 2) -> List[str]:
    """PPO with all four tiny models on the same single GPU."""
    args = ["experiment_name=gpu-ppo", "trial_name=t", "n_nodes=1", "n_gpus_per_node=1", "allocation_mode=manual",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=1", "ppo.ppo_n_minibatches=1",
            f"exp_ctrl.benchmark_steps={steps}"]
    for r in ["actor", "critic", "ref", "rew"]:
        args += [f"{r}.path={TINY}", f"{r}.init_from_scratch=True"]
    return args
