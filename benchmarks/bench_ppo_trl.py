"""PPO samples/s of our system next to TRL's ``PPOTrainer``, in one run.

Both sides train the same workload, the compute-bound shape of
``benchmarks/_shape.py``: a llama of hidden 256, SwiGLU width 688, 4 layers,
4 query / 2 key-value heads and a 1024-id vocabulary as actor, critic,
reference and reward model, all randomly initialized from one config and in
fp32; 16 prompts of 10..28 tokens (``_shape.write_prompts``, all of them in
every PPO step); exactly 32 new tokens per prompt (EOS can neither end a
sample nor an entire batch early); plain sampling at temperature 1 (no
top-k, no top-p); one PPO epoch of 2 minibatches, so 2 optimizer steps per
step; no gradient checkpointing.

* ``ours``: the ``ppo`` quickstart experiment through
  ``realhf.system.pipe_runner.run_with_pipes`` with forked worker processes
  of one torch thread each, in these layouts (``--layouts``):

  - ``dp2``: 2 workers (one per core), every call data-parallel over both;
  - ``split``: 2 workers, actor and reference model on worker 0, critic and
    reward model on worker 1; the master runs calls on the two meshes at
    the same time (reference and reward/critic inference together, actor
    and critic training together), generation uses one core;
  - ``hybrid``: as ``split``, but generation data-parallel over both
    workers (the actor's weights are moved to that layout and back each step);
  - ``balanced``: as ``hybrid``, and the reward model data-parallel over both
    workers while reference and critic inference run side by side, so both
    cores are busy in every phase;
  - ``gen2t``: as ``balanced``, but generation runs on worker 0, which
    trains the actor, with both cores (``actor_gen.cpu_threads=2``: its
    decoding kernels split every weight's columns over two threads while
    worker 1 waits for the rollout, as it must anyway), so no weights move
    between workers and each weight is read by one core per step.

  A step is the master's step time (``master.history``); the table under
  the ratios is the per-call timeline of our median step (each call's start
  and end on the workers' clocks, relative to the step's start).
* ``trl``: ``trl.experimental.ppo.PPOTrainer`` (``trl==1.12.0``, the last
  release that has it) in a fresh Python process after ours has finished,
  on the CPU with ``torch.set_num_threads(2)``. Policy and reference are
  ``LlamaForCausalLM``, value and reward model are
  ``LlamaForSequenceClassification`` (``num_labels=1``), built from the same
  ``config.json`` with a fixed seed. A step lasts from one ``on_step_end``
  callback to the next (the first from ``on_train_begin``). TRL calls
  ``gc.collect()`` twice per step: ``trl`` runs it as users do, ``trl
  (no gc.collect)`` replaces ``gc.collect`` by a no-op in its process (the
  collector still runs automatically, as in ours).

After both sides, the machine's limit (``_roofline.py``): the matmul FLOPs
of each call at this step's token counts, this machine's matmul rate at
those shapes with both cores busy, the floor (all calls' matmul core-seconds
over 2 cores) and each system's step time as a multiple of it; TRL's step
over the floor is the highest ratio any system could reach over TRL here.

Each side runs ``--steps`` steps (10; ``--quick``: 3 steps of 8 prompts x 8
tokens) per round, in ``--rounds`` rounds (3; ``--quick``: 1) that alternate
which side goes first (ours, TRL, TRL without gc.collect; then TRL, TRL
without gc.collect, ours; ...). This machine's speed drifts by 10-40% over
tens of seconds; alternating rounds give both sides the same mix of slow and
fast phases. The table gives each system's median step over steps 2.. of
every round (the first step of a round includes start-up work), samples/s =
prompts per step / median step, and ``ratio`` = ours samples/s / samples/s of
the TRL row named in the header; a second table gives each round's ratios.
Results go to ``benchmarks/results/bench_ppo_trl.json``
(``bench_ppo_trl_quick.json`` for ``--quick``) with the versions, thread
counts, load averages and every step's timeline.

Run ``python benchmarks/bench_ppo_trl.py`` (a few minutes on 2 cores). TRL is
not a dependency of this project; without it the script says what to install
and exits. Install it without letting pip replace torch::

    pip install "trl==1.12.0" accelerate datasets -c constraints.txt

where ``constraints.txt`` pins the installed ``torch`` (and ``transformers``).

Differences that remain between the two setups:

* Threads: ours runs single-threaded worker processes (plus a master that
  mostly waits) on the 2 cores, TRL one process with 2 threads.
* Padding: ours packs sequences without padding; TRL left-pads the prompts of
  a batch to the longest one and runs every model over the padded batch.
* Models per step: ours runs actor, critic, reference and reward model as
  separate calls and trains actor and critic with separate optimizers; TRL
  trains policy and value model together (one forward each, one summed loss,
  one AdamW over both) and computes the values for GAE while scoring.
* Generation: ours uses its own KV-cache decoding split over the generation
  layout; TRL calls ``transformers``' ``generate`` on the whole batch and also
  keeps the full-vocabulary scores of every step. TRL would treat a sampled
  pad token (id 0) as the end of a response for the loss masks; with random
  weights this is rare and does not change the work done.
* Rewards: both score the full sequence with a randomly initialized scalar
  head; TRL reads the score at the last non-pad token, ours at the last token.
* Algorithm details (KL estimator, reward/advantage normalization, value
  normalization, learning rates and schedules) follow each system's defaults;
  they cost little next to the model calls.
* Data order differs (each side shuffles with its own seed); every step sees
  all 16 prompts, so the work per step is the same.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shape  # noqa: E402
from _common import print_table, write_json  # noqa: E402
from _rl_bench import (loadavg, mesh_args, prompt_lengths, prompt_workload, round_order, steady,  # noqa: E402
                       timeline_rows)
from _roofline import print_limit, ratio_bound, roofline, roofline_rows  # noqa: E402

TRL_VERSION = "1.12.0"
INSTALL_HINT = (f'pip install "trl=={TRL_VERSION}" accelerate datasets  '
                "(keep the installed torch: add --no-deps or a constraints file pinning torch)")
MAX_PROMPT_LEN = 64
N_MINIBATCHES = 2
PPO_EPOCHS = 1
SEED = 1
CALLS = ["fetch", "actor_gen", "ref_inf", "rew_inf", "critic_inf", "actor_train", "critic_train"]
# What each call computes, for the machine's limit (``_roofline``).
CALL_KINDS = {"actor_gen": "generate", "ref_inf": "logprobs", "critic_inf": "values", "rew_inf": "reward",
              "actor_train": "train_logprobs", "critic_train": "train_values"}
# layout -> (number of workers, {call: mesh ranks}); a mesh of all workers runs data parallel.
LAYOUTS = {
    "dp2": (2, {c: [0, 1] for c in CALLS[1:]}),
    "split": (2, {"actor_gen": [0], "actor_train": [0], "ref_inf": [0],
                  "critic_inf": [1], "critic_train": [1], "rew_inf": [1]}),
    "hybrid": (2, {"actor_gen": [0, 1], "actor_train": [0], "ref_inf": [0],
                   "critic_inf": [1], "critic_train": [1], "rew_inf": [1]}),
    # Every core busy in every phase: generation and the reward model data-parallel,
    # reference and critic inference side by side, then the two trainings side by side.
    "balanced": (2, {"actor_gen": [0, 1], "actor_train": [0], "ref_inf": [0],
                     "critic_inf": [1], "critic_train": [1], "rew_inf": [0, 1]}),
    # As balanced, but generation on the training worker with both cores (the other
    # worker has nothing to do until its output exists): no weights move.
    "gen2t": (2, {"actor_gen": [0], "actor_train": [0], "ref_inf": [0],
                  "critic_inf": [1], "critic_train": [1], "rew_inf": [0, 1]}),
}
# layout -> {call: cpu_threads} for calls given more than their worker's core.
CALL_THREADS = {"gen2t": {"actor_gen": 2}}


def trl_missing() -> Optional[str]:
    """Why the TRL half cannot run, or None when it can."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # finding trl.experimental.ppo imports trl.experimental
    for mod in ("trl", "accelerate", "datasets"):
        if importlib.util.find_spec(mod) is None:
            return f"python package '{mod}' is not installed"
    try:
        found = importlib.util.find_spec("trl.experimental.ppo") is not None
    except ModuleNotFoundError:  # no trl.experimental at all
        found = False
    if not found:
        from importlib.metadata import version

        return f"trl {version('trl')} has no trl.experimental.ppo (only trl <= 1.12 has it)"
    return None


