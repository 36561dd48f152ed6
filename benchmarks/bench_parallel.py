"""Data- and tensor-parallel ReaLModel on CPU: throughput scaling and traffic.

A llama-style ReaLModel (hidden 256, 4 layers, vocab 4096, 8 heads, 4 KV
heads, fp32) trains on a packed batch of 16 sequences with lengths uniform in
[32, 256].  Every configuration runs in fresh processes started by
``realhf.base.testing.run_distributed`` (gloo over loopback, one torch thread
per process unless stated otherwise):

* **dp** -- a full optimizer step (forward, backward, gradient all-reduce,
  AdamW) through the ``train`` backend's ``TrainModule.train_batch``.  dp=1
  runs the whole global batch in one process, with 1 and with 2 threads; dp=2
  gives each of two processes half of the sequences (split to balance tokens).
  Efficiency is ``tokens/s(dp2) / (2 * tokens/s(dp1, 1 thread))``; the
  2-thread baseline shows what the same two cores reach without parallelism.
* **tp** -- forward + backward of the mean next-token log-likelihood on the
  whole global batch.  tp=1 is the unsplit model; tp=2 splits it across two
  processes (Megatron column/row-parallel layers, vocab-parallel embedding
  and head, vocab-parallel log-softmax), both ranks seeing the same tokens.

Communication is measured by wrapping ``torch.distributed.all_reduce``,
``all_gather`` and ``reduce_scatter`` (plus their tensor variants and
``broadcast``) during the timed steps.  ``payload`` is the tensor size handed
to the collective (for all-gather the gathered output); ``ring/rank`` is the
bytes each rank sends with ring algorithms: ``2 (n-1)/n`` payloads for an
all-reduce, ``(n-1)/n`` for all-gather and reduce-scatter.  Theory:

* dp: one all-reduce of all gradients, ``params * 4`` bytes (fp32);
* tp (Megatron): per layer two all-reduces of ``[tokens, hidden]`` in the
  forward and two in the backward, one forward all-reduce after the
  vocab-parallel embedding, one backward all-reduce of the head's input
  gradient, and the vocab-parallel log-softmax's per-token scalars (max, then
  label logit and sum of exponentials: 3 floats per predicted token).

Timing: 1 warmup step, then the median of 3 steps; a step's time is the
slowest rank's, with a barrier before each step.  Run
``python benchmarks/bench_parallel.py`` (about a minute on 2 cores);
``--quick`` shrinks the model and batch for a smoke test.  Results go to
``benchmarks/results/bench_parallel.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import llama_config, print_table, random_lengths, write_json  # noqa: E402

# ---------------------------------------------------------------------------
# Model, data, loss
# ---------------------------------------------------------------------------


def real_config(hidden: int, layers: int, vocab: int, heads: int, kv_heads: int,
                max_positions: int):
    """A ReaLModelConfig converted from the shared benchmark ``LlamaConfig``."""
    import realhf.impl.model  # noqa: F401  (registers the HF families)
    from realhf.api.core.model_api import get_hf_family

    hf = llama_config(hidden, layers, vocab, heads, kv_heads, max_positions)
    return get_hf_family("llama").config_from_hf_converter(hf)


def full_model(cfg):
    """The unsplit model, initialised identically in every process."""
    from realhf.impl.model.nn.real_llm_api import ReaLModel

    model = ReaLModel(cfg, dtype=torch.float32, tp_size=1, tp_rank=0).instantiate()
    model.init_weights(std=0.02, seed=0)
    return model


def global_tokens(lengths: List[int], vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (sum(lengths),), generator=g)


def balanced_split(lengths: List[int], parts: int) -> List[List[int]]:
    """Sequence indices per rank, longest first onto the lightest rank."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    load = [0] * parts
    out: List[List[int]] = [[] for _ in range(parts)]
    for i in order:
        r = min(range(parts), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(x) for x in out]


def make_sample(lengths: List[int], tokens: torch.Tensor, index: List[int]):
    from realhf.api.core.data_api import SequenceSample

    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    ids = torch.cat([tokens[starts[i]:starts[i + 1]] for i in index])
    return SequenceSample.from_default([lengths[i] for i in index], list(index),
                                       {"packed_input_ids": ids})


def lm_loss(logits: torch.Tensor, mb) -> Tuple[torch.Tensor, Dict[str, float]]:
    from realhf.impl.model.backend.inference import packed_inputs
    from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

    ids, cu, _ = packed_inputs(mb)
    lp = gather_packed_shifted_log_probs(logits, cu, ids)
    return -lp.mean(), {}


