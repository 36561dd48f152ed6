"""Parameter reallocation between 3D-parallel layouts on CPU: time and bytes moved.

A llama-style ReaLModel (hidden 1024, 6 layers, vocab 32000, 16 heads, 4 KV
heads, untied head, fp32; about 131 M parameters, 0.52 GB) is moved between
two layouts of 4 processes started by ``realhf.base.testing.run_distributed``
(gloo over loopback, one torch thread per process, on however many cores the
machine has -- 4 processes on 2 cores share them).  Layout pairs, written
``(pp, dp, tp)``:

* ``(2,1,2) -> (1,4,1)``: pipeline x tensor parallel into 4 full replicas,
  every rank receives (or keeps) the whole model;
* ``(4,1,1) -> (1,2,2)``: a 4-stage pipeline into 2 replicas of tp=2;
* ``(1,1,4) -> (2,2,1)``: tp=4 into 2 replicas of a 2-stage pipeline;
* ``(1,2,2) -> (2,1,2)``: 2 replicas of tp=2 into pipeline x tensor parallel.
  Every rank already holds what it needs (its tp shard of the full model
  contains its destination stage's shard), so nothing crosses the wire and
  only local copies remain; the broadcast baseline is then empty (``n/a``).

Weights: every process fills the same unsplit flat buffer with
``uniform_`` from a fixed seed and cuts its source stage out of it with
``partition_tensor`` (the reference for its destination stage is cut the
same way).  Four methods are timed, each as 1 warmup call and the median
of 3 calls; a call is preceded by a barrier and its time is the slowest
rank's (a max all-reduce of the per-rank wall times):

* **realloc** -- ``realhf.impl.model.comm.param_realloc.reallocate`` into an
  instantiated destination model (the plan is cached after the warmup; the
  cold planning time is reported separately as ``plan_s``).  Bytes: sent =
  received over the wire, and copied locally, summed over ranks from the
  returned stats.  Checked once per pair: the destination buffer equals the
  directly partitioned reference (``torch.equal``).
* **p2p only** -- the messages of the reallocation plan alone: the same
  (sender, receiver, size) set posted with ``dist.batch_isend_irecv`` on
  preallocated buffers, without gathering, scattering or allocating.  The
  gap to **realloc** is the cost of the local work around the messages.
* **bcast** -- one ``dist.broadcast`` from rank 0 to all 4 ranks of a single
  fp32 buffer as large as the largest per-rank received bytes of the
  reallocation (the time reallocation would need if its slowest receiver's
  bytes were one broadcast).  Plus, for context, the ``Tensor.copy_``
  bandwidth of one process on a buffer of the model's size.
* **naive** -- gather-then-scatter: the source ranks of data-parallel
  replica 0 send their whole flat buffers to rank 0; rank 0 views them as
  state dicts, merges tensor-parallel shards (``merge_state_dicts``) and
  stages into the full state dict, builds each destination rank's stage
  buffer with ``partition_state_dict`` and the stage's ``param_spec``, and
  sends it; each destination copies it into its flat buffer.  Rank 0 posts
  all receives (and later all sends) of a phase together with
  ``dist.batch_isend_irecv``, as ``reallocate`` does.  Checked once per
  pair to give the same destination buffers as ``reallocate``.

Ratios ``realloc/p2p``, ``realloc/bcast`` and ``realloc/naive`` are time
ratios (lower is better for reallocation).  ``wire_MB`` sums the bytes
received over the network by all ranks (for the broadcast: payload times the 3 non-root ranks),
``local_MB`` the bytes copied inside a process without communication.

Run ``python benchmarks/bench_realloc.py`` (about 1.5 minutes on 2 cores,
several GB of RAM); ``--quick`` uses a ~10 M-parameter model and the first
pair only (under 30 s).  Results go to ``benchmarks/results/bench_realloc.json``
(``bench_realloc_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import gbps, llama_config, print_table, write_json  # noqa: E402

WORLD = 4
# (pp, dp, tp) source -> destination, all on ranks 0..3.
PAIRS: List[Tuple[Tuple[int, int, int], Tuple[int, int, int]]] = [
    ((2, 1, 2), (1, 4, 1)),
    ((4, 1, 1), (1, 2, 2)),
    ((1, 1, 4), (2, 2, 1)),
    ((1, 2, 2), (2, 1, 2)),
]
FULL_MODEL = dict(hidden=1024, layers=6, vocab=32000, heads=16, kv_heads=4, max_positions=2048)
QUICK_MODEL = dict(hidden=256, layers=4, vocab=16000, heads=8, kv_heads=4, max_positions=512)


# ---------------------------------------------------------------------------
# Model and layouts
# ---------------------------------------------------------------------------


def real_config(model_kw: Dict[str, int]):
    import realhf.impl.model  # noqa: F401  (registers the HF families)
    from realhf.api.core.model_api import get_hf_family

    return get_hf_family("llama").config_from_hf_converter(llama_config(**model_kw))


def make_layout(dims: Tuple[int, int, int]):
    from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology

    pp, dp, tp = dims
    return ModelParallelLayout(PipeDataModelParallelTopology(pp, dp, tp), list(range(pp * dp * tp)))


def fmt_layout(dims: Tuple[int, int, int]) -> str:
    return "pp{}dp{}tp{}".format(*dims)


def full_state(config, seed: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The unsplit model as one uniformly filled flat buffer and its state-dict views."""
    from realhf.impl.model.comm.param_realloc import stage_layout

    spec, size = stage_layout(config, 1, 0, 1)
    flat = torch.empty(size, dtype=torch.float32)
    flat.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return flat, {k: flat[s.start:s.end].view(s.shape) for k, s in spec.items()}


