"""Fixed cost of one master -> model-worker request over the ZeroMQ streams.

Worker processes (forked, one thread each) run a ``WorkerStream`` echo loop;
the master sends ``call_all`` requests (request, SYN/ACK, reply) with three
payloads: nothing, the metadata of a 16-item batch (what the master sends for
a call: handle, ids per dp rank) and a 1 MB pickle (far more than the master
ever sends, for scale). The table reports the median round trip in ms for 1
and 4 workers; it is the floor of every MFC's ``call_s`` in ``bench_ppo.py``.
Run ``python benchmarks/bench_call_overhead.py`` (a few seconds). Results go
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


def main() -> None:
    quick = "--quick" in sys.argv
    os.environ.setdefault("REAL_FILEROOT", tempfile.mkdtemp(prefix="bench-calls-"))
    rows = []
    for n in (1, 4):
        rows += measure(n, repeat=50 if quick else 300)
    print_table(rows, ["workers", "payload", "median_ms", "p90_ms"],
                title="master -> worker request round trip (call_all: request, SYN/ACK, reply)")
    print(f"results: {write_json('bench_call_overhead', rows)}")


if __name__ == "__main__":
    main()