def predicted_tokens(mb) -> float:
    return float(sum(n - 1 for item in mb.seqlens["packed_input_ids"] for n in item))


# ---------------------------------------------------------------------------
# Counting collectives
# ---------------------------------------------------------------------------

_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
            "reduce_scatter_tensor", "broadcast")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def count_collectives(log: List[Dict[str, Any]]) -> Iterator[None]:
    """Record every collective issued through ``torch.distributed`` meanwhile.

    Callers look the functions up on the module at call time
    (``dist.all_reduce(...)``), so replacing the module attributes sees them all.
    """
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group) if group is not None else dist.get_world_size()
            first = args[0] if args else next(iter(kwargs.values()))
            if name == "all_gather":
                payload = sum(_nbytes(t) for t in first)  # the gathered list
                storage = None
            elif name == "reduce_scatter":
                payload = sum(_nbytes(t) for t in args[1])  # the list of inputs
                storage = None
            elif name == "reduce_scatter_tensor":
                payload = _nbytes(args[1])
                storage = None
            else:
                payload = _nbytes(first)
                storage = first.untyped_storage().data_ptr()
            if name == "all_reduce":
                ring = 2 * (n - 1) / n * payload
            elif name == "broadcast":
                ring = payload * (n - 1) / n
            else:
                ring = (n - 1) / n * payload
            log.append({"op": name, "bytes": payload, "ring": ring, "dtype": str(first.dtype)
                        if isinstance(first, torch.Tensor) else str(first[0].dtype),
                        "storage": storage, "world": n})
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def summarize(log: List[Dict[str, Any]], steps: int) -> Dict[str, Any]:
    """Per-step collective count and bytes, by operation."""
    ops: Dict[str, Dict[str, float]] = {}
    for e in log:
        d = ops.setdefault(e["op"], {"calls": 0, "bytes": 0, "ring": 0.0})
        d["calls"] += 1
        d["bytes"] += e["bytes"]
        d["ring"] += e["ring"]
    for d in ops.values():
        for k in d:
            d[k] = d[k] / steps
    return {
        "calls": sum(d["calls"] for d in ops.values()),
        "bytes": sum(d["bytes"] for d in ops.values()),
        "ring": sum(d["ring"] for d in ops.values()),
        "by_op": ops,
    }


# ---------------------------------------------------------------------------
# Timing inside the workers
# ---------------------------------------------------------------------------