def stage_buffer(config, full_sd: Dict[str, torch.Tensor], pp: int, pp_rank: int, tp: int,
                 tp_rank: int) -> torch.Tensor:
    """Flat buffer of one (pp stage, tp shard), cut from the unsplit state dict."""
    from realhf.impl.model.comm.param_realloc import stage_layout
    from realhf.impl.model.nn.tp_partition import partition_state_dict

    spec, size = stage_layout(config, pp, pp_rank, tp)
    shards = partition_state_dict({k: full_sd[k] for k in spec}, config, tp, tp_rank)
    buf = torch.empty(size, dtype=torch.float32)
    for k, slot in spec.items():
        buf[slot.start:slot.end].copy_(shards[k].reshape(-1))
    return buf


def stage_model(config, layout, rank: int):
    """This rank's (not yet instantiated) ReaLModel in ``layout``."""
    from realhf.impl.model.comm import global_comm
    from realhf.impl.model.comm.param_realloc import layout_dims
    from realhf.impl.model.nn.real_llm_api import ReaLModel

    pp, _, tp = layout_dims(layout)
    c = layout.coord(rank)
    group = global_comm.new_or_get_group(layout.tp_group_of(rank)) if tp > 1 else None
    return ReaLModel(config, pp_size=pp, pp_rank=c.pipe, tp_size=tp, tp_rank=c.model, tp_group=group)


# ---------------------------------------------------------------------------
# Timing and the two baselines (run inside the worker processes)
# ---------------------------------------------------------------------------


def timed(fn: Callable[[], Any], warmup: int, repeat: int) -> List[float]:
    """Slowest rank's wall time of each of ``repeat`` calls (barrier before each)."""
    import torch.distributed as dist

    for _ in range(warmup):
        dist.barrier()
        fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t.item()))
    return times


