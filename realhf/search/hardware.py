"""Device profiles: what one device of a cluster can do, for the cost model.

A profile holds *effective* rates (what kernels reach, not datasheet peaks),
so the cost model divides work by them directly. Two sources:

* :func:`h100_profile`: H100 SXM nodes from datasheet figures times stated
  efficiency factors (for simulating 8-128 GPU clusters);
* :func:`profile_this_machine`: measured here (a device = one worker process
  with one torch thread, as in ``mode=local`` CPU runs).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

# H100 SXM datasheet figures and the efficiency factors we assume.
H100_PEAK_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak
H100_MATMUL_EFFICIENCY = 0.55  # large GEMMs in Megatron-style training reach ~50-60% of peak
H100_HBM_BYTES_PER_S = 3.35e12
H100_HBM_EFFICIENCY = 0.7  # decode weight reads reach ~70% of HBM bandwidth
H100_MEMORY_BYTES = 80 * 10**9
NVLINK_BYTES_PER_S = 450e9  # per direction per GPU (NVLink 4)
NVLINK_EFFICIENCY = 0.8  # NCCL bus bandwidth reaches ~360 GB/s
IB_BYTES_PER_S = 400e9 / 8  # one 400 Gb/s NDR HCA per GPU
IB_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Effective per-device rates of a homogeneous cluster.

    :param matmul_flops: FLOP/s one device reaches on the model's matmuls.
    :param mem_bytes_per_s: bytes/s a device streams from its own memory
        (bounds decoding, which re-reads the weights every token).
    :param memory_bytes: memory of one device.
    :param intra_bw, inter_bw: bytes/s per device for collectives inside a
        node and across nodes; ``intra_lat``/``inter_lat``: seconds per
        message hop.
    :param devices_per_node: devices of one node.
    :param param_bytes: bytes of one weight as the calls hold it (2: bf16, 4: fp32).
    :param op_overhead_s: host cost per transformer layer and pass
        (kernel launches / Python dispatch), dominant for tiny models.
    :param train_efficiency: share of ``matmul_flops`` a forward+backward
        reaches (elementwise ops, attention, autograd bookkeeping).
    :param mb_overhead_s: fixed cost of one micro-batch on one pipeline stage
        (splitting, instruction dispatch).
    :param collective_overhead_s: cost of one tensor-parallel collective or
        pipeline send beyond the latency model (synchronizing busy processes).
    :param pp_slot_overhead_s: cost of one pipeline slot (instruction
        scheduling across stages) when pp > 1.
    :param compute_scale: multiplier on every call's modeled time (1 = as
        measured by the probes; fitted by :mod:`realhf.search.calibrate`).
    :param step_overhead_s: the master's own time per step (fetching data,
        moving outputs between meshes) on top of the calls' critical path.
    :param call_overhead_s: fixed cost of one model function call (master
        request, data transfer bookkeeping).
    :param usable_memory_fraction: share of ``memory_bytes`` a plan may use.
    """

    name: str
    matmul_flops: float
    mem_bytes_per_s: float
    memory_bytes: float
    intra_bw: float
    inter_bw: float
    intra_lat: float
    inter_lat: float
    devices_per_node: int
    param_bytes: int = 2
    op_overhead_s: float = 0.0
    call_overhead_s: float = 0.0
    usable_memory_fraction: float = 0.9
    train_efficiency: float = 1.0
    mb_overhead_s: float = 0.0
    collective_overhead_s: float = 0.0
    pp_slot_overhead_s: float = 0.0
    compute_scale: float = 1.0
    step_overhead_s: float = 0.0

    def link(self, spans_nodes: bool) -> "tuple[float, float]":
        """(bandwidth, latency) of a group inside one node or across nodes."""
        return (self.inter_bw, self.inter_lat) if spans_nodes else (self.intra_bw, self.intra_lat)

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "DeviceProfile":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})  # KeyError: a stale cache


def h100_profile(devices_per_node: int = 8) -> DeviceProfile:
    """H100 SXM 80 GB nodes (NVLink inside a node, 400 Gb/s InfiniBand per GPU across nodes).

    Effective matmul rate = 989 TFLOP/s x 0.55 = 544 TFLOP/s.
    """
    return DeviceProfile(
        name="H100-SXM-80GB",
        matmul_flops=H100_PEAK_BF16_FLOPS * H100_MATMUL_EFFICIENCY,
        mem_bytes_per_s=H100_HBM_BYTES_PER_S * H100_HBM_EFFICIENCY,
        memory_bytes=H100_MEMORY_BYTES,
        intra_bw=NVLINK_BYTES_PER_S * NVLINK_EFFICIENCY,
        inter_bw=IB_BYTES_PER_S * IB_EFFICIENCY,
        intra_lat=10e-6,
        inter_lat=20e-6,
        devices_per_node=devices_per_node,
        param_bytes=2,
        op_overhead_s=30e-6,  # ~10 kernel launches of ~3 us per layer without CUDA graphs
        call_overhead_s=5e-3,
        train_efficiency=0.85,  # backward kernels and attention run a little below GEMM efficiency
        mb_overhead_s=0.5e-3,
        pp_slot_overhead_s=0.2e-3,
    )


