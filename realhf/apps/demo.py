"""The embedded demo: SFT, then reward modeling, then PPO, on the bundled assets.

``python -m realhf.apps.demo`` runs three quickstart experiments one after
the other, each launched exactly as a user would launch it
(``python -m realhf.apps.quickstart <experiment> key=value ...``, printed
before it starts) with local worker processes:

1. ``sft``: a tiny llama (``realhf/assets/models/tiny-llama``, initialized
   from scratch) learns the embedded math and Austen answers;
2. ``rw``: a reward model initialized from the SFT checkpoint learns the
   embedded preference pairs and reports its held-out pair accuracy;
3. ``ppo``: the SFT model as actor and reference, the reward model as critic
   and reward, on the embedded math prompts; ``heuristic`` allocation, so
   generation runs on its own layout (parameters reallocated before and
   after it) and the frozen models are offloaded between their calls.

It prints the held-out reward-model accuracy and the mean reward of the
first and last PPO steps. Checkpoints and logs go under the usual file root
(``REAL_FILEROOT``, default ``~/.cache/realhf``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from realhf.assets import dataset_path
from realhf.base import constants

TINY_LLAMA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "models",
                          "tiny-llama")


@dataclasses.dataclass
class DemoSettings:
    """Sizes of the three stages; the defaults fit in a few minutes on 2 CPU cores."""

    workers: int = 4
    trial: str = "demo"
    sft_steps: int = 300
    rw_steps: int = 300
    ppo_steps: int = 100
    ppo_prompts: int = 32
    new_tokens: int = 48
    seed: int = 1


def _common(exp: str, s: DemoSettings, steps: int, dataset: str, batch_size: int) -> List[str]:
    # Just enough epochs for ``steps`` steps, so learning-rate schedules span the run.
    with open(dataset_path(dataset)) as f:
        n_records = sum(1 for line in f if line.strip())
    epochs = math.ceil(steps / (n_records // batch_size))
    return [f"experiment_name={exp}", f"trial_name={s.trial}", f"n_gpus_per_node={s.workers}", f"seed={s.seed}",
            f"exp_ctrl.benchmark_steps={steps}", f"exp_ctrl.total_train_epochs={epochs}"]


def sft_args(s: DemoSettings) -> List[str]:
    return _common("demo-sft", s, s.sft_steps, "sft-train", 16) + [
        f"model.path={TINY_LLAMA}", "model.init_from_scratch=True", "model.optimizer.lr=2e-3",
        "model.optimizer.warmup_steps_proportion=0.05", f"dataset.train_path={dataset_path('sft-train')}",
        "dataset.max_seqlen=256", "dataset.train_bs_n_seqs=16", "allocation_mode=d2p1m2"]


def rw_args(s: DemoSettings, sft_ckpt: str) -> List[str]:
    return _common("demo-rw", s, s.rw_steps, "rw_pair-train", 16) + [
        f"model.path={sft_ckpt}", "model.init_critic_from_actor=True", "model.optimizer.lr=1e-3",
        "model.optimizer.warmup_steps_proportion=0.05", f"dataset.train_path={dataset_path('rw_pair-train')}",
        f"dataset.valid_path={dataset_path('rw_pair-valid')}", "dataset.max_seqlen=160",
        "dataset.max_pairs_per_prompt=8", "dataset.train_bs_n_seqs=16", f"exp_ctrl.eval_freq_steps={s.rw_steps}",
        f"allocation_mode=d{s.workers}p1m1"]


def ppo_args(s: DemoSettings, sft_ckpt: str, rw_ckpt: str) -> List[str]:
    return _common("demo-ppo", s, s.ppo_steps, "prompt-train", s.ppo_prompts) + [
        f"actor.path={sft_ckpt}", f"ref.path={sft_ckpt}", f"critic.path={rw_ckpt}", f"rew.path={rw_ckpt}",
        "actor.optimizer.lr=2e-4", "critic.optimizer.lr=1e-3", "actor.optimizer.lr_scheduler_type=constant",
        "critic.optimizer.lr_scheduler_type=constant", f"dataset.path={dataset_path('prompt-train')}",
        "dataset.max_prompt_len=64", f"dataset.train_bs_n_seqs={s.ppo_prompts}",
        f"ppo.gen.max_new_tokens={s.new_tokens}", "ppo.gen.min_new_tokens=1", "ppo.ppo_n_minibatches=2",
        "ppo.kl_ctl=0.05", "allocation_mode=heuristic"]


def quickstart(exp_type: str, args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", exp_type, *args]
    print(f"\n$ python -m realhf.apps.quickstart {exp_type} " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.time()
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise SystemExit(f"demo: the {exp_type} stage failed (exit {res.returncode}); see its log above.")
    print(f"[demo] {exp_type} finished in {time.time() - t0:.0f} s", flush=True)


def latest_checkpoint(exp: str, trial: str) -> str:
    """The checkpoint written at the last step of a finished experiment."""
    pattern = os.path.join(constants.get_save_path(exp, trial), "*", "epoch*globalstep*")
    found = sorted(glob.glob(pattern), key=lambda d: int(d.rsplit("globalstep", 1)[1]))
    if not found:
        raise SystemExit(f"demo: no checkpoint matches {pattern}")
    return found[-1]


def step_records(exp: str, trial: str) -> List[Dict]:
    path = os.path.join(constants.get_log_path(exp, trial), "stats.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ppo_rewards(exp: str, trial: str) -> List[float]:
    """Mean reward-model score of each PPO step's generated answers."""
    return [r["stats"]["actor_train"]["task_reward"] for r in step_records(exp, trial) if "stats" in r]