def naive_realloc(config, src, dst, src_flat, dst_flat, rank: int) -> Dict[str, int]:
    """Gather every source stage on rank 0, rebuild the full model, send each destination its stage."""
    import torch.distributed as dist

    from realhf.impl.model.comm.param_realloc import layout_dims, stage_layout
    from realhf.impl.model.nn.tp_partition import merge_state_dicts

    s_pp, _, s_tp = layout_dims(src)
    d_pp, _, d_tp = layout_dims(dst)
    stats = dict(bytes_sent=0, bytes_received=0, bytes_local=0)
    # Phase 1: gather the stages of source replica 0 on rank 0.
    senders = [r for r in src.global_ranks if src.coord(r).data == 0]
    if rank == 0:
        ops, bufs = [], {}
        for r in senders:
            c = src.coord(r)
            if r == 0:
                bufs[(c.pipe, c.model)] = src_flat
                continue
            buf = torch.empty(stage_layout(config, s_pp, c.pipe, s_tp)[1], dtype=torch.float32)
            bufs[(c.pipe, c.model)] = buf
            ops.append(dist.P2POp(dist.irecv, buf, r))
            stats["bytes_received"] += buf.numel() * 4
        for w in dist.batch_isend_irecv(ops) if ops else []:
            w.wait()
        full: Dict[str, torch.Tensor] = {}
        for pipe in range(s_pp):
            spec, _ = stage_layout(config, s_pp, pipe, s_tp)
            shards = [{k: bufs[(pipe, t)][s.start:s.end].view(s.shape) for k, s in spec.items()}
                      for t in range(s_tp)]
            full.update(merge_state_dicts(shards, config))
        del bufs
        # Phase 2: cut and send every destination stage.
        ops, keep = [], []
        for r in dst.global_ranks:
            c = dst.coord(r)
            buf = stage_buffer(config, full, d_pp, c.pipe, d_tp, c.model)
            if r == 0:
                dst_flat.copy_(buf)
                stats["bytes_local"] += buf.numel() * 4
                continue
            keep.append(buf)
            ops.append(dist.P2POp(dist.isend, buf, r))
            stats["bytes_sent"] += buf.numel() * 4
        for w in dist.batch_isend_irecv(ops) if ops else []:
            w.wait()
        del full, keep
    else:
        if rank in senders:
            dist.send(src_flat, 0)
            stats["bytes_sent"] += src_flat.numel() * 4
        if rank in dst:
            buf = torch.empty_like(dst_flat)
            dist.recv(buf, 0)
            dst_flat.copy_(buf)
            stats["bytes_received"] += buf.numel() * 4
    return stats


