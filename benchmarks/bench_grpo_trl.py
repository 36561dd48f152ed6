"""GRPO samples/s of our system next to TRL's ``GRPOTrainer``, in one run.

Both sides train the same workload on the compute-bound shape of
``benchmarks/_shape.py``: one llama of hidden 256, SwiGLU width 688, 4 layers,
4 query / 2 key-value heads and a 1024-id vocabulary as the policy, randomly
initialized from one config and in fp32; 16 prompts of 10..28 tokens
(``_shape.write_prompts``, all of them in every step) with 4 samples per
prompt (group size 4), so 64 samples per step; exactly 32 new tokens per
sample (EOS can end neither a sample nor the batch early); plain sampling at
temperature 1 (no top-k, no top-p); the same cheap rule reward on the
decoded completion (:func:`completion_reward`, the fraction of its
characters that are vowels); no reference model (no KL term); advantages
are the group-normalized rewards (mean and std over the 4 samples of a
prompt); one optimizer step per step over all 64 samples with the
token-mean loss (the per-token clipped losses summed over every answer
token of the batch, divided by their number); no gradient checkpointing; no
vLLM.

* ``ours``: the ``grpo`` quickstart experiment through
  ``realhf.system.pipe_runner.run_with_pipes`` with forked worker processes
  of one torch thread each; the reward is the ``rule_reward`` interface with
  ``{name: custom, path: <this file>, function: completion_reward}`` scored
  in the worker's own process (``rule_reward.n_workers=0``),
  ``grpo.adv_estimator=grpo``, ``grpo.loss_agg_mode=token-mean``,
  ``grpo.kl_ctl=0 grpo.kl_loss_coef=0`` (so no ``ref_inf``),
  ``grpo.n_minibatches=1``. Layouts (``--layouts``):

  - ``dp2``: 2 workers (one per core), every call data-parallel over both;
  - ``gen2_train1``: 2 workers, generation and reward data-parallel over
    both, training on worker 0 alone (generation then runs on a second
    actor replica that is filled from the trained one before ``actor_gen``
    and dropped after it);
  - ``one``: 1 worker for every call (a single core; for reference).

  A step is the master's step time (``master.history``); the table under
  the ratios is the per-call timeline of our median step (each call's start
  and end on the workers' clocks, relative to the step's start, and the time
  of its parameter reallocation hooks and input transfers).
* ``trl``: ``trl.GRPOTrainer`` of ``trl==1.16.0``, imported from a separate
  directory (``--trl-dir``, or the environment variable
  ``REALHF_BENCH_TRL116_DIR``; default ``benchmarks/results/.trl116``, which
  git ignores) that is put in front of ``PYTHONPATH`` of a fresh Python
  process started after ours has finished, so the ``trl`` installed in
  site-packages stays untouched. Each process runs on the CPU with
  ``torch.set_num_threads(n)`` for each ``n`` of ``--trl-threads`` (2, then
  1: ``ratio_2t`` compares with all cores, ``ratio_1t`` with one core, the
  per-core comparison for ``ours (one)``); the policy is ``LlamaForCausalLM`` built from
  the same ``config.json`` with a fixed seed. ``GRPOConfig``:
  ``per_device_train_batch_size=64, num_generations=4,
  gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1``
  (one generation of 16 prompts x 4 samples and one optimizer update per
  step), ``max_completion_length=32`` and ``generation_kwargs={"min_new_tokens":
  32}`` (``transformers`` masks EOS until 32 tokens are out), ``temperature=1,
  top_p=1, top_k=0``, ``beta=0`` (no reference model), the default
  ``loss_type="dapo"`` (normalized by the number of answer tokens of the
  whole accumulated batch, which with one micro-batch is our token-mean),
  the default ``scale_rewards="group"``, ``gradient_checkpointing=False``
  (TRL's default is on), ``use_cpu=True``, fp32, ``reward_funcs=[callable]``
  calling :func:`completion_reward` on each decoded completion. A step
  lasts from one ``on_step_end`` callback to the next (the first from
  ``on_train_begin``). The child also times its phases by wrapping methods
  of the trainer (``model.generate``; ``_generate_and_score_completions``
  for the whole rollout, of which the reward function; ``compute_loss`` for
  the training forward and loss; ``training_step`` minus those for the
  backward pass; the rest of the step is the optimizer, scheduler, logging
  and data loading), shown in a second table; ``--profile-trl`` adds an
  untimed run of the child under ``cProfile`` and prints its top functions.

After both sides, the machine's limit (``_roofline.py``): the matmul FLOPs
of generation and training at this step's token counts (each prompt counted
once per group of 4: its activations are the same for every sample of the
group; ours computes them once, in generation by prefilling a run of equal
prompts once and in training by packing a group as a prefix tree, TRL once
per sample; the training forward's products counted as done by the
generation, whose decoding computed them and whose outputs the training
forward replays, ``realhf/impl/model/nn/linear_replay.py``: the training
call's matmuls are its backward's), this machine's
matmul rate at those shapes with both cores busy, the floor (matmul
core-seconds over 2 cores) and each system's step as a multiple of it; TRL's
step over the floor is the highest ratio any system could reach over TRL here.

Each side runs ``--steps`` steps (6; ``--quick``: 3 steps of 8 prompts x 4
samples x 8 tokens) per round, in ``--rounds`` rounds (3; ``--quick``: 1)
that alternate which side goes first: this machine's speed drifts by 10-40%
over tens of seconds, and alternating rounds give both sides the same mix of
phases. The table gives the median step over steps 2.. of every round (the
first step of a round includes start-up work), samples/s = samples per step
/ median step, and ``ratio_<n>t`` = ours samples/s / samples/s of TRL with
``n`` threads; a second table gives each round's ratios. Results go to
``benchmarks/results/bench_grpo_trl.json`` (``bench_grpo_trl_quick.json`` for
``--quick``) with the versions, thread counts, load averages, every step's
timeline and TRL's phase times.

Run ``python benchmarks/bench_grpo_trl.py`` (a few minutes on 2 cores). TRL
1.16 is not a dependency of this project; when its directory is missing the
script prints the install command and exits. Install it beside the
installed packages (its other requirements, accelerate, datasets,
huggingface_hub, jinja2, pandas, psutil, pyarrow, pyyaml and transformers,
come from site-packages)::

    pip install --no-deps --target benchmarks/results/.trl116 "trl==1.16.0"

Differences that remain between the two setups:

* Threads: ours runs single-threaded worker processes (plus a master that
  mostly waits) on the 2 cores, TRL one process with 2 threads (or 1). The
  two threads of one TRL process meet at the end of every operator, so when
  other processes hold the cores a 2-thread TRL step slows down far more
  than single-threaded processes do; compare the ``trl (2 threads)`` and
  ``trl (1 threads)`` rows and the load averages before reading a ratio.
* Padding and shared prompts: ours packs sequences without padding and
  computes each prompt once per group (see above); TRL left-pads the prompts
  of the batch to the longest one (28 tokens) and runs generation and the
  training forward/backward over 64 padded rows of 28 + 32 positions.
* Generation: ours uses its own KV-cache decoding split over the generation
  layout; TRL calls ``transformers``' ``generate`` on all 64 rows at once.
* Old log-probabilities: ours takes them from generation; TRL, with one
  optimizer step per generation, uses the detached log-probabilities of the
  training forward (a ratio of exactly 1). Neither side runs an extra
  inference pass for them.
* Rewards: the same function; ours calls it from the reward call on the
  workers (over each worker's share of the batch), TRL in its rollout.
* Optimizer details (schedule, weight decay, gradient clipping) follow each
  system's defaults and cost little next to the model calls; the learning
  rate is TRL's default on both sides (``LR``).
* TRL also decodes the prompts and completions for logging and gathers
  metrics every step; ours computes its statistics on the workers.
* Data order differs (each side shuffles with its own seed); every step sees
  all prompts, so the work per step is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shape  # noqa: E402
from _common import print_table, write_json  # noqa: E402
from _rl_bench import (loadavg, median_step, mesh_args, prompt_lengths, prompt_workload, round_order,  # noqa: E402
                       steady, timeline_rows)
from _roofline import print_limit, ratio_bound, roofline, roofline_rows  # noqa: E402

TRL_VERSION = "1.16.0"
TRL_DIR_ENV = "REALHF_BENCH_TRL116_DIR"
DEFAULT_TRL_DIR = Path(__file__).resolve().parent / "results" / ".trl116"
MAX_PROMPT_LEN = 64
GROUP_SIZE = 4
LR = 1e-6
SEED = 1
CALLS = ["fetch", "actor_gen", "rew_inf", "actor_train"]
# What each call computes, for the machine's limit (``_roofline``); the rule reward does no matmuls.
# The training forward replays the generation's products (linear_replay): its matmuls are the backward's.
CALL_KINDS = {"actor_gen": "generate", "actor_train": "replayed_train_logprobs"}
# layout -> (number of workers, {call: mesh ranks}); a mesh of all workers runs data parallel.
LAYOUTS = {
    "dp2": (2, {c: [0, 1] for c in CALLS[1:]}),
    "gen2_train1": (2, {"actor_gen": [0, 1], "rew_inf": [0, 1], "actor_train": [0]}),
    "one": (1, {c: [0] for c in CALLS[1:]}),
}
VOWELS = frozenset("aeiouAEIOU")


def completion_reward(prompt: str, completion: str, **metadata: Any) -> float:
    """The rule reward of both sides: the fraction of the completion's characters that are vowels."""
    return sum(ch in VOWELS for ch in completion) / max(1, len(completion))