def ppo_args(layout: str, steps: int, n_prompts: int, new_tokens: int, files: Dict[str, Path]) -> List[str]:
    n_workers, meshes = LAYOUTS[layout]
    args = ["experiment_name=bench-ppo-trl", f"trial_name={layout}", f"n_gpus_per_node={n_workers}",
            "allocation_mode=manual", f"dataset.path={files['prompts']}", f"dataset.train_bs_n_seqs={n_prompts}",
            f"dataset.max_prompt_len={MAX_PROMPT_LEN}", f"ppo.gen.max_new_tokens={new_tokens}",
            f"ppo.gen.min_new_tokens={new_tokens}", "ppo.gen.temperature=1.0", "ppo.gen.top_p=1.0",
            f"ppo.gen.top_k={_shape.VOCAB_SIZE}", f"ppo.ppo_n_minibatches={N_MINIBATCHES}",
            f"exp_ctrl.benchmark_steps={steps}", f"exp_ctrl.total_train_epochs={steps}",
            "actor.gradient_checkpointing=False", "critic.gradient_checkpointing=False"]
    for role in ("actor", "critic", "ref", "rew"):
        args += [f"{role}.path={files['model']}", f"{role}.init_from_scratch=True"]
    return args + mesh_args(meshes, n_workers, CALL_THREADS.get(layout))


