"""Training tokens/s of our ``sft``, ``dpo`` and ``rw`` experiments next to TRL's trainers, in one run.

Both sides train the same workload, the compute-bound shape of
``benchmarks/_shape.py``: a llama of hidden 256, SwiGLU width 688, 4 layers,
4 query / 2 key-value heads, vocabulary 1024 (its BPE tokenizer trained at
run time on the committed texts), fp32, randomly initialized from the same
``config.json`` with a fixed seed, no gradient checkpointing, AdamW
(lr 1e-5, weight decay 0.05, betas 0.9/0.95, eps 1e-5, cosine schedule
with 2% warmup, gradient clipping at 1.0), maximum length 256, and the same
synthetic data, where a sequence is ``prompt + answer + </s>``:

* ``sft``: 32 sequences of 32..256 tokens (4608 in all, loss on the answer
  tokens), one optimizer step per batch of all 32;
* ``dpo`` and ``rw``: 16 prompts with one (chosen, rejected) pair each,
  32 sequences of 32..256 tokens (4608 in all), one optimizer step per batch
  of all 16 pairs. DPO (sigmoid loss, beta 0.1) scores every batch with a
  frozen reference model, a copy of the initial policy, on both sides. The
  reward model is the llama with a scalar head on the last token.

Every step thus processes the whole data set once. ``tokens/s`` counts the
real (unpadded) tokens of a step, the same count on both sides (chosen plus
rejected sequences for dpo and rw; DPO's reference forward is not counted
separately), over the median step time of steps 2.. (the first includes
start-up work).

* ``ours``: the quickstart experiment through
  ``realhf.system.pipe_runner.run_with_pipes`` (the master in this process,
  forked model workers) with the matching overrides (``ours_args``), in two
  layouts on the 2 cores: ``dp2`` (2 workers of 1 torch thread, data
  parallel, ZeRO-1 optimizer) and ``1w2t`` (1 worker of 2 threads). A step is
  the master's step time (``master.history``). ``pipe_runner`` pins every
  worker to one thread and has no option for more (the ZeroMQ workers of
  the local launcher read ``REAL_WORKER_THREADS``), so for ``1w2t`` this
  script wraps its worker entry point so that the pin sets 2 threads.
* ``trl``: ``SFTTrainer``, ``DPOTrainer`` and ``RewardTrainer`` of
  ``trl==1.12.0`` (``LlamaForCausalLM``; ``LlamaForSequenceClassification``
  with ``num_labels=1`` for rw; DPO's ``ref_model`` a deep copy of the
  policy), each in a fresh Python process after ours has finished, on the CPU
  with ``torch.set_num_threads(2)``, eval and saving off, logging minimal,
  ``dataloader_num_workers=0``, ``report_to=[]``. A step lasts from one
  ``on_step_end`` callback to the next (the first from ``on_train_begin``);
  a wrapper around the data collator counts each batch's real and padded
  tokens.

The table lists per experiment and system the median step, tokens/s and
``ratio`` = ours tokens/s / TRL tokens/s; ``trl_padded_tokens`` is the size
of TRL's padded batch. A second table gives our per-call times from the
master (``history[i].timing``: pre-hooks, transfer, call, post-hooks).

On a shared machine other processes distort timings, multi-threaded ones
most (a thread that loses its core stalls the others at every barrier). So
each run first waits (3 minutes at most) until other processes leave the
cores idle, and ``other_load`` records the share of all cores that
processes not ours kept busy during the run (from ``/proc/stat`` minus our
processes' CPU time). A run above ``--max-other-load`` (5%) is repeated
(``--attempts``, 3 runs at most) and the least disturbed one is kept; the
script warns when even that one stayed above. Results go to
``benchmarks/results/bench_trainers_trl.json`` (``bench_trainers_trl_quick
.json`` for ``--quick``: 3 steps) with every step time, the per-call
timings, the versions, thread counts and load averages.

Run ``python benchmarks/bench_trainers_trl.py`` (a few minutes on 2 cores).
TRL is not a dependency of this project; without it the script says what to
install and exits.

Differences that remain between the two setups:

* Padding: ours packs the sequences of a batch into one stream without
  padding and runs attention per sequence; TRL pads (right-pads SFT and
  reward sequences to the longest of the batch; DPO left-pads prompts to the
  longest prompt and right-pads answers to the longest answer) and runs
  every model over the padded batch with an attention mask. TRL's
  ``padding_free`` and ``packing`` modes are left off: they are documented
  for FlashAttention only (not available on the CPU), and with torch SDPA a
  flattened batch attends over all of its tokens at once (quadratic in the
  batch's total length).
* Threads: ours ``dp2`` runs 2 single-threaded worker processes (plus a
  mostly idle master), TRL one process with 2 threads (its multi-process
  mode, ``accelerate launch``, is not used).
* Balance: ours ``dp2`` gives each worker a fixed shard of half the records
  (drawn by the seed, not balanced by tokens), so the worker with more
  tokens sets the pace and the other waits in the gradient all-reduce.
* Calls per DPO step: ours runs the reference as its own call (``ref_inf``,
  on the same workers, which offload its weights after the call) and then
  trains the actor on the transferred log-probabilities; TRL runs the
  reference forward inside the training step.
* SFT loss: TRL's default ``chunked_nll`` projects only the answer tokens
  through the LM head; ours computes the logits of every token.
* Data order: each side shuffles with its own seed; as a step holds the
  whole data set this changes only the order inside a step.
* Each system logs its own statistics per step (loss, accuracy, norms).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shape  # noqa: E402
from _common import print_table, write_json  # noqa: E402

TRL_VERSION = "1.12.0"
INSTALL_HINT = (f'pip install "trl=={TRL_VERSION}" accelerate datasets  '
                "(keep the installed torch: add --no-deps or a constraints file pinning torch)")
EXPERIMENTS = ("sft", "dpo", "rw")
LAYOUTS = {"dp2": (2, 1), "1w2t": (1, 2)}  # name -> (worker processes, torch threads per worker)
MAX_LEN = _shape.SFT_MAX
SEED = 1
BETA = 0.1
OPTIM = {"lr": 1e-5, "weight_decay": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-5,
         "lr_scheduler_type": "cosine", "warmup_steps_proportion": 0.02}


def trl_missing() -> Optional[str]:
    """Why the TRL half cannot run, or None when it can."""
    for mod in ("trl", "accelerate", "datasets"):
        if importlib.util.find_spec(mod) is None:
            return f"python package '{mod}' is not installed"
    return None


def loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_seconds() -> Tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for children)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), attr) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for attr in ("ru_utime", "ru_stime"))
    return busy, own


def wait_quiet(max_other: float, timeout: float = 180.0, window: float = 3.0) -> float:
    """Wait (``timeout`` seconds at most) until other processes used at most ``max_other`` of the
    cores for ``window`` seconds; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        busy0, own0 = _cpu_seconds()
        time.sleep(window)
        busy1, own1 = _cpu_seconds()
        if max(0.0, (busy1 - busy0) - (own1 - own0)) / (window * (os.cpu_count() or 1)) <= max_other:
            break
    return time.perf_counter() - start


