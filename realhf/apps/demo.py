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

``python -m realhf.apps.demo --rl grpo`` runs SFT and then, instead of RW
and PPO, ``grpo`` from the SFT checkpoint on the embedded math prompts with
the rule reward (the final answer checked against the prompt's ``answer``
field; no reward model, no critic). It saves the actor every
``--eval-every`` steps and measures each checkpoint's exact-match accuracy
on the held-out prompts (``prompt-valid``, answers checked by
:func:`realhf.impl.reward.math_verify.math_reward`) twice: greedy, and as
the mean over ``--eval-samples`` answers sampled at the GRPO temperature
(the policy GRPO trains). It then prints the curve: step, mean training
reward, greedy and sampled held-out accuracy. SFT runs
``--grpo-sft-steps`` steps (1000: after the PPO path's 300 steps the model
answers 4.5% of the held-out prompts, too few correct samples for GRPO);
``--sft-checkpoint DIR`` skips SFT and starts GRPO from ``DIR``.
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
    # --rl grpo: SFT (grpo_sft_steps) -> GRPO on the math prompts, held-out accuracy every eval_every steps.
    rl: str = "ppo"
    grpo_sft_steps: int = 1000
    grpo_steps: int = 100
    grpo_prompts: int = 64
    group_size: int = 8
    grpo_new_tokens: int = 40
    grpo_temperature: float = 0.5
    grpo_lr: float = 1.25e-4
    grpo_minibatches: int = 4
    eval_every: int = 20
    eval_prompts: int = 200
    eval_samples: int = 8
    sft_checkpoint: str = ""


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


def grpo_args(s: DemoSettings, sft_ckpt: str) -> List[str]:
    # Sampling from the full vocabulary (no top-k/top-p: no logits mask to ship), the learning
    # rate warmed up over the first 20% of the steps (Adam's first steps on noisy policy
    # gradients are full-size); the math rule reward runs in the reward workers' own process
    # (it only parses the decoded answers).
    return _common("demo-grpo", s, s.grpo_steps, "prompt-train", s.grpo_prompts) + [
        f"actor.path={sft_ckpt}", f"actor.optimizer.lr={s.grpo_lr}", "actor.optimizer.lr_scheduler_type=constant",
        "actor.optimizer.warmup_steps_proportion=0.2", f"dataset.path={dataset_path('prompt-train')}",
        "dataset.max_prompt_len=64", f"dataset.train_bs_n_seqs={s.grpo_prompts}",
        f"grpo.group_size={s.group_size}", f"grpo.n_minibatches={s.grpo_minibatches}",
        f"grpo.gen.max_new_tokens={s.grpo_new_tokens}",
        "grpo.gen.min_new_tokens=1", f"grpo.gen.temperature={s.grpo_temperature}", "grpo.gen.top_p=1.0",
        "grpo.gen.top_k=1000000",
        "rule_reward.reward=math", "rule_reward.n_workers=0", f"exp_ctrl.save_freq_steps={s.eval_every}",
        "allocation_mode=heuristic"]


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


def step_checkpoints(exp: str, trial: str, role: str) -> Dict[int, str]:
    """Global step -> checkpoint directory of ``role``, for every save of a finished experiment."""
    pattern = os.path.join(constants.get_save_path(exp, trial), role, "epoch*globalstep*")
    return {int(d.rsplit("globalstep", 1)[1]): d for d in glob.glob(pattern)}


def heldout_accuracy(ckpt: str, n_prompts: int, max_new_tokens: int, dataset: str = "prompt-valid",
                     batch_size: int = 50, samples: int = 0, temperature: float = 1.0, seed: int = 1) -> float:
    """Exact-match accuracy of answers to the first ``n_prompts`` prompts of ``dataset``.

    Runs in this process, after the workers are gone: the checkpoint is loaded
    as a ReaLModel, answers are decoded with the KV cache and checked against
    each record's ``answer`` with the math rule reward. ``samples=0`` decodes
    one greedy answer per prompt; ``samples=k`` draws k answers per prompt at
    ``temperature`` (the policy as GRPO samples it, seeded) and returns
    their mean accuracy.
    """
    import torch

    import realhf.impl.model  # noqa: F401  (attaches ReaLModel.from_<family>)
    from realhf.api.core.data_api import load_hf_tokenizer
    from realhf.api.core.model_api import GenerationHyperparameters
    from realhf.impl.model.nn.real_llm_api import ReaLModel
    from realhf.impl.model.nn.real_llm_generate import generate
    from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
    from realhf.impl.reward.math_verify import math_reward

    with open(dataset_path(dataset)) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = records[:n_prompts] if n_prompts > 0 else records
    with open(os.path.join(ckpt, "config.json")) as f:
        family = json.load(f)["model_type"]
    tokenizer = load_hf_tokenizer(ckpt)
    model = getattr(ReaLModel, f"from_{family}")(ckpt)
    model.eval()
    if samples > 0:
        gconfig = GenerationHyperparameters(max_new_tokens=max_new_tokens, min_new_tokens=0, temperature=temperature,
                                            top_p=1.0, top_k=10**9)
    else:
        gconfig = GenerationHyperparameters(max_new_tokens=max_new_tokens, min_new_tokens=0, greedy=True)
    per_prompt = max(samples, 1)
    generator = torch.Generator().manual_seed(seed)
    correct = 0.0
    for i in range(0, len(records), batch_size):
        chunk = [r for r in records[i:i + batch_size] for _ in range(per_prompt)]
        prompts = tokenizer([r["prompt"] for r in chunk])["input_ids"]
        with torch.no_grad():
            out = generate(model, torch.tensor([t for p in prompts for t in p], dtype=torch.long),
                           cu_seqlens_from_lengths([len(p) for p in prompts]), gconfig,
                           eos_token_id=tokenizer.eos_token_id, generator=generator)
        cu = out.cu_gen_lengths.tolist()
        for j, r in enumerate(chunk):
            answer = tokenizer.decode(out.gen_tokens[cu[j]:cu[j + 1]].tolist(), skip_special_tokens=True)
            correct += math_reward(answer, r["answer"])
    return correct / (len(records) * per_prompt)