# ---- measuring this machine ----

def _time_best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(m: int = 256, k: int = 512, n: int = 512, repeat: int = 7) -> float:
    """fp32 matmul FLOP/s of one thread at a transformer-like shape (median of ``repeat``)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append((time.perf_counter() - t0) / 4)
        times.sort()
        return 2.0 * m * k * n / times[len(times) // 2]
    finally:
        torch.set_num_threads(old)


def measure_copy_bandwidth(nbytes: int = 64 * 2**20) -> float:
    """Bytes/s of a large tensor copy (read + write counted once, as weight streaming is)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return nbytes / _time_best(lambda: dst.copy_(src), 5)


class _MiniBlock:
    """A llama block in plain torch ops (RMSNorm, fused qkv, rotary, SDPA, SwiGLU): a probe of
    per-layer dispatch cost and of the forward+backward efficiency on this machine."""

    def __init__(self, hidden: int = 256, inter: int = 688, heads: int = 4, kv: int = 2, grad: bool = False):
        import torch

        self.h, self.nh, self.kv, self.hd = hidden, heads, kv, hidden // heads
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).requires_grad_(grad)  # noqa: E731
        self.wqkv = mk(hidden, (heads + 2 * kv) * self.hd)
        self.wo, self.wgu, self.wd = mk(hidden, hidden), mk(hidden, 2 * inter), mk(inter, hidden)
        self.params = [self.wqkv, self.wo, self.wgu, self.wd]
        self.matmul_params = sum(p.numel() for p in self.params)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        t = x.shape[0]
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = (y @ self.wqkv).split([self.nh * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
        q = q.view(t, self.nh, self.hd).transpose(0, 1)
        k = k.view(t, self.kv, self.hd).transpose(0, 1).repeat_interleave(self.nh // self.kv, 0)
        v = v.view(t, self.kv, self.hd).transpose(0, 1).repeat_interleave(self.nh // self.kv, 0)
        q1, q2 = q.chunk(2, -1)
        q = torch.cat([q1 * 0.9 - q2 * 0.1, q2 * 0.9 + q1 * 0.1], -1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1).transpose(0, 1).reshape(t, self.h)
        x = x + o @ self.wo
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        gate, up = (y @ self.wgu).chunk(2, -1)
        return x + (F.silu(gate) * up) @ self.wd


def measure_op_overhead(repeat: int = 60, chunks: int = 5) -> float:
    """Seconds of one block pass over one token (dispatch cost; its FLOPs are negligible).

    Median over ``chunks`` timings: the machine is shared, so single timings swing by 3x.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blk = _MiniBlock()
        x = torch.randn(1, blk.h)
        times = []
        with torch.no_grad():
            for _ in range(20):
                blk(x)
            for _ in range(chunks):
                t0 = time.perf_counter()
                for _ in range(repeat):
                    blk(x)
                times.append((time.perf_counter() - t0) / repeat)
    finally:
        torch.set_num_threads(old)
    return sorted(times)[len(times) // 2]


def measure_train_efficiency(tokens: int = 512, repeat: int = 5) -> float:
    """Forward+backward FLOP/s of the probe block over the matmul FLOP/s, one thread.

    Each repeat times a plain matmul of the block's shape and a training pass
    back to back and keeps their ratio (the median is reported), so load
    from other processes cancels out.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blk = _MiniBlock(grad=True)
        x = torch.randn(tokens, blk.h)
        w = torch.randn(blk.h, 2 * 688)

        def step():
            blk(x).sum().backward()

        def mm():
            for _ in range(4):
                x @ w

        step()
        mm()
        flops = 3 * (2 * tokens * blk.matmul_params + 4 * tokens * (tokens / 2) * blk.h)
        ratios = []
        for _ in range(repeat):
            t_mm = _time_best(mm, 2)
            t_step = _time_best(step, 1)
            ratios.append((flops / t_step) / (4 * 2 * tokens * w.numel() / t_mm))
    finally:
        torch.set_num_threads(old)
    return min(1.0, sorted(ratios)[len(ratios) // 2])


def _gloo_worker(rank: int, port: int, sizes, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for size in sizes:
        t = torch.ones(size // 4)
        for _ in range(2):
            dist.all_reduce(t)
        dist.barrier()
        n = 5 if size > 2**20 else 50
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(t)
        res[("allreduce", size)] = (time.perf_counter() - t0) / n
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dist.broadcast(t, 0)
        res[("broadcast", size)] = (time.perf_counter() - t0) / n
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def measure_gloo(small: int = 64, large: int = 16 * 2**20, timeout: float = 15.0) -> Dict[str, float]:
    """Bandwidth (bytes/s, the ring-model bus rate) and latency (s) between 2 local gloo processes."""
    from realhf.base.network import find_free_port  # noqa: WPS433

    ctx = mp.get_context("fork")  # spawn would re-import a script without a main guard
    out = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, (small, large), out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = out.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    lat = res[("broadcast", small)]
    # 2-rank ring all-reduce moves 2*(n-1)/n = 1x the buffer per rank.
    bw_ar = large / max(res[("allreduce", large)] - res[("allreduce", small)], 1e-9)
    bw_bc = large / max(res[("broadcast", large)] - lat, 1e-9)
    return {"bw": min(bw_ar, bw_bc), "allreduce_bw": bw_ar, "broadcast_bw": bw_bc, "lat": lat,
            "allreduce_lat": res[("allreduce", small)]}


def profile_this_machine(n_workers: int = 2, *, with_comm: bool = True) -> DeviceProfile:
    """Measure this machine (under ~20 s): a device is one single-threaded worker process."""
    try:
        import psutil

        total = float(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover
        total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    flops = measure_matmul_flops()
    copy_bw = measure_copy_bandwidth()
    comm = measure_gloo() if with_comm else {"bw": 1e9, "lat": 1e-4}
    return DeviceProfile(
        name=f"cpu-{os.cpu_count()}core",
        matmul_flops=flops,
        mem_bytes_per_s=copy_bw,
        memory_bytes=total / max(1, n_workers),
        intra_bw=comm["bw"],
        inter_bw=comm["bw"] / 10,
        intra_lat=comm["lat"],
        inter_lat=comm["lat"] * 10,
        devices_per_node=n_workers,
        param_bytes=4,
        op_overhead_s=measure_op_overhead(),
        call_overhead_s=CPU_CALL_OVERHEAD_S,
        train_efficiency=measure_train_efficiency(),
        mb_overhead_s=CPU_MB_OVERHEAD_S,
        collective_overhead_s=CPU_COLLECTIVE_OVERHEAD_S,
        pp_slot_overhead_s=CPU_PP_SLOT_OVERHEAD_S,
    )


# Per-call cost of a model function call on this system's CPU runs (request,
# data gathering, interface bookkeeping), from benchmarks/bench_call_overhead.py.
CPU_CALL_OVERHEAD_S = 4e-3
# Fixed cost of a micro-batch on a CPU worker (splitting the batch, pipeline
# instructions, gloo point-to-point setup); calibrated, see README.
CPU_MB_OVERHEAD_S = 5e-3
# Calibrated on one measured PPO step of the benchmarks/_shape.py llama on 2
# workers with tp=2 generation/training and a pp=2 x 8 micro-batch critic
# inference (bench_search.py's first run): generation took 1.5 s with tp=2
# against 0.2 s on one worker, about 4 ms per collective (330 of them), and
# the pp=2 inference 0.5 s against 0.07 s data-parallel, about 40 ms per
# pipeline slot. gloo collectives between two busy single-threaded processes
# on a shared 2-core machine pay for waking each other up, which the idle
# ping-pong latency measured above does not show.
CPU_COLLECTIVE_OVERHEAD_S = 4e-3
CPU_PP_SLOT_OVERHEAD_S = 40e-3


def default_cache_path() -> Path:
    return Path(os.environ.get("REALHF_SEARCH_PROFILE",
                               Path.home() / ".cache" / "realhf" / "machine_profile.json"))


def cached_profile(n_workers: int, path: Optional[Path] = None, *, refresh: bool = False) -> DeviceProfile:
    """This machine's profile, measured once and kept in ``path`` (JSON); the worker count is re-applied."""
    path = Path(path) if path is not None else default_cache_path()
    prof: Optional[DeviceProfile] = None
    if path.exists() and not refresh:
        try:
            prof = DeviceProfile.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            prof = None
    if prof is None:
        prof = profile_this_machine(2)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof.to_json(), indent=1))
    total = prof.memory_bytes * prof.devices_per_node
    return dataclasses.replace(prof, devices_per_node=n_workers, memory_bytes=total / max(1, n_workers))


__all__ = ["DeviceProfile", "h100_profile", "profile_this_machine", "cached_profile", "measure_matmul_flops",
           "measure_copy_bandwidth", "measure_gloo"]
