"""examples/ppo_sentiment.py: PPO with a VADER sentiment reward instead of a reward network."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import sys

import pytest

pytest.importorskip("vaderSentiment")

import realhf.experiments  # noqa: F401,E402
from realhf.api.core import model_api  # noqa: E402
from realhf.api.quickstart.entrypoint import parse_quickstart  # noqa: E402
from realhf.system.pipe_runner import run_with_pipes  # noqa: E402

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "ppo_sentiment.py")
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")
MODULE_NAME = "_test_example_ppo_sentiment"


@pytest.fixture(scope="module")
def example():
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def _args(steps: int = 2):
    args = ["experiment_name=ppo-sentiment", "trial_name=t", "n_gpus_per_node=4", "allocation_mode=manual",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=2", "ppo.gen.greedy=False",
            f"exp_ctrl.benchmark_steps={steps}", "ppo.ppo_n_minibatches=1"]
    for r in ["actor", "critic", "ref", "rew"]:
        args += [f"{r}.path={TINY}", f"{r}.init_from_scratch=True"]
    args += ["actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
             "actor_gen.parallel.data_parallel_size=2", "actor_gen.parallel.model_parallel_size=2",
             "critic_train.parallel.data_parallel_size=4", "critic_inf.parallel.data_parallel_size=4",
             "ref_inf.parallel.data_parallel_size=4",
             # the reward "model" is a tokenizer: 2 stages x 2 replicas, only last stages answer
             "rew_inf.parallel.data_parallel_size=2", "rew_inf.parallel.pipeline_parallel_size=2"]
    return args


def test_sentiment_interface_scores_only_the_answer(example):
    import torch

    from realhf.api.core.data_api import SequenceSample, load_hf_tokenizer

    tok = load_hf_tokenizer(TINY)
    model = model_api.Model(name="reward", module=None, tokenizer=tok)
    prompt = tok("This movie was terrible.", add_special_tokens=False)["input_ids"]
    good = tok(" I love it, wonderful and great!", add_special_tokens=False)["input_ids"]
    bad = tok(" Awful, I hate it.", add_special_tokens=False)["input_ids"]
    seqs = [prompt + good, prompt + bad]
    masks = [[True] * len(prompt) + [False] * len(good), [True] * len(prompt) + [False] * len(bad)]
    sample = SequenceSample.from_default(
        ids=["a", "b"], seqlens=[len(s) for s in seqs],
        data=dict(packed_input_ids=torch.tensor(sum(seqs, [])), prompt_mask=torch.tensor(sum(masks, []))))
    out = example.SentimentScoringInterface().inference(model, sample)
    assert out.ids == ["a", "b"] and out.seqlens["rewards"] == [[1], [1]]
    r = out.data["rewards"].tolist()
    assert r[0] > 0.5 and r[1] < -0.5  # the negative prompt is not scored


def test_example_ppo_sentiment_runs(example, tmp_path):
    import realhf

    # The documented form: a subclass of realhf.PPOConfig (the registered ``ppo`` experiment).
    assert example.MyPPOConfig.__bases__ == (realhf.PPOConfig,)
    config = parse_quickstart("my-ppo", _args(steps=2))
    assert isinstance(config, example.MyPPOConfig)
    cfg = config.initial_setup()
    rew_shards = [s for mw in cfg.model_worker for s in mw.shards if s.id.model_name.role == "reward"]
    assert len(rew_shards) == 4
    assert all(s.model.type_ == "tokenizer" and s.backend.type_ == "null" for s in rew_shards)
    rew = next(r for r in cfg.model_rpcs if r.model_name.role == "reward")
    assert rew.interface_impl.type_ == "sentiment_scoring"
    assert "prompt_mask" in rew.input_keys and not rew.post_hooks
    # A launched run unpickles the config in fresh worker processes: the interface survives it.
    back = pickle.loads(pickle.dumps(rew.interface_impl))
    assert back.type_ == "sentiment_scoring" and back.args == rew.interface_impl.args

    history = run_with_pipes(cfg, "ppo-sentiment", "t", timeout=120, fileroot=str(tmp_path)).history
    assert len(history) == 2
    for step in history:
        r = step.stats["actor_train"]["task_reward"]
        assert math.isfinite(r) and -1.0 <= r <= 1.0, r


@pytest.mark.slow
def test_sentiment_reward_rises_from_an_sft_actor(tmp_path):
    # The demo's SFT stage, then the example's documented learning run through the CLI.
    # Measured on 2 CPU cores: mean reward per 10 steps 0.04 0.05 0.13 0.24 0.32 0.59 0.70 0.65.
    import json
    import statistics
    import subprocess

    from realhf.apps import demo

    # A script's own folder, not the working directory, starts sys.path: point it at this checkout.
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    settings = demo.DemoSettings(trial="sentiment")
    sft = subprocess.run([sys.executable, "-m", "realhf.apps.quickstart", "sft", *demo.sft_args(settings)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    ckpt = next(os.scandir(os.path.join(tmp_path, "checkpoints", _user(), "demo-sft", "sentiment", "default"))).path
    args = ["experiment_name=ppo-sentiment", "trial_name=learn", "n_gpus_per_node=4", "allocation_mode=heuristic",
            f"actor.path={ckpt}", f"ref.path={ckpt}", f"critic.path={ckpt}", "critic.init_critic_from_actor=True",
            f"rew.path={TINY}", "rew.init_from_scratch=True", f"dataset.path={DATA}/sft-train.jsonl",
            "dataset.train_bs_n_seqs=32", "dataset.max_prompt_len=64", "ppo.gen.max_new_tokens=24",
            "ppo.gen.min_new_tokens=4", "ppo.kl_ctl=0.01", "ppo.ppo_n_minibatches=2", "actor.optimizer.lr=5e-4",
            "actor.optimizer.lr_scheduler_type=constant", "critic.optimizer.lr=1e-3",
            "exp_ctrl.benchmark_steps=80", "exp_ctrl.total_train_epochs=2"]
    ppo = subprocess.run([sys.executable, EXAMPLE, "my-ppo", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert ppo.returncode == 0, ppo.stdout[-3000:] + ppo.stderr[-3000:]
    path = os.path.join(tmp_path, "logs", _user(), "ppo-sentiment", "learn", "stats.jsonl")
    rewards = [r["stats"]["actor_train"]["task_reward"] for r in map(json.loads, open(path)) if "stats" in r]
    assert len(rewards) == 80
    assert statistics.mean(rewards[-10:]) > statistics.mean(rewards[:10]) + 0.2, rewards


def _user():
    from realhf.base import constants

    return constants.get_user()