def measured(run: Callable[[], Dict[str, Any]], attempts: int, max_other: float) -> Dict[str, Any]:
    """``run()`` with ``other_load``: the share of all cores busy with processes not ours during it.

    On a shared machine other work distorts a timing, most of all that of a
    multi-threaded process; a run with ``other_load > max_other`` is repeated
    (``attempts`` runs at most) and the least disturbed one is kept.
    """
    best: Optional[Dict[str, Any]] = None
    loads = []
    for _ in range(max(1, attempts)):
        wait_quiet(max_other)
        busy0, own0 = _cpu_seconds()
        start = time.perf_counter()
        result = run()
        wall = time.perf_counter() - start
        busy1, own1 = _cpu_seconds()
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
        loads.append(round(other, 3))
        if best is None or other < best["other_load"]:
            best = dict(result, other_load=other)
        if other <= max_other:
            break
    best["other_load_attempts"] = loads
    return best


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def write_data(exp: str, out_dir: Path, model_dir: Path) -> Dict[str, Any]:
    """The data file of ``exp`` and its sequence lengths (with EOS)."""
    tok = _shape.load_tokenizer(model_dir)
    if exp == "sft":
        path = _shape.write_sft(out_dir / "sft.jsonl", tok)
        seqlens = _shape.sft_lengths(tok, list(_shape.read_jsonl(path)))
    else:
        path = _shape.write_pairs(out_dir / "pairs.jsonl", tok)
        seqlens = _shape.pair_lengths(tok, list(_shape.read_jsonl(path)))
    return {"path": str(path), "seqlens": seqlens, "n_records": len(list(_shape.read_jsonl(path)))}