def rw_accuracy(exp: str, trial: str) -> Optional[float]:
    evals = [r["eval"] for r in step_records(exp, trial) if "eval" in r]
    return next(iter(evals[-1].values()))["acc"] if evals else None


def _clear_trial(exp: str, trial: str) -> None:
    """A rerun of the demo starts fresh instead of resuming the previous run's checkpoints."""
    for root in (constants.get_save_path(exp, trial), constants.get_log_path(exp, trial),
                 constants.get_recover_path(exp, trial)):
        shutil.rmtree(root, ignore_errors=True)


def run(s: DemoSettings) -> Dict[str, object]:
    for exp in ("demo-sft", "demo-rw", "demo-ppo"):
        _clear_trial(exp, s.trial)
    t0 = time.time()
    quickstart("sft", sft_args(s))
    sft_ckpt = latest_checkpoint("demo-sft", s.trial)
    quickstart("rw", rw_args(s, sft_ckpt))
    rw_ckpt = latest_checkpoint("demo-rw", s.trial)
    acc = rw_accuracy("demo-rw", s.trial)
    quickstart("ppo", ppo_args(s, sft_ckpt, rw_ckpt))
    rewards = ppo_rewards("demo-ppo", s.trial)
    k = max(1, min(10, len(rewards) // 4))
    start, end = statistics.mean(rewards[:k]), statistics.mean(rewards[-k:])
    windows = [statistics.mean(rewards[i:i + k]) for i in range(0, len(rewards), k)]
    if acc is not None:
        print(f"\n[demo] reward model held-out pair accuracy: {acc:.3f}")
    print(f"[demo] PPO mean reward, first {k} steps: {start:.3f}")
    print(f"[demo] PPO mean reward, last {k} steps:  {end:.3f}")
    print(f"[demo] PPO mean reward per {k} steps: " + " ".join(f"{w:.2f}" for w in windows))
    print(f"[demo] total {time.time() - t0:.0f} s", flush=True)
    return {"rw_acc": acc, "reward_start": start, "reward_end": end, "rewards": rewards}


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = DemoSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(DemoSettings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    s = DemoSettings(**vars(p.parse_args(argv)))
    run(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
