"""PPO samples/s of our system next to TRL's ``PPOTrainer``, in one run.

Both sides train the same workload: the tiny llama of
``realhf/assets/models/tiny-llama`` (hidden 128, 2 layers, vocab 4096) as
actor, critic, reference and reward model, all randomly initialized and in
fp32; the prompts of ``realhf/assets/data/prompt-train.jsonl`` (the last 64
tokens of each, no special tokens added, the same tokenizer); 16 prompts per
PPO step; exactly 24 new tokens per prompt (EOS can neither end a sample nor
an entire batch early); plain sampling at temperature 1 (no top-k, no top-p);
one PPO epoch of 2 minibatches, so 2 optimizer steps per step; no gradient
checkpointing.

* ``ours``: the ``ppo`` quickstart experiment through
  ``realhf.system.pipe_runner.run_with_pipes`` with 4 forked worker
  processes of one torch thread each, in the two layouts of
  ``benchmarks/bench_ppo.py`` (``same``: generation on the actor's dp2 x tp2
  training layout; ``realloc``: generation on a dp4 replica). A step is the
  master's step time (``master.history``).
* ``trl``: ``trl.experimental.ppo.PPOTrainer`` (``trl==1.12.0``, the last
  release that has it) in a fresh Python process after ours has finished,
  on the CPU with ``torch.set_num_threads(2)``. Policy and reference are
  ``LlamaForCausalLM``, value and reward model are
  ``LlamaForSequenceClassification`` (``num_labels=1``), built from the same
  ``config.json`` with a fixed seed. A step lasts from one ``on_step_end``
  callback to the next (the first from ``on_train_begin``).

Each side runs ``--steps`` steps (6; ``--quick``: 3 steps of 8 prompts x 8
tokens) and the table gives the median step time over steps 2.. (the first
includes start-up work), samples/s = prompts per step / median step, and
``ratio`` = ours samples/s / TRL samples/s. Results go to
``benchmarks/results/bench_ppo_trl.json`` (``bench_ppo_trl_quick.json`` for
``--quick``) with the versions, thread counts and load averages.

Run ``python benchmarks/bench_ppo_trl.py`` (a few minutes on 2 cores). TRL is
not a dependency of this project; without it the script says what to install
and exits. Install it without letting pip replace torch::

    pip install "trl==1.12.0" accelerate datasets -c constraints.txt

where ``constraints.txt`` pins the installed ``torch`` (and ``transformers``).

Differences that remain between the two setups:

* Threads: ours runs 4 single-threaded processes (plus an idle master) on the
  2 cores, TRL one process with 2 threads.
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
* TRL calls ``gc.collect()`` twice per step (and empties caches); a full
  collection walks the whole Python heap of transformers/datasets/torch, a
  fixed cost per step that weighs heavily with a model this small (column
  ``median_gc_s``: time spent in the garbage collector per step). Ours leaves
  collection to Python.
* Data order differs (each side shuffles with its own seed), so the prompt
  lengths of a step differ between the sides, not their distribution.
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
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ppo  # noqa: E402
from _common import print_table, write_json  # noqa: E402

TRL_VERSION = "1.12.0"
INSTALL_HINT = (f'pip install "trl=={TRL_VERSION}" accelerate datasets  '
                "(keep the installed torch: add --no-deps or a constraints file pinning torch)")
MAX_PROMPT_LEN = bench_ppo.MAX_PROMPT_LEN
N_MINIBATCHES = 2
PPO_EPOCHS = 1
SEED = 1
OURS_WORKERS = 4


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


def vocab_size() -> int:
    return int(json.loads((bench_ppo.TINY / "config.json").read_text())["vocab_size"])


def matched_overrides() -> List[str]:
    """Settings on top of ``bench_ppo.ppo_args`` that TRL's PPO cannot change:
    untruncated sampling and no activation recomputation."""
    return ["ppo.gen.temperature=1.0", "ppo.gen.top_p=1.0", f"ppo.gen.top_k={vocab_size()}",
            "actor.gradient_checkpointing=False", "critic.gradient_checkpointing=False"]


def run_ours(layout: str, steps: int, n_prompts: int, new_tokens: int) -> List[Dict[str, Any]]:
    return bench_ppo.run(layout, steps, n_prompts, new_tokens, extra=matched_overrides())


def load_prompts(tokenizer: Any) -> List[List[int]]:
    with open(bench_ppo.DATA / "prompt-train.jsonl") as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [list(ids)[-MAX_PROMPT_LEN:] for ids in tokenizer(texts)["input_ids"]]


def run_trl(steps: int, n_prompts: int, new_tokens: int, threads: int) -> Dict[str, Any]:
    """Train ``steps`` PPO steps with TRL; per-step seconds and observed response lengths."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch
    from datasets import Dataset
    from transformers import (AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification, PrinterCallback,
                              ProgressCallback, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import realhf.assets
    from realhf.api.core.data_api import load_hf_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_hf_tokenizer(realhf.assets.tokenizer_path())
    tokenizer.padding_side = "left"
    config = AutoConfig.from_pretrained(bench_ppo.TINY)
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
                             train_dataset=Dataset.from_dict({"input_ids": load_prompts(tokenizer)}),
                             callbacks=[clock])
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        trainer.train()
    gc.callbacks.remove(gc_timer)
    seconds = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    gc_seconds = [b - a for a, b in zip(clock.gc_stamps, clock.gc_stamps[1:])]
    return {"seconds": seconds, "gc_seconds": gc_seconds, "new_tokens_generated": generated,
            "threads": torch.get_num_threads()}