def timed_steps(step, warmup: int, repeat: int, log: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Barrier, step, slowest rank's time; collectives counted only in timed steps."""
    import torch.distributed as dist

    for _ in range(warmup):
        dist.barrier()
        step()
    times: List[float] = []
    results: List[Any] = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        with count_collectives(log):
            results.append(step())
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return {"median": statistics.median(times), "times": times, "results": results}


def dp_worker(rank: int, world_size: int, spec: Dict[str, Any]) -> Dict[str, Any]:
    from realhf.api.core.model_api import FinetuneSpec, MicroBatchSpec, Model
    from realhf.impl.model.backend import OptimizerConfig, TrainEngine

    torch.set_num_threads(spec["threads"])
    cfg = real_config(**spec["model"])
    lengths = spec["lengths"]
    tokens = global_tokens(lengths, cfg.vocab_size)
    index = balanced_split(lengths, world_size)[rank]
    sample = make_sample(lengths, tokens, index)
    opt = OptimizerConfig(type="adam", lr=1e-4, lr_scheduler_type="constant",
                          warmup_steps_proportion=0.0, weight_decay=0.0)
    ft = FinetuneSpec(total_train_epochs=1, dataset_size=1000, train_batch_size=len(lengths))
    model = TrainEngine(optimizer=opt).initialize(Model("actor@0", full_model(cfg), tokenizer=None), ft)
    engine = model.module
    log: List[Dict[str, Any]] = []

    def step():
        return engine.train_batch(sample, MicroBatchSpec(n_mbs=1), lm_loss, predicted_tokens)

    t = timed_steps(step, spec["warmup"], spec["repeat"], log)
    grad_storage = engine.flat_grad.untyped_storage().data_ptr()
    grads = [e for e in log if e["op"] == "all_reduce" and e["storage"] == grad_storage]
    return {
        "time": t["median"], "times": t["times"], "first_loss": t["results"][0]["loss"],
        "local_tokens": sum(lengths[i] for i in index),
        "params": engine.numel, "threads": torch.get_num_threads(),
        "comm": summarize(log, spec["repeat"]),
        "grad_allreduce": summarize(grads, spec["repeat"]),
    }


def tp_worker(rank: int, world_size: int, spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch.distributed as dist

    from realhf.impl.model.nn.real_llm_api import ReaLModel
    from realhf.impl.model.parallelism.tensor_parallel.cross_entropy import (
        vocab_parallel_packed_shifted_log_probs,
    )
    from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

    torch.set_num_threads(spec["threads"])
    cfg = real_config(**spec["model"])
    lengths = spec["lengths"]
    ids = global_tokens(lengths, cfg.vocab_size)
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    max_len = max(lengths)
    full = full_model(cfg)
    if world_size == 1:
        model = full
    else:
        model = ReaLModel(cfg, dtype=torch.float32, tp_size=world_size, tp_rank=rank,
                          tp_group=dist.group.WORLD).instantiate(init=False)
        model.load_state_dict({k: v.clone() for k, v in full.state_dict().items()})
        del full
    model.train()
    local_params = sum(p.numel() for p in model.parameters())

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids, cu, max_len)
        if world_size == 1:
            lp = gather_packed_shifted_log_probs(logits, cu, ids)
        else:
            lp = vocab_parallel_packed_shifted_log_probs(logits, cu, ids, dist.group.WORLD)
        loss = -lp.mean()
        loss.backward()
        return float(loss.detach())

    log: List[Dict[str, Any]] = []
    t = timed_steps(step, spec["warmup"], spec["repeat"], log)
    return {
        "time": t["median"], "times": t["times"], "first_loss": t["results"][0],
        "local_tokens": sum(lengths), "params": local_params,
        "threads": torch.get_num_threads(), "comm": summarize(log, spec["repeat"]),
    }


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run(worker, world: int, threads: int, spec: Dict[str, Any], timeout: float) -> List[Dict[str, Any]]:
    from realhf.base.testing import run_distributed

    return run_distributed(worker, world, timeout=timeout, args=({**spec, "threads": threads},))


def tp_theory(cfg_kw: Dict[str, Any], lengths: List[int], n: int) -> Dict[str, float]:
    """Megatron tensor-parallel collectives per fwd+bwd step, in bytes."""
    tokens = sum(lengths)
    act = tokens * cfg_kw["hidden"] * 4
    layers = cfg_kw["layers"]
    block = 4 * layers * act             # 2 forward + 2 backward per layer
    emb_head = 2 * act                   # embedding forward, head-input backward
    ce = 3 * (tokens - len(lengths)) * 4  # max; label logit + sum of exponentials
    payload = block + emb_head + ce
    return {"calls": 4 * layers + 2 + 2, "bytes": payload, "ring": 2 * (n - 1) / n * payload,
            "block_bytes": block, "embedding_head_bytes": emb_head, "log_softmax_bytes": ce}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seqs", type=int, default=None)
    parser.add_argument("--min-len", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="per configuration, seconds")
    parser.add_argument("--name", default=None, help="results file name")
    args = parser.parse_args(argv)
    q = args.quick
    model_kw = dict(hidden=args.hidden or (64 if q else 256), layers=args.layers,
                    vocab=args.vocab or (512 if q else 4096), heads=8, kv_heads=4,
                    max_positions=1024)
    seqs = args.seqs or (4 if q else 16)
    lengths = random_lengths(seqs, args.min_len or (8 if q else 32),
                             args.max_len or (32 if q else 256), seed=0)
    tokens = sum(lengths)
    name = args.name or ("bench_parallel_quick" if q else "bench_parallel")
    spec = {"model": model_kw, "lengths": lengths, "warmup": args.warmup, "repeat": args.repeat}

    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        print(f"warning: 1-minute load average is {load_start:.1f}; competing processes "
              "make the timings pessimistic and noisy\n")
    print(f"{seqs} sequences, {tokens} tokens, lengths {min(lengths)}..{max(lengths)}; "
          f"{os.cpu_count()} CPU cores\n")

    # ---- data parallel: full optimizer steps through the train backend
    dp_runs = {
        "dp=1 (1 thread)": run(dp_worker, 1, 1, spec, args.timeout),
        "dp=1 (2 threads)": run(dp_worker, 1, 2, spec, args.timeout),
        "dp=2 (1 thread/proc)": run(dp_worker, 2, 1, spec, args.timeout),
    }
    base_dp = tokens / dp_runs["dp=1 (1 thread)"][0]["time"]
    params = dp_runs["dp=1 (1 thread)"][0]["params"]
    rows: List[Dict[str, Any]] = []
    for label, outs in dp_runs.items():
        r0 = outs[0]
        tps = tokens / r0["time"]
        world = len(outs)
        rows.append({
            "mode": "dp", "config": label, "procs": world, "threads": r0["threads"],
            "tokens/rank": "/".join(str(o["local_tokens"]) for o in outs),
            "sec/step": r0["time"], "tokens_per_s": tps,
            "efficiency": tps / (world * base_dp) if world > 1 else tps / base_dp,
            "loss": r0["first_loss"],
            "coll/step": r0["comm"]["calls"], "MB/step": r0["comm"]["bytes"] / 1e6,
            "grad_MB": r0["grad_allreduce"]["bytes"] / 1e6,
            "ring_MB/rank": r0["grad_allreduce"]["ring"] / 1e6,
            "theory_MB": params * 4 / 1e6 if world > 1 else 0.0,
            "theory_ring_MB": 2 * (world - 1) / world * params * 4 / 1e6,
            "times": r0["times"], "comm": r0["comm"], "grad_allreduce": r0["grad_allreduce"],
            "params": params,
        })

    # ---- tensor parallel: forward + backward on the whole batch
    tp_runs = {
        "tp=1 (1 thread)": run(tp_worker, 1, 1, spec, args.timeout),
        "tp=1 (2 threads)": run(tp_worker, 1, 2, spec, args.timeout),
        "tp=2 (1 thread/proc)": run(tp_worker, 2, 1, spec, args.timeout),
    }
    base_tp = tokens / tp_runs["tp=1 (1 thread)"][0]["time"]
    for label, outs in tp_runs.items():
        r0 = outs[0]
        world = len(outs)
        tps = tokens / r0["time"]
        theory = tp_theory(model_kw, lengths, world) if world > 1 else None
        rows.append({
            "mode": "tp", "config": label, "procs": world, "threads": r0["threads"],
            "tokens/rank": "/".join(str(o["local_tokens"]) for o in outs),
            "sec/step": r0["time"], "tokens_per_s": tps,
            "efficiency": tps / (world * base_tp) if world > 1 else tps / base_tp,
            "loss": r0["first_loss"],
            "coll/step": r0["comm"]["calls"], "MB/step": r0["comm"]["bytes"] / 1e6,
            "ring_MB/rank": r0["comm"]["ring"] / 1e6,
            "theory_MB": theory["bytes"] / 1e6 if theory else 0.0,
            "theory_ring_MB": theory["ring"] / 1e6 if theory else 0.0,
            "theory": theory, "times": r0["times"], "comm": r0["comm"],
            "params_per_rank": r0["params"],
        })

    columns = ["mode", "config", "procs", "threads", "tokens/rank", "sec/step", "tokens_per_s",
               "efficiency", "loss", "coll/step", "MB/step", "grad_MB", "ring_MB/rank",
               "theory_MB", "theory_ring_MB"]
    print_table(rows, columns, title=(
        f"params {params:,}; dp = optimizer step via the train backend, tp = fwd+bwd; "
        "efficiency = tokens/s / (procs * tokens/s of the 1-thread single process); "
        "MB/step = payload of all collectives (dp: grad_MB = gradient all-reduce only)"))

    comm_rows = []
    for r in rows:
        if r["procs"] < 2:
            continue
        for op, d in r["comm"]["by_op"].items():
            comm_rows.append({"config": r["config"], "op": op, "calls/step": d["calls"],
                              "payload_MB": d["bytes"] / 1e6, "ring_MB/rank": d["ring"] / 1e6})
        if r["mode"] == "dp":
            g = r["grad_allreduce"]
            comm_rows.append({"config": r["config"], "op": "  of which gradients",
                              "calls/step": g["calls"], "payload_MB": g["bytes"] / 1e6,
                              "ring_MB/rank": g["ring"] / 1e6})
        if r["mode"] == "tp":
            th = r["theory"]
            comm_rows.append({"config": r["config"], "op": "theory (Megatron)",
                              "calls/step": th["calls"], "payload_MB": th["bytes"] / 1e6,
                              "ring_MB/rank": th["ring"] / 1e6})
        else:
            comm_rows.append({"config": r["config"], "op": "theory (grads once)",
                              "calls/step": 1, "payload_MB": r["theory_MB"],
                              "ring_MB/rank": r["theory_ring_MB"]})
    print_table(comm_rows, ["config", "op", "calls/step", "payload_MB", "ring_MB/rank"],
                title="collectives per step (rank 0)")

    results = {"model": model_kw, "lengths": lengths, "tokens": tokens, "params": params,
               "loadavg_1m": [load_start, os.getloadavg()[0]], "rows": rows,
               "collectives": comm_rows}
    path = write_json(name, results, extra={"args": vars(args)})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
