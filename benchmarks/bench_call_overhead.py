"""Fixed cost of a call: one request round trip, and a whole call through the master.

1. Request round trip over the ZeroMQ streams. Worker processes (forked, one
   thread each) run a ``WorkerStream`` echo loop; the master sends
   ``call_all`` requests (request, SYN/ACK, reply) with three payloads:
   nothing, the metadata of a 16-item batch (what the master sends for a
   call: handle, ids per dp rank) and a 1 MB pickle (far more than the master
   ever sends, for scale); median round trip in ms for 1 and 4 workers.
2. A whole call. An experiment of 8 chained calls whose interface does no
   work (each copies one small key of 16 items to a new key) runs through
   ``MasterCore`` on 2 forked workers, in two layouts: ``same mesh`` (every
   call dp2 on both workers: items stay where they are) and ``alternating``
   (the calls alternate between a model on worker 0 and one on worker 1:
   every call first moves all 16 items to the other worker). Per call: the
   step time divided by 8 (request, metadata, transfer, the empty handler,
   reply, the master's bookkeeping), and the part of it spent outside the
   workers' handlers. This is the fixed cost every MFC pays on top of its
   compute.

Run ``python benchmarks/bench_call_overhead.py`` (under a minute). Results go
to ``benchmarks/results/bench_call_overhead.json``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json  # noqa: E402

PAYLOADS: Dict[str, Any] = {
    "empty": None,
    "call metadata": {"rpc": "actor_train", "ids": [[f"item-{d}-{i}" for i in range(8)] for d in range(2)]},
    "1 MB": b"x" * (1 << 20),
}


def _echo_worker(exp: str, trial: str, name: str) -> None:
    from realhf.system.request_reply_stream import WorkerStream

    with WorkerStream(exp, trial, name) as s:
        while True:
            req = s.poll(block=True, timeout=1.0)
            if req is None:
                continue
            s.reply(req.request_id, None)
            if req.handle_name == "exit":
                return


def measure(n_workers: int, repeat: int) -> List[Dict[str, Any]]:
    from realhf.system.request_reply_stream import MasterStream

    exp, trial = "bench-calls", f"t{uuid.uuid4().hex[:8]}"
    names = [f"model_worker/{i}" for i in range(n_workers)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_echo_worker, args=(exp, trial, n), daemon=True) for n in names]
    for p in procs:
        p.start()
    rows = []
    try:
        with MasterStream(exp, trial, names, timeout_s=60.0) as stream:
            for label, data in PAYLOADS.items():
                for _ in range(20):  # warm up connections and caches
                    stream.call_all("noop", data)
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    stream.call_all("noop", data)
                    times.append(time.perf_counter() - t0)
                rows.append({"workers": n_workers, "payload": label,
                             "median_ms": round(1e3 * statistics.median(times), 3),
                             "p90_ms": round(1e3 * sorted(times)[int(0.9 * len(times))], 3)})
            stream.call_all("exit")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return rows


N_CALLS = 8
N_ITEMS = 16


def _relay_experiment(layout: str, steps: int):
    """``N_CALLS`` chained no-op calls over a prompt dataset of ``N_ITEMS`` items per step."""
    import dataclasses as dc

    import torch

    import realhf.impl.dataset  # noqa: F401
    from realhf.api.core import dfg
    from realhf.api.core import model_api
    from realhf.api.core import system_api as sa
    from realhf.api.core.config import ModelName
    from realhf.api.core.data_api import SequenceSample
    from realhf.assets import DATA_DIR, TOKENIZER_DIR
    from realhf.base.topology import PipeDataModelParallelTopology

    @dc.dataclass
    class Relay(model_api.ModelInterface):
        src: str = "packed_prompts"
        dst: str = "k1"

        def inference(self, model, input_: SequenceSample, mb_spec) -> SequenceSample:
            lens = [sum(s) for s in input_.seqlens[self.src]]
            return SequenceSample(keys={self.dst}, trailing_shapes={self.dst: ()}, dtypes={self.dst: torch.int64},
                                  ids=list(input_.ids), seqlens={self.dst: [[n] for n in lens]},
                                  data={self.dst: input_.data[self.src].clone()}, metadata={})

    if "bench-relay" not in model_api.INTERFACES:
        model_api.register_interface("bench-relay", Relay)
    names = [ModelName("relay", 0), ModelName("relay", 1)] if layout == "alternating" else [ModelName("relay", 0)]
    meshes = {names[0]: [0], names[-1]: [1]} if layout == "alternating" else {names[0]: [0, 1]}
    null_model, null_backend = sa.Model("null"), sa.ModelBackend("null")
    shards: Dict[int, list] = {0: [], 1: []}
    for name, ranks in meshes.items():
        topo = PipeDataModelParallelTopology(1, len(ranks), 1)
        for r, shard in sa.make_layout_shards(name, topo, ranks, null_model, null_backend).items():
            shards[r].append(shard)
    data = sa.Dataset("prompt", args=dict(max_length=64, dataset_path=os.path.join(DATA_DIR, "prompt-train.jsonl")))
    workers = [sa.ModelWorker(base_seed=1, shards=shards[r], datasets=[data], tokenizer_name_or_path=TOKENIZER_DIR)
               for r in (0, 1)]
    rpcs, src = [], "packed_prompts"
    for i in range(N_CALLS):
        dst = f"relay{i}"
        iface = dfg.ModelInterface("bench-relay", args={"src": src, "dst": dst})
        rpcs.append(dfg.MFCDef(f"call{i}", N_ITEMS, "inference", iface, names[i % len(names)],
                               input_keys=[src], output_keys=[dst]))
        src = dst
    ctrl = sa.ExperimentSaveEvalControl(total_train_epochs=100, benchmark_steps=steps)
    return sa.ExperimentConfig(ctrl, rpcs, workers, dataset_keys=["packed_prompts"])


def measure_calls(layout: str, steps: int) -> Dict[str, Any]:
    from realhf.system.pipe_runner import run_with_pipes

    master = run_with_pipes(_relay_experiment(layout, steps), "bench-calls", layout, timeout=300)
    steady = master.history[2:]  # the first steps pay for imports and connection set-up
    per_call = [(h.seconds - h.timing["fetch"]["call_s"]) / N_CALLS for h in steady]
    outside = []
    for h in steady:
        t = [h.timing[f"call{i}"] for i in range(N_CALLS)]
        busy = sum(x["call_s"] + x["transfer_s"] for x in t)
        outside.append((h.seconds - h.timing["fetch"]["call_s"] - busy) / N_CALLS)
    handler = [statistics.median(h.timing[f"call{i}"]["call_s"] for i in range(N_CALLS)) for h in steady]
    transfer = [statistics.median(h.timing[f"call{i}"]["transfer_s"] for i in range(N_CALLS)) for h in steady]
    return {"layout": layout, "calls_per_step": N_CALLS, "items": N_ITEMS,
            "per_call_ms": round(1e3 * statistics.median(per_call), 3),
            "handler_ms": round(1e3 * statistics.median(handler), 3),
            "transfer_ms": round(1e3 * statistics.median(transfer), 3),
            "outside_workers_ms": round(1e3 * statistics.median(outside), 3)}


def main() -> None:
    quick = "--quick" in sys.argv
    os.environ.setdefault("REAL_FILEROOT", tempfile.mkdtemp(prefix="bench-calls-"))
    rows = []
    for n in (1, 4):
        rows += measure(n, repeat=50 if quick else 300)
    print_table(rows, ["workers", "payload", "median_ms", "p90_ms"],
                title="master -> worker request round trip (call_all: request, SYN/ACK, reply)")
    calls = [measure_calls(layout, steps=8 if quick else 30) for layout in ("same mesh", "alternating")]
    print_table(calls, ["layout", "calls_per_step", "items", "per_call_ms", "handler_ms", "transfer_ms",
                        "outside_workers_ms"],
                title=f"one no-op call through the master, 2 workers (median over steps; {N_ITEMS} items per call)")
    print(f"results: {write_json('bench_call_overhead', {'round_trip': rows, 'calls': calls})}")


if __name__ == "__main__":
    main()