def run_ours(layout: str, steps: int, n_prompts: int, new_tokens: int, files: Dict[str, Path]) -> List[Dict[str, Any]]:
    import realhf.experiments  # noqa: F401
    from realhf.api.quickstart.entrypoint import parse_quickstart
    from realhf.system.pipe_runner import run_with_pipes

    cfg = parse_quickstart("ppo", ppo_args(layout, steps, n_prompts, new_tokens, files)).initial_setup()
    with tempfile.TemporaryDirectory() as root:
        master = run_with_pipes(cfg, "bench-ppo-trl", layout, timeout=900, fileroot=root)
    return [{"seconds": h.seconds, "timing": h.timing} for h in master.history]


def load_prompts(tokenizer: Any, path: Path) -> List[List[int]]:
    texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return [list(ids)[-MAX_PROMPT_LEN:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def run_trl(steps: int, n_prompts: int, new_tokens: int, threads: int, keep_gc: bool,
            files: Dict[str, Path]) -> Dict[str, Any]:
    """Train ``steps`` PPO steps with TRL; per-step seconds and observed response lengths."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch
    from datasets import Dataset
    from transformers import (AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification, PrinterCallback,
                              ProgressCallback, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if not keep_gc:
        gc.collect = lambda generation=2: 0  # the explicit calls only; automatic collection still runs
    torch.set_num_threads(threads)
    tokenizer = _shape.load_tokenizer(files["model"])
    tokenizer.padding_side = "left"
    config = AutoConfig.from_pretrained(files["model"])
    torch.manual_seed(SEED)
    policy = LlamaForCausalLM(config)
    ref = copy.deepcopy(policy)
    head_config = copy.deepcopy(config)
    head_config.num_labels = 1
    value = LlamaForSequenceClassification(head_config)
    reward = LlamaForSequenceClassification(head_config)

    generated: List[int] = []
    generate = policy.generate

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        generated.append(int(out.sequences.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    policy.generate = counting_generate

    gc_total = [0.0, 0.0]  # seconds in Python's garbage collector so far, start of the running collection

    def gc_timer(phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            gc_total[1] = time.perf_counter()
        else:
            gc_total[0] += time.perf_counter() - gc_total[1]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: List[float] = []
            self.gc_stamps: List[float] = []

        def stamp(self) -> None:
            self.stamps.append(time.perf_counter())
            self.gc_stamps.append(gc_total[0])

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamp()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamp()

    clock = StepClock()
    gc.callbacks.append(gc_timer)
    with tempfile.TemporaryDirectory() as out_dir:
        ppo_config = PPOConfig(
            output_dir=out_dir, seed=SEED, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
            num_sample_generations=0, dataloader_num_workers=0,
            total_episodes=steps * n_prompts, per_device_train_batch_size=n_prompts,
            gradient_accumulation_steps=1, num_mini_batches=N_MINIBATCHES, num_ppo_epochs=PPO_EPOCHS,
            local_rollout_forward_batch_size=n_prompts, response_length=new_tokens, temperature=1.0,
            stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        )
        trainer = PPOTrainer(args=ppo_config, processing_class=tokenizer, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value,
                             train_dataset=Dataset.from_dict({"input_ids": load_prompts(tokenizer, files["prompts"])}),
                             callbacks=[clock])
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        trainer.train()
    gc.callbacks.remove(gc_timer)
    seconds = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    gc_seconds = [b - a for a, b in zip(clock.gc_stamps, clock.gc_stamps[1:])]
    return {"seconds": seconds, "gc_seconds": gc_seconds, "new_tokens_generated": generated,
            "threads": torch.get_num_threads(), "explicit_gc": keep_gc}


def run_trl_subprocess(steps: int, n_prompts: int, new_tokens: int, threads: int, keep_gc: bool,
                       files: Dict[str, Path]) -> Dict[str, Any]:
    """``run_trl`` in a fresh interpreter: its heap (which TRL's per-step
    ``gc.collect()`` walks) and thread pool are not shaped by our master."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(out), "--steps", str(steps),
                        "--prompts", str(n_prompts), "--new-tokens", str(new_tokens),
                        "--trl-threads", str(threads), "--trl-gc", str(int(keep_gc)),
                        "--prompt-file", str(files["prompts"])], check=True)
        return json.loads(out.read_text())


