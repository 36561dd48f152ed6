"""Native operators versus their torch fallbacks.

Measures, on the CPU (and on the GPU when one is visible):

* the machine's copy bandwidth, ``dst.copy_(src)`` on a preallocated buffer,
  and ``src.clone()`` (allocation + copy: the fair baseline for
  ``slice_intervals``, which must allocate its output);
* ``slice_intervals`` / ``set_intervals`` on a 64M-element fp32 buffer with
  100, 1e4 and 1e5 intervals, reported as GB/s (bytes read + written) and as
  a fraction of the copy bandwidth;
* ``gae_1d`` on 256 and 4096 packed sequences of length 128..1024;
* ``merge_intervals`` on 1e5 intervals given as a list and as an array.

Run ``python benchmarks/bench_native_ops.py`` (about a minute); ``--quick``
shrinks every size for a smoke test.  Results go to
``benchmarks/results/bench_native_ops.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import gbps, print_table, timeit, write_json  # noqa: E402

from realhf.impl import ops  # noqa: E402


def native_backend(op: str, device: str) -> Optional[str]:
    """Fastest non-fallback backend of ``op`` on ``device`` (None if none)."""
    for name in ops.available_backends(op, device):
        if name != "python":
            return name if not (device == "cpu" and name == "triton") else None
    return None


def random_intervals(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    edges = np.sort(rng.integers(0, size + 1, 2 * n))
    return edges.reshape(n, 2)


def bench_copy_bandwidth(numel: int, device: str, repeat: int) -> Dict[str, float]:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    copy_t = timeit(lambda: dst.copy_(src), repeat=repeat, device=device)["median"]
    clone_t = timeit(lambda: src.clone(), repeat=repeat, device=device)["median"]
    return {"copy_gbps": gbps(nbytes, copy_t), "clone_gbps": gbps(nbytes, clone_t),
            "copy_s": copy_t, "clone_s": clone_t}


def bench_intervals(numel: int, counts: List[int], device: str, repeat: int,
                    bandwidth: Dict[str, float]) -> List[Dict[str, Any]]:
    rng = np.random.default_rng(0)
    src = torch.randn(numel, device=device)
    dst = torch.zeros_like(src)
    rows = []
    native = native_backend("slice_intervals", device)
    for n in counts:
        iv = random_intervals(rng, n, numel)
        total = int((iv[:, 1] - iv[:, 0]).sum())
        nbytes = 2 * total * src.element_size()
        packed = ops.slice_intervals(src, iv, backend="python")
        calls = {
            "slice": lambda b: ops.slice_intervals(src, iv, backend=b),
            "set": lambda b: ops.set_intervals(packed, dst, iv, backend=b),
        }
        timings = {}
        for op, call in calls.items():
            for backend in filter(None, ("python", native)):
                timings[op, backend] = timeit(lambda: call(backend), repeat=repeat,
                                              max_seconds=3, device=device)["median"]
            if native is not None:
                t = timings[op, native]
                baseline = bandwidth["clone_gbps"] if op == "slice" else bandwidth["copy_gbps"]
                rows.append({
                    "op": op, "device": device, "intervals": n,
                    "moved_MB": nbytes / 1e6, "backend": native,
                    "native_ms": t * 1e3, "python_ms": timings[op, "python"] * 1e3,
                    "speedup": timings[op, "python"] / t,
                    "GB/s": gbps(nbytes, t),
                    "of_copy": gbps(nbytes, t) / bandwidth["copy_gbps"],
                    "of_baseline": gbps(nbytes, t) / baseline,
                })
            else:
                rows.append({"op": op, "device": device, "intervals": n,
                             "moved_MB": nbytes / 1e6, "backend": "python",
                             "python_ms": timings[op, "python"] * 1e3,
                             "GB/s": gbps(nbytes, timings[op, "python"])})
    return rows


def bench_gae(batch_sizes: List[int], max_len: int, device: str,
              repeat: int) -> List[Dict[str, Any]]:
    rng = np.random.default_rng(1)
    native = native_backend("gae_1d", device)
    rows = []
    for bs in batch_sizes:
        lengths = rng.integers(max_len // 8, max_len + 1, bs)
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(device)
        values = torch.randn(int(lengths.sum()), device=device)
        rewards = torch.randn(values.numel() - bs, device=device)
        truncate = torch.from_numpy(rng.random(bs) < 0.5).to(device)
        times = {}
        for backend in filter(None, ("python", native)):
            times[backend] = timeit(
                lambda b=backend: ops.gae_1d(rewards, values, cu, truncate, 0.99, 0.95, backend=b),
                repeat=repeat, max_seconds=3, device=device)["median"]
        row: Dict[str, Any] = {"device": device, "sequences": bs,
                               "steps": rewards.numel(), "python_ms": times["python"] * 1e3}
        if native is not None:
            row.update({"backend": native, "native_ms": times[native] * 1e3,
                        "speedup": times["python"] / times[native],
                        "Msteps/s": rewards.numel() / times[native] / 1e6})
        rows.append(row)
    return rows


def bench_merge(n: int, repeat: int) -> List[Dict[str, Any]]:
    rng = np.random.default_rng(2)
    # Lengths 0..9; about half of the intervals touch their predecessor.
    lengths = rng.integers(0, 10, n)
    gaps = (rng.random(n) < 0.5) * rng.integers(1, 5, n)
    starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
    arr = np.stack([starts, starts + lengths], axis=1)
    pairs = [tuple(r) for r in arr.tolist()]
    native = native_backend("merge_intervals", "cpu")
    rows = []
    for kind, data in (("list", pairs), ("ndarray", arr)):
        times = {b: timeit(lambda b=b: ops.merge_intervals(data, backend=b),
                           repeat=repeat, max_seconds=3)["median"]
                 for b in filter(None, ("python", native))}
        row: Dict[str, Any] = {"input": kind, "intervals": n,
                               "python_ms": times["python"] * 1e3}
        if native is not None:
            row.update({"native_ms": times[native] * 1e3,
                        "speedup": times["python"] / times[native]})
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    parser.add_argument("--name", default="bench_native_ops", help="results file name")
    args = parser.parse_args(argv)

    numel = 1 << 20 if args.quick else 64 << 20
    counts = [100, 1000] if args.quick else [100, 10_000, 100_000]
    gae_sizes = [16, 64] if args.quick else [256, 4096]
    max_len = 128 if args.quick else 1024
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    results: Dict[str, Any] = {"bandwidth": {}, "intervals": [], "gae": [], "merge": []}
    for device in devices:
        bw = bench_copy_bandwidth(numel, device, args.repeat)
        results["bandwidth"][device] = bw
        print(f"[{device}] copy_ bandwidth {bw['copy_gbps']:.1f} GB/s, "
              f"clone (alloc + copy) {bw['clone_gbps']:.1f} GB/s "
              f"(read + write bytes, {numel * 4 / 1e6:.0f} MB fp32)\n")
        results["intervals"] += bench_intervals(numel, counts, device, args.repeat, bw)
        results["gae"] += bench_gae(gae_sizes, max_len, device, args.repeat)
    results["merge"] = bench_merge(1000 if args.quick else 100_000, args.repeat)

    print_table(results["intervals"], title=(
        "slice/set_intervals, fp32 (of_copy: fraction of copy_ bandwidth; of_baseline: "
        "slice vs clone, set vs copy_)"))
    print_table(results["gae"], title="gae_1d, fp32, lengths U[max/8, max]")
    print_table(results["merge"], title="merge_intervals")
    path = write_json(args.name, results, extra={"args": vars(args)})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