# --------------------------------------------------------------------------- #
# Ours
# --------------------------------------------------------------------------- #
def ours_args(exp: str, layout: str, steps: int, data: Dict[str, Any], model_dir: Path) -> List[str]:
    """Quickstart overrides of ``exp`` on this workload (one step = the whole data set)."""
    workers, _ = LAYOUTS[layout]
    models = {"sft": ["model"], "rw": ["model"], "dpo": ["actor", "ref"]}[exp]
    trained = models[0]
    args = ["experiment_name=bench-trainers", f"trial_name={exp}-{layout}", f"n_gpus_per_node={workers}",
            f"allocation_mode=d{workers}p1m1", f"seed={SEED}", f"exp_ctrl.benchmark_steps={steps}",
            f"exp_ctrl.total_train_epochs={steps}", f"dataset.train_path={data['path']}",
            f"dataset.max_seqlen={MAX_LEN}", f"dataset.train_bs_n_seqs={data['n_records']}"]
    if exp != "sft":
        args += ["dataset.max_pairs_per_prompt=1"]
    if exp == "dpo":
        args += [f"beta={BETA}"]
    for m in models:
        args += [f"{m}.path={model_dir}", f"{m}.init_from_scratch=True", f"{m}.gradient_checkpointing=False"]
    args += [f"{trained}.optimizer.{k}={v}" for k, v in OPTIM.items()]
    return args


def _threaded_entry(entry: Any, threads: int) -> Any:
    """``pipe_runner``'s worker entry with ``torch.set_num_threads(1)`` raised to ``threads``."""
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        pin = torch.set_num_threads
        torch.set_num_threads = lambda n: pin(threads)  # this forked child only
        try:
            return entry(*args, **kwargs)
        finally:
            torch.set_num_threads = pin

    return run


def run_ours(exp: str, layout: str, steps: int, data: Dict[str, Any], model_dir: Path) -> Dict[str, Any]:
    import realhf.experiments  # noqa: F401
    from realhf.api.quickstart.entrypoint import parse_quickstart
    from realhf.system import pipe_runner

    workers, threads = LAYOUTS[layout]
    cfg = parse_quickstart(exp, ours_args(exp, layout, steps, data, model_dir)).initial_setup()
    entry = getattr(pipe_runner, "_worker_main", None)
    if threads != 1:
        if entry is None:
            raise RuntimeError("realhf.system.pipe_runner has no _worker_main to run with more threads")
        pipe_runner._worker_main = _threaded_entry(entry, threads)
    try:
        with tempfile.TemporaryDirectory() as root:
            master = pipe_runner.run_with_pipes(cfg, "bench-trainers", f"{exp}-{layout}", timeout=600,
                                                fileroot=root)
    finally:
        pipe_runner._worker_main = entry
    return {"seconds": [h.seconds for h in master.history], "n_tokens": [h.n_tokens for h in master.history],
            "timing": [h.timing for h in master.history],
            "stats": [h.stats for h in master.history], "workers": workers, "threads_per_worker": threads}