def step_row(system: str, seconds: List[float], n_prompts: int, new_tokens: int,
             gc_seconds: Optional[List[float]] = None) -> Dict[str, Any]:
    median = statistics.median(seconds)
    row = {"system": system, "prompts": n_prompts, "new_tokens": new_tokens, "steps": len(seconds),
           "median_step_s": median, "samples_per_s": n_prompts / median}
    if gc_seconds:
        row["median_gc_s"] = statistics.median(gc_seconds)
    return row


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps of 8 prompts x 8 new tokens (smoke run)")
    p.add_argument("--steps", type=int, default=None, help="PPO steps per side and round, the first is not timed")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of both sides, alternating which goes first (3; --quick: 1)")
    p.add_argument("--layouts", default="dp2,split,balanced,gen2t", help=f"our layouts to run, comma-separated, of {sorted(LAYOUTS)}")
    p.add_argument("--prompts", type=int, default=None, help="prompts per PPO step (16; --quick: 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per prompt (32; --quick: 8)")
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL runs (2 = all cores)")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)  # internal: run TRL only, write JSON here
    p.add_argument("--trl-gc", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_child:
        files = {"model": _shape.materialize(), "prompts": Path(args.prompt_file)}
        result = run_trl(args.steps, args.prompts, args.new_tokens, args.trl_threads, bool(args.trl_gc), files)
        Path(args.trl_child).write_text(json.dumps(result))
        return {}

    why = trl_missing()
    if why is not None:
        print(f"bench_ppo_trl: skipped, {why}. To compare with TRL: {INSTALL_HINT}", file=sys.stderr)
        return {}
    steps, n_prompts, new_tokens = (3, 8, 8) if args.quick else (10, 16, 32)
    steps, n_prompts, new_tokens = args.steps or steps, args.prompts or n_prompts, args.new_tokens or new_tokens
    rounds = args.rounds or (1 if args.quick else 3)
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        p.error(f"unknown layouts {unknown}; choose from {sorted(LAYOUTS)}")

    raw: Dict[str, Any] = {}
    load: Dict[str, Any] = {"start": loadavg()}
    ours_keys, trl_keys = [f"ours_{layout}" for layout in layouts], ["trl", "trl_no_gc"]
    runs: Dict[str, List[Any]] = {key: [] for key in ours_keys + trl_keys}  # per round: history or TRL's result
    with tempfile.TemporaryDirectory() as tmp:
        files = prompt_workload(n_prompts, Path(tmp))
        for r in range(rounds):
            for key in round_order(ours_keys, trl_keys, r):
                if key.startswith("ours_"):
                    runs[key].append(run_ours(key[len("ours_"):], steps, n_prompts, new_tokens, files))
                else:
                    runs[key].append(run_trl_subprocess(steps, n_prompts, new_tokens, args.trl_threads,
                                                        key == "trl", files))
                load[f"round{r}_after_{key}"] = loadavg()
        lengths = prompt_lengths(files, MAX_PROMPT_LEN)
    rows, timeline = [], []
    for layout in layouts:
        history = [h for run in runs[f"ours_{layout}"] for h in run]
        raw[f"ours_{layout}"] = runs[f"ours_{layout}"]
        per_round = [[h["seconds"] for h in run] for run in runs[f"ours_{layout}"]]
        rows.append(step_row(f"ours ({layout})", steady(per_round), n_prompts, new_tokens))
        timeline += timeline_rows(layout, history, CALLS)
    trl_rows = []
    for key in ("trl", "trl_no_gc"):
        raw[key] = runs[key]
        trl_rows.append(step_row("trl" if key == "trl" else "trl (no gc.collect)",
                                 steady([run["seconds"] for run in runs[key]]), n_prompts, new_tokens,
                                 steady([run["gc_seconds"] for run in runs[key]])))
    round_rows = []
    for r in range(rounds):
        trl_s = [statistics.median(steady([runs[key][r]["seconds"]])) for key in ("trl", "trl_no_gc")]
        for layout in layouts:
            ours_s = statistics.median(steady([[h["seconds"] for h in runs[f"ours_{layout}"][r]]]))
            round_rows.append({"round": r + 1, "layout": layout, "ours_s": ours_s, "trl_s": trl_s[0],
                               "trl_no_gc_s": trl_s[1], "ratio": trl_s[0] / ours_s,
                               "ratio_no_gc": trl_s[1] / ours_s})
    rows += trl_rows
    # The machine's limit: matmul rates at this step's shapes (a training micro-batch of one core, the
    # rows one core decodes when generation is split over both), measured after both sides have run.
    limit = roofline(_shape.SHAPE, lengths, new_tokens, CALL_KINDS,
                     train_rows=(sum(lengths) + n_prompts * new_tokens) // N_MINIBATCHES,
                     decode_rows=max(1, n_prompts // 2))
    load["after_roofline"] = loadavg()
    limit_rows = roofline_rows(limit, {row["system"]: row["median_step_s"] for row in rows})
    bound = ratio_bound(limit, trl_rows)
    ratio = {layout: row["samples_per_s"] / trl_rows[0]["samples_per_s"] for layout, row in zip(layouts, rows)}
    ratio_no_gc = {layout: row["samples_per_s"] / trl_rows[1]["samples_per_s"] for layout, row in zip(layouts, rows)}
    for layout, row in zip(layouts, rows):
        row["ratio"], row["ratio_no_gc"] = ratio[layout], ratio_no_gc[layout]

    print(f"\nPPO samples/s, ours vs TRL {TRL_VERSION} ({args.trl_threads} threads), {n_prompts} prompts x "
          f"{new_tokens} new tokens, median over steps 2..{steps} of {rounds} round(s); ratio = ours / trl, "
          "ratio_no_gc = ours / trl (no gc.collect)")
    print_table(rows, ["system", "prompts", "new_tokens", "median_step_s", "samples_per_s", "ratio",
                       "ratio_no_gc", "median_gc_s"])
    print("\nEach round's median steps (s) and ratios")
    print_table(round_rows, ["round", "layout", "ours_s", "trl_s", "trl_no_gc_s", "ratio", "ratio_no_gc"])
    print("\nOur median step, per call (workers' clocks, ms from the step's start)")
    print_table(timeline, ["layout", "call", "ranks", "start_ms", "end_ms", "call_ms", "hooks_ms", "transfer_ms",
                           "timeline"])
    print_limit(limit, limit_rows, bound)
    print(f"load average (1, 5, 15 min): {load}")

    from importlib.metadata import version

    import torch
    import transformers

    setup = {
        "steps": steps, "rounds": rounds, "prompts": n_prompts, "new_tokens": new_tokens, "max_prompt_len": MAX_PROMPT_LEN,
        "ppo_epochs": PPO_EPOCHS, "minibatches": N_MINIBATCHES, "seed": SEED, "shape": _shape.SHAPE,
        "ours": {"threads_per_worker": 1, "layouts": {k: LAYOUTS[k] for k in layouts}},
        "trl": {"processes": 1, "threads": raw["trl"][0]["threads"]},
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": version("trl"),
                "accelerate": version("accelerate")}
    name = "bench_ppo_trl_quick" if args.quick else "bench_ppo_trl"
    path = write_json(name, {"rows": rows, "ratio": ratio, "ratio_no_gc": ratio_no_gc, "rounds": round_rows,
                             "timeline": timeline,
                             "limit": limit, "limit_rows": limit_rows,
                             "ratio_ceiling": bound, "raw": raw},
                      extra={"setup": setup, "versions": versions, "loadavg": load})
    print(f"wrote {path}")
    return {"rows": rows, "ratio": ratio, "ratio_no_gc": ratio_no_gc}


if __name__ == "__main__":
    main()