def copy_bandwidth(numel: int) -> float:
    """Seconds for one ``copy_`` of ``numel`` fp32 values (median of 3 after a warmup)."""
    a = torch.ones(numel, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(rank: int, world: int, spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch.distributed as dist

    from realhf.impl.model.comm import global_comm
    from realhf.impl.model.comm import param_realloc as pr

    config = real_config(spec["model"])
    pairs = [(make_layout(a), make_layout(b)) for a, b in spec["pairs"]]
    warmup, repeat = spec["warmup"], spec["repeat"]
    global_comm.clear_group_cache()
    # Groups are created collectively, in the same order on every rank.
    for src, dst in pairs:
        for layout in (src, dst):
            for g in layout.tp_groups():
                if len(g) > 1:
                    global_comm.new_or_get_group(g)

    out: Dict[str, Any] = {"pairs": []}
    for i, (src, dst) in enumerate(pairs):
        s_pp, _, s_tp = pr.layout_dims(src)
        d_pp, _, d_tp = pr.layout_dims(dst)
        sc, dc = src.coord(rank), dst.coord(rank)
        full_flat, full_sd = full_state(config, seed=100 + i)
        a = stage_model(config, src, rank)
        a.bind_flat_param(stage_buffer(config, full_sd, s_pp, sc.pipe, s_tp, sc.model))
        ref = stage_buffer(config, full_sd, d_pp, dc.pipe, d_tp, dc.model)
        model_numel = full_flat.numel()
        del full_flat, full_sd
        gc.collect()
        b = stage_model(config, dst, rank)
        res: Dict[str, Any] = {"rank": rank}

        # Cold planning time (reallocate would otherwise include it in its first call).
        pr.clear_plan_cache()
        t0 = time.perf_counter()
        pr.make_realloc_plan(config, src, dst, world_size=world)
        res["plan_s"] = time.perf_counter() - t0

        # Reallocation: correctness once, then timed.
        res["realloc_stats"] = pr.reallocate(config, src, dst, a, b)
        res["realloc_ok"] = bool(torch.equal(b.flat_param, ref))
        res["realloc_times"] = timed(lambda: pr.reallocate(config, src, dst, a, b), warmup, repeat)

        # The same messages alone: preallocated buffers, no gather or scatter.
        plan = pr.make_realloc_plan(config, src, dst, world_size=world)
        sends = [(t.receiver, torch.ones(t.numel)) for t in plan.sends_of(rank)]
        recvs = [(t.sender, torch.empty(t.numel)) for t in plan.recvs_of(rank)]

        def p2p():
            ops = [dist.P2POp(dist.isend, buf, r) for r, buf in sends]
            ops += [dist.P2POp(dist.irecv, buf, r) for r, buf in recvs]
            for w in dist.batch_isend_irecv(ops) if ops else []:
                w.wait()

        res["p2p_times"] = timed(p2p, warmup, repeat)
        del sends, recvs

        # Broadcast of the largest per-rank received bytes (skipped if nothing travels).
        recv = torch.tensor([res["realloc_stats"]["bytes_received"]], dtype=torch.int64)
        dist.all_reduce(recv, op=dist.ReduceOp.MAX)
        bcast_numel = int(recv.item()) // 4
        res["bcast_numel"] = bcast_numel
        res["bcast_times"] = None
        if bcast_numel > 0:
            bbuf = torch.ones(bcast_numel, dtype=torch.float32)
            res["bcast_times"] = timed(lambda: dist.broadcast(bbuf, src=0), warmup, repeat)
            del bbuf

        # Naive gather-then-scatter into the same destination buffer.
        b.flat_param.zero_()
        res["naive_stats"] = naive_realloc(config, src, dst, a.flat_param, b.flat_param, rank)
        res["naive_ok"] = bool(torch.equal(b.flat_param, ref))
        res["naive_times"] = timed(
            lambda: naive_realloc(config, src, dst, a.flat_param, b.flat_param, rank), warmup, repeat)
        gc.collect()

        if i == 0:
            dist.barrier()
            if rank == 0:
                res["copy_s"] = copy_bandwidth(model_numel)
                res["copy_numel"] = model_numel
            dist.barrier()
        res["src_numel"] = a.flat_param.numel()
        res["dst_numel"] = b.flat_param.numel()
        out["pairs"].append(res)
        del a, b, ref
        gc.collect()
    return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="~10M-parameter model, one layout pair")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per method (median)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    from realhf.base.testing import run_distributed
    from realhf.impl.model.comm.param_realloc import stage_layout

    model_kw = QUICK_MODEL if args.quick else FULL_MODEL
    pairs = PAIRS[:1] if args.quick else PAIRS
    name = "bench_realloc_quick" if args.quick else "bench_realloc"
    config = real_config(model_kw)
    params = stage_layout(config, 1, 0, 1)[1]
    print(f"model {model_kw}: {params:,} parameters, {params * 4 / 1e9:.3f} GB fp32; "
          f"{WORLD} processes, {os.cpu_count()} cores")
    spec = {"model": model_kw, "pairs": pairs, "warmup": args.warmup, "repeat": args.repeat}
    start = time.perf_counter()
    outs = run_distributed(worker, WORLD, timeout=1800, args=(spec,))
    wall = time.perf_counter() - start

    def total(i: int, method: str, key: str) -> int:
        return sum(o["pairs"][i][f"{method}_stats"][key] for o in outs)

    rows, summary = [], []
    copy_s = outs[0]["pairs"][0]["copy_s"]
    copy_numel = outs[0]["pairs"][0]["copy_numel"]
    for i, (s, d) in enumerate(pairs):
        r0 = outs[0]["pairs"][i]
        pair = f"{fmt_layout(s)}->{fmt_layout(d)}"
        dst_bytes = sum(o["pairs"][i]["dst_numel"] for o in outs) * 4
        t_re = statistics.median(r0["realloc_times"])
        t_bc = statistics.median(r0["bcast_times"]) if r0["bcast_times"] else None
        t_p2p = statistics.median(r0["p2p_times"])
        t_nv = statistics.median(r0["naive_times"])
        re_wire, re_local = total(i, "realloc", "bytes_received"), total(i, "realloc", "bytes_local")
        nv_wire, nv_local = total(i, "naive", "bytes_received"), total(i, "naive", "bytes_local")
        bc_bytes = r0["bcast_numel"] * 4
        max_recv = max(o["pairs"][i]["realloc_stats"]["bytes_received"] for o in outs)
        assert total(i, "realloc", "bytes_sent") == re_wire
        assert total(i, "naive", "bytes_sent") == nv_wire
        ok_re = all(o["pairs"][i]["realloc_ok"] for o in outs)
        ok_nv = all(o["pairs"][i]["naive_ok"] for o in outs)
        method_rows = [
            ("realloc", t_re, r0["realloc_times"], re_wire, re_local, max_recv, ok_re),
            ("p2p only", t_p2p, r0["p2p_times"], re_wire, 0, max_recv, None),
            ("bcast", t_bc, r0["bcast_times"], bc_bytes * (WORLD - 1), 0, bc_bytes, None),
            ("naive", t_nv, r0["naive_times"], nv_wire, nv_local,
             max(o["pairs"][i]["naive_stats"]["bytes_received"] for o in outs), ok_nv),
        ]
        for method, t, times, wire, local, rmax, ok in method_rows:
            if t is None:
                rows.append({"pair": pair, "method": method, "sec": "n/a (0 bytes)"})
                continue
            rows.append({
                "pair": pair, "method": method, "sec": t, "wire_MB": wire / 1e6,
                "local_MB": local / 1e6, "max_recv_MB/rank": rmax / 1e6,
                "wire_GB/s": gbps(wire, t),
                "filled_GB/s": gbps(dst_bytes, t) if method in ("realloc", "naive") else "",
                "correct": "" if ok is None else ("yes" if ok else "NO"), "times": times,
            })
        summary.append({
            "pair": pair, "plan_s": max(o["pairs"][i]["plan_s"] for o in outs),
            "realloc_s": t_re, "p2p_s": t_p2p, "bcast_s": "n/a" if t_bc is None else t_bc,
            "naive_s": t_nv, "realloc/p2p": t_re / t_p2p if re_wire > 0 else "n/a",
            "realloc/bcast": "n/a" if t_bc is None else t_re / t_bc, "realloc/naive": t_re / t_nv,
            "realloc_wire_MB": re_wire / 1e6, "naive_wire_MB": nv_wire / 1e6,
            "dst_MB": dst_bytes / 1e6, "verified": "yes" if ok_re and ok_nv else "NO",
        })

    print_table(rows, ["pair", "method", "sec", "wire_MB", "local_MB", "max_recv_MB/rank",
                       "wire_GB/s", "filled_GB/s", "correct"],
                title=("per method: sec = median of slowest-rank times; wire_MB = bytes received "
                       "over gloo (all ranks); filled_GB/s = destination bytes (all ranks) / sec"))
    print_table(summary, ["pair", "plan_s", "realloc_s", "p2p_s", "bcast_s", "naive_s", "realloc/p2p", "realloc/bcast",
                          "realloc/naive", "realloc_wire_MB", "naive_wire_MB", "dst_MB", "verified"],
                title="summary (ratios: lower is better for reallocation)")
    print(f"Tensor.copy_ of {copy_numel * 4 / 1e6:.0f} MB in one process: {copy_s:.3f} s, "
          f"{gbps(copy_numel * 4, copy_s):.2f} GB/s; total wall {wall:.0f} s")

    results = {"model": model_kw, "params": params, "world": WORLD,
               "pairs": [[list(s), list(d)] for s, d in pairs], "rows": rows, "summary": summary,
               "copy": {"bytes": copy_numel * 4, "sec": copy_s, "GB/s": gbps(copy_numel * 4, copy_s)},
               "wall_s": wall}
    if not all(r["verified"] == "yes" for r in summary):
        print("WARNING: a destination buffer differs from the reference")
    path = write_json(name, results, extra={"args": vars(args)})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