def grpo_curve(s: DemoSettings, sft_ckpt: str) -> List[Dict[str, float]]:
    """Rows (step, mean training reward over the steps since the previous row, held-out accuracy)."""
    rewards = [r["stats"]["actor_train"]["task_reward"] for r in step_records("demo-grpo", s.trial) if "stats" in r]
    ckpts = {0: sft_ckpt, **step_checkpoints("demo-grpo", s.trial, "actor")}
    rows, prev = [], 0
    for step in sorted(ckpts):
        window = rewards[prev:step]
        acc = heldout_accuracy(ckpts[step], s.eval_prompts, s.grpo_new_tokens)
        sampled = heldout_accuracy(ckpts[step], s.eval_prompts, s.grpo_new_tokens, samples=s.eval_samples,
                                   temperature=s.grpo_temperature, seed=s.seed)
        rows.append({"step": step, "train_reward": statistics.mean(window) if window else float("nan"),
                     "heldout_acc": acc, "heldout_sampled_acc": sampled})
        print(f"[demo] step {step:4d}: held-out accuracy {acc:.3f} (greedy), {sampled:.3f} (sampled)", flush=True)
        prev = step
    return rows


def run_grpo(s: DemoSettings) -> Dict[str, object]:
    """SFT (unless --sft-checkpoint), then GRPO with the math rule reward; the held-out accuracy curve."""
    exps = ("demo-grpo",) if s.sft_checkpoint else ("demo-sft", "demo-grpo")
    for exp in exps:
        _clear_trial(exp, s.trial)
    t0 = time.time()
    if s.sft_checkpoint:
        sft_ckpt = os.path.abspath(s.sft_checkpoint)
    else:
        quickstart("sft", sft_args(dataclasses.replace(s, sft_steps=s.grpo_sft_steps)))
        sft_ckpt = latest_checkpoint("demo-sft", s.trial)
    quickstart("grpo", grpo_args(s, sft_ckpt))
    t_eval = time.time()
    rows = grpo_curve(s, sft_ckpt)
    n_eval = s.eval_prompts if s.eval_prompts > 0 else "all"
    print(f"\n[demo] GRPO curve (held-out: exact match on {n_eval} prompt-valid prompts, greedy and the mean of "
          f"{s.eval_samples} samples at temperature {s.grpo_temperature}; train reward: mean task reward of the "
          f"steps since the previous row)")
    print(f"[demo] {'step':>5} {'train reward':>13} {'held-out acc':>13} {'sampled acc':>13}")
    for r in rows:
        print(f"[demo] {r['step']:5d} {r['train_reward']:13.3f} {r['heldout_acc']:13.3f} "
              f"{r['heldout_sampled_acc']:13.3f}")
    before, after = rows[0]["heldout_acc"], rows[-1]["heldout_acc"]
    print(f"[demo] GRPO held-out accuracy before: {before:.3f}")
    print(f"[demo] GRPO held-out accuracy after:  {after:.3f}")
    sampled_before, sampled_after = rows[0]["heldout_sampled_acc"], rows[-1]["heldout_sampled_acc"]
    print(f"[demo] GRPO held-out sampled accuracy before: {sampled_before:.3f}")
    print(f"[demo] GRPO held-out sampled accuracy after:  {sampled_after:.3f}")
    print(f"[demo] evaluation {time.time() - t_eval:.0f} s, total {time.time() - t0:.0f} s", flush=True)
    return {"acc_before": before, "acc_after": after, "sampled_acc_before": sampled_before,
            "sampled_acc_after": sampled_after, "curve": rows}


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
    if s.rl not in ("ppo", "grpo"):
        p.error(f"--rl {s.rl!r}: choose ppo (SFT -> RW -> PPO) or grpo (SFT -> GRPO with the math rule reward)")
    if s.rl == "grpo":
        run_grpo(s)
    else:
        run(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