def install_command(trl_dir: Path) -> str:
    return f'pip install --no-deps --target {trl_dir} "trl=={TRL_VERSION}"'


def trl_env(trl_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(trl_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(var, "1")
    return env


def trl_missing(trl_dir: Path) -> Optional[str]:
    """Why the TRL half cannot run, or None when it can (checked in a child with the TRL directory first)."""
    if not (trl_dir / "trl" / "__init__.py").is_file():
        return f"no trl in {trl_dir}"
    probe = ("import trl, sys; from trl import GRPOConfig, GRPOTrainer; "
             "print(trl.__version__); print(trl.__file__)")
    res = subprocess.run([sys.executable, "-c", probe], env=trl_env(trl_dir), capture_output=True, text=True)
    if res.returncode != 0:
        return f"importing trl from {trl_dir} failed: {res.stderr.strip().splitlines()[-1:]}"
    got, where = (res.stdout.strip().splitlines() + ["", ""])[:2]
    if got != TRL_VERSION:
        return f"the trl imported with {trl_dir} first is {got} ({where}), not {TRL_VERSION}"
    if not Path(where).resolve().is_relative_to(trl_dir.resolve()):
        return f"trl was imported from {where}, not from {trl_dir}"
    return None


# --------------------------------------------------------------------------- #
# Ours
# --------------------------------------------------------------------------- #
def grpo_args(layout: str, steps: int, n_prompts: int, new_tokens: int, files: Dict[str, Path]) -> List[str]:
    n_workers, meshes = LAYOUTS[layout]
    reward = f"rule_reward.reward=[{{name: custom, path: {Path(__file__).resolve()}, function: completion_reward}}]"
    args = ["experiment_name=bench-grpo-trl", f"trial_name={layout.replace('_', '-')}", f"n_gpus_per_node={n_workers}",
            "allocation_mode=manual", f"dataset.path={files['prompts']}", f"dataset.train_bs_n_seqs={n_prompts}",
            f"dataset.max_prompt_len={MAX_PROMPT_LEN}", f"grpo.group_size={GROUP_SIZE}",
            f"grpo.gen.max_new_tokens={new_tokens}", f"grpo.gen.min_new_tokens={new_tokens}",
            "grpo.gen.temperature=1.0", "grpo.gen.top_p=1.0", f"grpo.gen.top_k={_shape.VOCAB_SIZE}",
            "grpo.adv_estimator=grpo", "grpo.loss_agg_mode=token-mean", "grpo.kl_ctl=0.0", "grpo.kl_loss_coef=0.0",
            "grpo.n_minibatches=1", f"exp_ctrl.benchmark_steps={steps}", f"exp_ctrl.total_train_epochs={steps}",
            f"actor.path={files['model']}", "actor.init_from_scratch=True", "actor.gradient_checkpointing=False",
            f"actor.optimizer.lr={LR}", "rule_reward.n_workers=0", reward]
    return args + mesh_args(meshes, n_workers)


def run_ours(layout: str, steps: int, n_prompts: int, new_tokens: int, files: Dict[str, Path]) -> List[Dict[str, Any]]:
    import realhf.experiments  # noqa: F401
    from realhf.api.quickstart.entrypoint import parse_quickstart
    from realhf.system.pipe_runner import run_with_pipes

    cfg = parse_quickstart("grpo", grpo_args(layout, steps, n_prompts, new_tokens, files)).initial_setup()
    with tempfile.TemporaryDirectory() as root:
        master = run_with_pipes(cfg, "bench-grpo-trl", layout.replace("_", "-"), timeout=900, fileroot=root)
    keep = ("n_seqs", "avg_gen_len", "no_eos_ratio", "task_reward", "n_updates")
    return [{"seconds": h.seconds, "timing": h.timing,
             "train_stats": {k: v for k, v in h.stats.get("actor_train", {}).items() if k in keep}}
            for h in master.history]


# --------------------------------------------------------------------------- #
# TRL (runs in a child process with trl 1.16 first on the path)
# --------------------------------------------------------------------------- #
class _PhaseClock:
    """Seconds spent in wrapped callables, accumulated per step."""

    def __init__(self) -> None:
        self.current: Dict[str, float] = {}
        self.steps: List[Dict[str, float]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def close_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}


def run_trl(steps: int, n_prompts: int, new_tokens: int, threads: int, files: Dict[str, Path],
            profile_out: Optional[str] = None) -> Dict[str, Any]:
    """Train ``steps`` GRPO steps with TRL; per-step seconds, phase seconds and generated lengths."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoConfig, LlamaForCausalLM, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    tokenizer = _shape.load_tokenizer(files["model"])
    config = AutoConfig.from_pretrained(files["model"])
    torch.manual_seed(SEED)
    policy = LlamaForCausalLM(config)
    phases = _PhaseClock()

    generated: List[Dict[str, int]] = []
    generate = policy.generate

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        sequences = out if torch.is_tensor(out) else out.sequences
        new = sequences[:, kwargs["input_ids"].shape[1]:]
        generated.append({"rows": int(new.shape[0]), "new_tokens": int(new.shape[1]),
                          "eos": int((new == tokenizer.eos_token_id).sum())})
        return out

    policy.generate = phases.wrap("generate", counting_generate)

    def reward_fn(prompts: List[str], completions: List[str], **kwargs: Any) -> List[float]:
        return [completion_reward(p, c) for p, c in zip(prompts, completions)]

    reward_fn.__name__ = "completion_reward"

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: List[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())
            phases.close_step()

    clock = StepClock()
    texts = [json.loads(line)["prompt"] for line in files["prompts"].read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as out_dir:
        grpo_config = GRPOConfig(
            output_dir=out_dir, seed=SEED, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
            dataloader_num_workers=0, max_steps=steps, learning_rate=LR,
            per_device_train_batch_size=n_prompts * GROUP_SIZE, num_generations=GROUP_SIZE,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            max_completion_length=new_tokens, generation_kwargs={"min_new_tokens": new_tokens},
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, use_vllm=False, log_completions=False,
        )
        trainer = GRPOTrainer(model=policy, reward_funcs=[phases.wrap("reward", reward_fn)], args=grpo_config,
                              train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                              callbacks=[clock])
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        for name, attr in (("rollout", "_generate_and_score_completions"), ("loss_forward", "compute_loss"),
                           ("training_step", "training_step")):
            setattr(trainer, attr, phases.wrap(name, getattr(trainer, attr)))
        setup = {"loss_type": grpo_config.loss_type, "scale_rewards": grpo_config.scale_rewards,
                 "beta": grpo_config.beta, "gradient_checkpointing": grpo_config.gradient_checkpointing,
                 "generation_batch_size": grpo_config.generation_batch_size,
                 "steps_per_generation": grpo_config.steps_per_generation,
                 "ref_model": trainer.ref_model is not None,
                 "layers_checkpointed": sum(bool(getattr(m, "gradient_checkpointing", False))
                                            for m in trainer.model.modules())}
        if profile_out:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            trainer.train()
            prof.disable()
            with open(profile_out, "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(30)
        else:
            trainer.train()
    seconds = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    phase_rows = []
    for total, ph in zip(seconds, phases.steps):
        rollout, train = ph.get("rollout", 0.0), ph.get("training_step", 0.0)
        phase_rows.append({"step_s": total, "generate_s": ph.get("generate", 0.0), "reward_s": ph.get("reward", 0.0),
                           "rollout_other_s": rollout - ph.get("generate", 0.0) - ph.get("reward", 0.0),
                           "loss_forward_s": ph.get("loss_forward", 0.0),
                           "backward_s": train - rollout - ph.get("loss_forward", 0.0),
                           "optimizer_and_rest_s": total - train})
    return {"seconds": seconds, "phases": phase_rows, "generated": generated, "threads": torch.get_num_threads(),
            "trl_version": trl.__version__, "trl_file": trl.__file__, "setup": setup}


def run_trl_subprocess(trl_dir: Path, steps: int, n_prompts: int, new_tokens: int, threads: int,
                       files: Dict[str, Path], profile_out: Optional[str] = None) -> Dict[str, Any]:
    """``run_trl`` in a fresh interpreter with ``trl_dir`` first on its path."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(out), "--steps", str(steps),
               "--prompts", str(n_prompts), "--new-tokens", str(new_tokens), "--trl-threads", str(threads),
               "--prompt-file", str(files["prompts"])]
        if profile_out:
            cmd += ["--trl-profile-out", profile_out]
        subprocess.run(cmd, check=True, env=trl_env(trl_dir))
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #
def step_row(system: str, seconds: List[float], n_samples: int, new_tokens: int) -> Dict[str, Any]:
    median = statistics.median(seconds)
    return {"system": system, "samples": n_samples, "new_tokens": new_tokens, "steps": len(seconds),
            "median_step_s": median, "samples_per_s": n_samples / median}


def trl_phase_row(phases: List[Dict[str, float]]) -> Dict[str, Any]:
    """Median of each of TRL's phases over the given steps (ms)."""
    return {k.replace("_s", "_ms"): 1e3 * statistics.median(p[k] for p in phases) for k in phases[0]}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps of 8 prompts x 4 samples x 8 new tokens (smoke run)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per side and round, the first is not timed (6)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of both sides, alternating which goes first (3; --quick: 1)")
    p.add_argument("--layouts", default="dp2,gen2_train1,one",
                   help=f"our layouts to run, comma-separated, of {sorted(LAYOUTS)}")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (16; --quick: 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per sample (32; --quick: 8)")
    p.add_argument("--trl-threads", default="2,1",
                   help="torch threads of the TRL runs, comma-separated, one run each; the first is the one the "
                        "ratio compares with (2 = all cores; 1 = per-core comparison, as 'ours (one)')")
    p.add_argument("--trl-dir", default=None,
                   help=f"directory holding trl {TRL_VERSION} (default: ${TRL_DIR_ENV} or {DEFAULT_TRL_DIR})")
    p.add_argument("--profile-trl", action="store_true",
                   help="also run TRL once more under cProfile (untimed) and print its top functions")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)  # internal: run TRL only, write JSON here
    p.add_argument("--trl-profile-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        trl_threads = [int(x) for x in str(args.trl_threads).split(",") if x]
    except ValueError:
        p.error(f"--trl-threads={args.trl_threads!r}: give comma-separated positive integers")
    if not trl_threads or min(trl_threads) < 1:
        p.error(f"--trl-threads={args.trl_threads!r}: give comma-separated positive integers")
    if args.trl_child:
        files = {"model": _shape.materialize(), "prompts": Path(args.prompt_file)}
        result = run_trl(args.steps, args.prompts, args.new_tokens, trl_threads[0], files, args.trl_profile_out)
        Path(args.trl_child).write_text(json.dumps(result))
        return {}

    trl_dir = Path(args.trl_dir or os.environ.get(TRL_DIR_ENV) or DEFAULT_TRL_DIR).resolve()
    why = trl_missing(trl_dir)
    if why is not None:
        print(f"bench_grpo_trl: skipped, {why}. To compare with TRL {TRL_VERSION}, install it into its own "
              f"directory (the trl in site-packages stays as it is):\n    {install_command(trl_dir)}",
              file=sys.stderr)
        return {}
    steps, n_prompts, new_tokens = (3, 8, 8) if args.quick else (6, 16, 32)
    steps, n_prompts, new_tokens = args.steps or steps, args.prompts or n_prompts, args.new_tokens or new_tokens
    rounds = args.rounds or (1 if args.quick else 3)
    n_samples = n_prompts * GROUP_SIZE
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        p.error(f"unknown layouts {unknown}; choose from {sorted(LAYOUTS)}")

    raw: Dict[str, Any] = {}
    load: Dict[str, Any] = {"start": loadavg()}
    rows, timeline, checks, trl_rows, phase_rows = [], [], [], [], []
    profile_text = None
    ours_keys = [f"ours_{layout}" for layout in layouts]
    trl_keys = [f"trl_{threads}t" for threads in trl_threads]
    runs: Dict[str, List[Any]] = {key: [] for key in ours_keys + trl_keys}  # per round
    with tempfile.TemporaryDirectory() as tmp:
        files = prompt_workload(n_prompts, Path(tmp))
        for r in range(rounds):
            for key in round_order(ours_keys, trl_keys, r):
                if key in ours_keys:
                    runs[key].append(run_ours(key[len("ours_"):], steps, n_prompts, new_tokens, files))
                else:
                    threads = trl_threads[trl_keys.index(key)]
                    runs[key].append(run_trl_subprocess(trl_dir, steps, n_prompts, new_tokens, threads, files))
                load[f"round{r}_after_{key}"] = loadavg()
        for layout, key in zip(layouts, ours_keys):
            raw[key] = runs[key]
            history = [h for run in runs[key] for h in run]
            rows.append(step_row(f"ours ({layout})", steady([[h["seconds"] for h in run] for run in runs[key]]),
                                 n_samples, new_tokens))
            timeline += timeline_rows(layout, history, CALLS)
            s = median_step(history)["train_stats"]
            checks.append({"system": f"ours ({layout})", "samples": s.get("n_seqs"), "new_tokens": s.get("avg_gen_len"),
                           "no_eos_ratio": s.get("no_eos_ratio"), "reward": s.get("task_reward")})
        for key in trl_keys:
            raw[key] = runs[key]
            system = f"trl ({runs[key][0]['threads']} threads)"
            trl_rows.append(step_row(system, steady([run["seconds"] for run in runs[key]]), n_samples, new_tokens))
            phase_rows.append({"system": system, **trl_phase_row(steady([run["phases"] for run in runs[key]]))})
            gen = [g for run in runs[key] for g in run["generated"]]
            checks.append({"system": system, "samples": gen[-1]["rows"] if gen else None,
                           "new_tokens": gen[-1]["new_tokens"] if gen else None,
                           "eos_in_answers": sum(g["eos"] for g in gen)})
        if args.profile_trl:
            prof_path = Path(tmp) / "trl_profile.txt"
            run_trl_subprocess(trl_dir, steps, n_prompts, new_tokens, trl_threads[0], files, str(prof_path))
            profile_text = prof_path.read_text()
        lengths = [n for n in prompt_lengths(files, MAX_PROMPT_LEN) for _ in range(GROUP_SIZE)]
    # The machine's limit at this step's shapes, each prompt computed once per group: half the
    # tokens per core in training (one minibatch, data parallel over both cores), half the samples
    # decoded per core.
    tree_tokens = sum(lengths[::GROUP_SIZE]) + n_samples * new_tokens
    limit = roofline(_shape.SHAPE, lengths, new_tokens, CALL_KINDS, train_rows=tree_tokens // 2,
                     decode_rows=max(1, n_samples // 2), group_size=GROUP_SIZE)
    load["after_roofline"] = loadavg()
    ratio_cols = [f"ratio_{t}t" for t in trl_threads]
    ratio = {col: {} for col in ratio_cols}
    for layout, row in zip(layouts, rows):
        for col, trl_row in zip(ratio_cols, trl_rows):
            row[col] = ratio[col][layout] = row["samples_per_s"] / trl_row["samples_per_s"]
    round_rows = []
    for r in range(rounds):
        trl_s = [statistics.median(steady([runs[key][r]["seconds"]])) for key in trl_keys]
        for layout, key in zip(layouts, ours_keys):
            ours_s = statistics.median(steady([[h["seconds"] for h in runs[key][r]]]))
            round_rows.append({"round": r + 1, "layout": layout, "ours_s": ours_s,
                               **{f"trl_{t}t_s": x for t, x in zip(trl_threads, trl_s)},
                               **{col: x / ours_s for col, x in zip(ratio_cols, trl_s)}})
    rows += trl_rows
    limit_rows = roofline_rows(limit, {row["system"]: row["median_step_s"] for row in rows})
    ceiling = ratio_bound(limit, trl_rows)

    print(f"\nGRPO samples/s, ours vs TRL {TRL_VERSION}, {n_prompts} prompts x {GROUP_SIZE} samples x {new_tokens} "
          f"new tokens, median over steps 2..{steps} of {rounds} round(s); ratio_<n>t = ours / trl with n threads")
    print_table(rows, ["system", "samples", "new_tokens", "median_step_s", "samples_per_s"] + ratio_cols)
    print("Each round's median steps (s) and ratios")
    print_table(round_rows)
    print("Our median step, per call (workers' clocks, ms from the step's start; hooks = parameter reallocation)")
    print_table(timeline, ["layout", "call", "ranks", "start_ms", "end_ms", "call_ms", "hooks_ms", "transfer_ms",
                           "timeline"])
    print("TRL's step, per phase (median over steps 2.., ms)")
    print_table(phase_rows)
    print("Work done (median step; ours from actor_train's statistics, TRL from its generate calls)")
    print_table(checks, ["system", "samples", "new_tokens", "no_eos_ratio", "eos_in_answers", "reward"])
    if profile_text is not None:
        print(f"TRL ({trl_threads[0]} threads) under cProfile (untimed run, cumulative time):")
        print(profile_text)
    print_limit(limit, limit_rows, ceiling)
    print(f"load average (1, 5, 15 min): {load}")

    from importlib.metadata import version

    import torch
    import transformers

    first = raw[f"trl_{trl_threads[0]}t"][0]
    setup = {
        "steps": steps, "rounds": rounds, "prompts": n_prompts, "group_size": GROUP_SIZE, "samples": n_samples,
        "new_tokens": new_tokens, "max_prompt_len": MAX_PROMPT_LEN, "lr": LR, "seed": SEED, "shape": _shape.SHAPE,
        "ours": {"threads_per_worker": 1, "layouts": {k: LAYOUTS[k] for k in layouts},
                 "loss_agg_mode": "token-mean", "adv_estimator": "grpo", "n_minibatches": 1},
        "trl": {"processes": 1, "threads": trl_threads, "dir": str(trl_dir), **first["setup"]},
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": first["trl_version"],
                "accelerate": version("accelerate"), "datasets": version("datasets")}
    name = "bench_grpo_trl_quick" if args.quick else "bench_grpo_trl"
    path = write_json(name, {"rows": rows, "ratio": ratio, "rounds": round_rows, "timeline": timeline, "trl_phases_ms": phase_rows,
                             "checks": checks, "limit": limit, "limit_rows": limit_rows,
                             "ratio_ceiling": ceiling, "raw": raw}, extra={"setup": setup, "versions": versions,
                                                                   "loadavg": load})
    print(f"wrote {path}")
    return {"rows": rows, "ratio": ratio}


if __name__ == "__main__":
    main()