def run_trl_subprocess(steps: int, n_prompts: int, new_tokens: int, threads: int) -> Dict[str, Any]:
    """``run_trl`` in a fresh interpreter: its heap (which TRL's per-step
    ``gc.collect()`` walks) and thread pool are not shaped by our master."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(out), "--steps", str(steps),
                        "--prompts", str(n_prompts), "--new-tokens", str(new_tokens),
                        "--trl-threads", str(threads)], check=True)
        return json.loads(out.read_text())


def step_row(system: str, seconds: List[float], n_prompts: int, new_tokens: int,
             gc_seconds: Optional[List[float]] = None) -> Dict[str, Any]:
    steady = seconds[1:] or seconds
    median = statistics.median(steady)
    row = {"system": system, "prompts": n_prompts, "new_tokens": new_tokens, "steps": len(steady),
           "median_step_s": median, "samples_per_s": n_prompts / median}
    if gc_seconds:
        row["median_gc_s"] = statistics.median(gc_seconds[1:] or gc_seconds)
    return row


def loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps of 8 prompts x 8 new tokens (smoke run)")
    p.add_argument("--steps", type=int, default=None, help="PPO steps per side, the first is not timed")
    p.add_argument("--layouts", default="same,realloc", help="our layouts to run, comma-separated")
    p.add_argument("--prompts", type=int, default=None, help="prompts per PPO step (16; --quick: 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per prompt (24; --quick: 8)")
    p.add_argument("--trl-threads", default="2,1",
                   help="torch threads of the TRL runs, comma-separated; ratio uses the first (2 = all cores)")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)  # internal: run TRL only, write JSON here
    args = p.parse_args(argv)
    if args.trl_child:
        result = run_trl(args.steps, args.prompts, args.new_tokens, int(args.trl_threads))
        Path(args.trl_child).write_text(json.dumps(result))
        return {}

    why = trl_missing()
    if why is not None:
        print(f"bench_ppo_trl: skipped, {why}. To compare with TRL: {INSTALL_HINT}", file=sys.stderr)
        return {}
    steps, n_prompts, new_tokens = (3, 8, 8) if args.quick else (6, 16, 24)
    steps, n_prompts, new_tokens = args.steps or steps, args.prompts or n_prompts, args.new_tokens or new_tokens
    layouts = [x for x in args.layouts.split(",") if x]
    trl_threads = [int(x) for x in args.trl_threads.split(",") if x]

    raw: Dict[str, Any] = {}
    load: Dict[str, Any] = {"start": loadavg()}
    rows = []
    for layout in layouts:
        history = run_ours(layout, steps, n_prompts, new_tokens)
        raw[f"ours_{layout}"] = {"seconds": [h["seconds"] for h in history],
                                 "calls": bench_ppo.summarize(layout, history, n_prompts)}
        load[f"after_ours_{layout}"] = loadavg()
        rows.append(step_row(f"ours ({layout})", raw[f"ours_{layout}"]["seconds"], n_prompts, new_tokens))
    trl_rows = []
    for threads in trl_threads:
        key = f"trl_{threads}t"
        raw[key] = run_trl_subprocess(steps, n_prompts, new_tokens, threads)
        load[f"after_{key}"] = loadavg()
        trl_rows.append(step_row(f"trl ({threads} thread{'s' * (threads > 1)})", raw[key]["seconds"], n_prompts,
                                 new_tokens, raw[key]["gc_seconds"]))
    rows += trl_rows
    best_trl = max(r["samples_per_s"] for r in trl_rows)
    ratio = {layout: row["samples_per_s"] / trl_rows[0]["samples_per_s"] for layout, row in zip(layouts, rows)}
    ratio_best = {layout: row["samples_per_s"] / best_trl for layout, row in zip(layouts, rows)}
    for layout, row in zip(layouts, rows):
        row["ratio"], row["ratio_best_trl"] = ratio[layout], ratio_best[layout]

    print(f"\nPPO samples/s, ours vs TRL, {n_prompts} prompts x {new_tokens} new tokens, "
          f"median over steps 2..{steps}; ratio = ours / {trl_rows[0]['system']}, ratio_best_trl = ours / faster trl")
    print_table(rows, ["system", "prompts", "new_tokens", "median_step_s", "samples_per_s", "ratio",
                       "ratio_best_trl", "median_gc_s"])
    print(f"load average (1, 5, 15 min): {load}")

    from importlib.metadata import version

    import torch
    import transformers

    setup = {
        "steps": steps, "prompts": n_prompts, "new_tokens": new_tokens, "max_prompt_len": MAX_PROMPT_LEN,
        "ppo_epochs": PPO_EPOCHS, "minibatches": N_MINIBATCHES, "seed": SEED,
        "ours": {"workers": OURS_WORKERS, "threads_per_worker": 1, "layouts": layouts,
                 "overrides": matched_overrides()},
        "trl": {"processes": 1, "threads": [raw[f"trl_{t}t"]["threads"] for t in trl_threads]},
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": version("trl"),
                "accelerate": version("accelerate")}
    name = "bench_ppo_trl_quick" if args.quick else "bench_ppo_trl"
    path = write_json(name, {"rows": rows, "ratio": ratio, "ratio_best_trl": ratio_best, "raw": raw},
                      extra={"setup": setup, "versions": versions, "loadavg": load})
    print(f"wrote {path}")
    return {"rows": rows, "ratio": ratio}


if __name__ == "__main__":
    main()