def call_rows(exp: str, layout: str, raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Median seconds per call and phase over steps 2.. of one of our runs."""
    steady = raw["timing"][1:] or raw["timing"]
    rows = []
    for call in sorted({c for t in steady for c in t}):
        row: Dict[str, Any] = {"experiment": exp, "layout": layout, "call": call}
        for part in ("pre_hooks_s", "transfer_s", "call_s", "post_hooks_s"):
            row[part] = statistics.median(float(t.get(call, {}).get(part, 0.0)) for t in steady)
        rows.append(row)
    step = raw["seconds"][1:] or raw["seconds"]
    rows.append({"experiment": exp, "layout": layout, "call": "step", "call_s": statistics.median(step)})
    return rows


# --------------------------------------------------------------------------- #
# TRL (run in a child process)
# --------------------------------------------------------------------------- #
def run_trl(exp: str, steps: int, data_path: str, model_dir: str, threads: int) -> Dict[str, Any]:
    """Train ``steps`` steps of ``exp`` with TRL; per-step seconds and tokens."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(threads)
    import datasets
    from datasets import Dataset
    from transformers import (AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification, PrinterCallback,
                              ProgressCallback, TrainerCallback)

    datasets.disable_progress_bars()
    tokenizer = _shape.load_tokenizer(model_dir)
    rows = list(_shape.read_jsonl(data_path))
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    common = dict(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to=[],
                  save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, max_steps=steps, per_device_train_batch_size=len(rows),
                  gradient_accumulation_steps=1, seed=SEED, data_seed=SEED, max_length=MAX_LEN,
                  learning_rate=OPTIM["lr"], weight_decay=OPTIM["weight_decay"], adam_beta1=OPTIM["beta1"],
                  adam_beta2=OPTIM["beta2"], adam_epsilon=OPTIM["eps"], lr_scheduler_type="cosine",
                  warmup_steps=OPTIM["warmup_steps_proportion"], max_grad_norm=1.0)
    if exp == "sft":
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["answer"]} for r in rows])
        model = LlamaForCausalLM(config)
        make = lambda out: SFTTrainer(model=model, args=SFTConfig(output_dir=out, packing=False,  # noqa: E731
                                      padding_free=False, **common), train_dataset=ds, processing_class=tokenizer)
    else:
        ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": p, "rejected": n} for r in rows
                                for p, n in zip(r["pos_answers"], r["neg_answers"])])
        if exp == "dpo":
            from trl import DPOConfig, DPOTrainer

            model = LlamaForCausalLM(config)
            ref = copy.deepcopy(model)
            make = lambda out: DPOTrainer(model=model, ref_model=ref, args=DPOConfig(  # noqa: E731
                output_dir=out, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False, **common),
                train_dataset=ds, processing_class=tokenizer)
        else:
            from trl import RewardConfig, RewardTrainer

            head = copy.deepcopy(config)
            head.num_labels = 1
            model = LlamaForSequenceClassification(head)
            make = lambda out: RewardTrainer(model=model, args=RewardConfig(output_dir=out, **common),  # noqa: E731
                                             train_dataset=ds, processing_class=tokenizer)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: List[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

    clock = StepClock()
    real_tokens: List[int] = []
    padded_tokens: List[int] = []
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make(out_dir)
        trainer.add_callback(clock)
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        collate = trainer.data_collator

        def counting_collate(examples: Any) -> Any:
            batch = collate(examples)
            real_tokens.append(int(batch["attention_mask"].sum()))
            padded_tokens.append(int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting_collate
        trainer.train()
    seconds = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"seconds": seconds, "real_tokens": real_tokens, "padded_tokens": padded_tokens,
            "threads": torch.get_num_threads(), "model": type(model).__name__,
            "attn_implementation": model.config._attn_implementation}


def run_trl_subprocess(exp: str, steps: int, data_path: str, model_dir: Path, threads: int) -> Dict[str, Any]:
    """``run_trl`` in a fresh interpreter: nothing of ours shapes its heap or thread pool."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(out),
                        "--experiments", exp, "--steps", str(steps), "--trl-data", data_path,
                        "--trl-model", str(model_dir), "--trl-threads", str(threads)], check=True)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def step_row(exp: str, system: str, raw: Dict[str, Any], tokens: int) -> Dict[str, Any]:
    steady = raw["seconds"][1:] or raw["seconds"]
    median = statistics.median(steady)
    return {"experiment": exp, "system": system, "steps": len(steady), "tokens_per_step": tokens,
            "median_step_s": median, "tokens_per_s": tokens / median, "other_load": raw["other_load"]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps per run (smoke run)")
    p.add_argument("--steps", type=int, default=None, help="steps per run, the first is not timed (6; --quick: 3)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset of sft,dpo,rw")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="our layouts, comma-separated; ratio uses the first")
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL process (2 = all cores)")
    p.add_argument("--attempts", type=int, default=3,
                   help="runs of one measurement at most while other processes keep the cores busy")
    p.add_argument("--max-other-load", type=float, default=0.05,
                   help="share of the cores that other processes may use during a kept run")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)  # internal: run TRL only, write JSON here
    p.add_argument("--trl-data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trl-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_child:
        result = run_trl(args.experiments, args.steps, args.trl_data, args.trl_model, args.trl_threads)
        Path(args.trl_child).write_text(json.dumps(result))
        return {}

    why = trl_missing()
    if why is not None:
        print(f"bench_trainers_trl: skipped, {why}. To compare with TRL: {INSTALL_HINT}", file=sys.stderr)
        return {}
    steps = args.steps or (3 if args.quick else 6)
    exps = [x for x in args.experiments.split(",") if x]
    layouts = [x for x in args.layouts.split(",") if x]
    for x in exps:
        if x not in EXPERIMENTS:
            p.error(f"unknown experiment {x!r}; choose from {EXPERIMENTS}")
    for x in layouts:
        if x not in LAYOUTS:
            p.error(f"unknown layout {x!r}; choose from {tuple(LAYOUTS)}")

    model_dir = _shape.materialize()
    raw: Dict[str, Any] = {}
    load: Dict[str, Any] = {"start": loadavg()}
    rows: List[Dict[str, Any]] = []
    calls: List[Dict[str, Any]] = []
    ratio: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for exp in exps:
            data_dir = Path(tmp) / exp
            data_dir.mkdir()
            data = write_data(exp, data_dir, model_dir)
            tokens = sum(data["seqlens"])
            ours_rows = []
            for layout in layouts:
                key = f"{exp}_ours_{layout}"
                raw[key] = measured(lambda: run_ours(exp, layout, steps, data, model_dir), args.attempts,
                                    args.max_other_load)
                load[f"after_{key}"] = loadavg()
                if set(raw[key]["n_tokens"]) != {tokens}:
                    raise RuntimeError(f"{key}: the master counted {raw[key]['n_tokens']} tokens per step, "
                                       f"the data set has {tokens}")
                ours_rows.append(step_row(exp, f"ours ({layout})", raw[key], tokens))
                calls += call_rows(exp, layout, raw[key])
            key = f"{exp}_trl"
            raw[key] = measured(lambda: run_trl_subprocess(exp, steps, data["path"], model_dir, args.trl_threads),
                                args.attempts, args.max_other_load)
            load[f"after_{key}"] = loadavg()
            if set(raw[key]["real_tokens"]) != {tokens}:
                raise RuntimeError(f"{key}: TRL's batches held {raw[key]['real_tokens']} real tokens, "
                                   f"the data set has {tokens}")
            trl_row = step_row(exp, f"trl ({raw[key]['threads']} threads)", raw[key], tokens)
            trl_row["trl_padded_tokens"] = statistics.median(raw[key]["padded_tokens"])
            ratio[exp] = {}
            for layout, row in zip(layouts, ours_rows):
                row["ratio"] = ratio[exp][layout] = row["tokens_per_s"] / trl_row["tokens_per_s"]
            rows += ours_rows + [trl_row]
            raw[f"{exp}_data"] = {"seqlens": data["seqlens"], "records": data["n_records"]}

    print(f"\nTraining tokens/s, ours vs TRL {TRL_VERSION}, compute-bound shape, median over steps 2..{steps}; "
          f"ratio = ours tokens/s / TRL tokens/s")
    print_table(rows, ["experiment", "system", "steps", "tokens_per_step", "trl_padded_tokens", "median_step_s",
                       "tokens_per_s", "ratio", "other_load"])
    disturbed = [f"{r['experiment']} {r['system']}" for r in rows if r["other_load"] > args.max_other_load]
    if disturbed:
        print(f"warning: other processes kept more than {args.max_other_load:.0%} of the cores busy during "
              f"{', '.join(disturbed)} in every attempt; those timings are pessimistic.")
    print("Our calls, median seconds over steps 2.. (pre_hooks: parameter reallocation; post_hooks: offload)")
    print_table(calls, ["experiment", "layout", "call", "pre_hooks_s", "transfer_s", "call_s", "post_hooks_s"])
    print(f"load average (1, 5, 15 min): {load}")

    from importlib.metadata import version

    import torch
    import transformers

    setup = {
        "steps": steps, "max_length": MAX_LEN, "seed": SEED, "beta": BETA, "optimizer": OPTIM,
        "shape": _shape.SHAPE, "model_dir": str(model_dir),
        "ours": {"layouts": {k: {"workers": LAYOUTS[k][0], "threads_per_worker": LAYOUTS[k][1]} for k in layouts},
                 "overrides": {exp: ours_args(exp, layouts[0], steps, {"path": "<data>", "n_records": "<n>"},
                                              Path("<model>")) for exp in exps}},
        "trl": {"processes": 1, "threads": args.trl_threads},
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": version("trl"),
                "accelerate": version("accelerate"), "datasets": version("datasets"),
                "tokenizers": version("tokenizers")}
    name = "bench_trainers_trl_quick" if args.quick else "bench_trainers_trl"
    path = write_json(name, {"rows": rows, "ratio": ratio, "calls": calls, "raw": raw},
                      extra={"setup": setup, "versions": versions, "loadavg": load})
    print(f"wrote {path}")
    return {"rows": rows, "ratio": ratio}


if __name__ == "__main__":
    main()
