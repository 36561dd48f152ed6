"""Rules of ``allocation_mode=heuristic``: a (dp, tp, pp) layout per model function call.

One deterministic rule set, shared by every experiment:

1. Estimate the memory one copy of the model needs: parameters x 16 bytes
   when the call trains (bf16 weights and grads plus fp32 master weights and
   Adam moments), x 2 bytes when it only runs forward on a GPU (bf16), x 4 on
   CPU (fp32).
2. A device offers ``USABLE_FRACTION`` of its memory: the CUDA device's total
   memory when CUDA is present, ``DEFAULT_GPU_MEMORY`` when the caller asks
   for a GPU layout without one, and on CPU (workers are processes) the
   machine's RAM divided by the workers of a node.
3. If one device holds the model, use pure data parallelism (tiny models and
   CPU runs end here).
4. Otherwise shard over ``tp x pp`` devices, taking the fewest pipeline
   stages first and then the smallest tensor size that fits: tensor
   parallelism stays inside a node (tp divides the devices of a node) and
   pipeline parallelism spans nodes. tp must divide the query heads (and
   pass :func:`check_parallel_fits`, the validation every layout meets);
   pp must divide the transformer blocks. If no layout fits, the one that
   shards the most is used (the run may still run out of memory).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from realhf.api.quickstart.allocation import check_parallel_fits
from realhf.api.quickstart.base import ConfigError, cuda_available
from realhf.api.quickstart.model import MFCConfig, ParallelismConfig, load_real_config

TRAIN_BYTES_PER_PARAM = 16
GPU_INFER_BYTES_PER_PARAM = 2
CPU_INFER_BYTES_PER_PARAM = 4
DEFAULT_GPU_MEMORY = 80 * 1024**3
USABLE_FRACTION = 0.8


def count_params(real_config: Any) -> int:
    """Parameters of a ``ReaLModelConfig`` (embedding, blocks, head), computed from its shape."""
    hidden = real_config.hidden_dim
    head_dim = real_config.head_dim or hidden // real_config.n_q_heads
    attn = hidden * head_dim * (2 * real_config.n_q_heads + 2 * real_config.n_kv_heads)
    n_mlp_mats = 3 if getattr(real_config, "mlp_type", None) in ("llama", "moe") else 2
    mlp = n_mlp_mats * hidden * real_config.intermediate_dim
    if getattr(real_config, "mlp_type", None) == "moe":
        moe = getattr(real_config, "moe", None)
        mlp *= max(1, int(getattr(moe, "num_experts", 1) or 1))
    block = attn + mlp + 4 * hidden
    embed = real_config.vocab_size * hidden
    head = 0 if getattr(real_config, "tied_embedding", False) else (
        1 if getattr(real_config, "is_critic", False) else real_config.vocab_size) * hidden
    return real_config.n_layers * block + embed + head


def device_memory_bytes(n_gpus_per_node: int, gpu: Optional[bool] = None) -> int:
    """Memory of one device; ``gpu`` None means "whatever this machine has"."""
    if gpu is None:
        gpu = cuda_available()
    if gpu:
        if cuda_available():
            import torch

            return int(torch.cuda.get_device_properties(0).total_memory)
        return DEFAULT_GPU_MEMORY
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is a dependency
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, n_gpus_per_node)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_ok(real_config: Any, tp: int) -> bool:
    if tp == 1:
        return True
    if real_config.n_q_heads % tp:
        return False
    try:
        check_parallel_fits(ParallelismConfig(tp, 1, 1), real_config, "heuristic")
    except ConfigError:
        return False
    return True


def choose_layout(real_config: Optional[Any], n_devices: int, n_gpus_per_node: int, *, train: bool,
                  gpu: bool, memory_per_device: int) -> ParallelismConfig:
    """The (dp, tp, pp) layout of one call on ``n_devices`` devices (module docstring: the rules).

    ``real_config`` None (no readable config.json) gives pure data parallelism.
    ``n_gpus_per_node`` bounds tp (a mesh inside one node passes its size).
    """
    if n_devices < 1:
        raise ConfigError(f"heuristic allocation needs at least one device, got {n_devices}.")
    dp_only = ParallelismConfig(1, 1, n_devices)
    if real_config is None:
        return dp_only
    if train:
        bpp = TRAIN_BYTES_PER_PARAM
    else:
        bpp = GPU_INFER_BYTES_PER_PARAM if gpu else CPU_INFER_BYTES_PER_PARAM
    need = count_params(real_config) * bpp
    shards = math.ceil(need / (USABLE_FRACTION * memory_per_device))
    if shards <= 1:
        return dp_only
    node = math.gcd(n_devices, max(1, n_gpus_per_node))
    tps = [t for t in _divisors(node) if _tp_ok(real_config, t)]
    candidates: List[Tuple[int, int]] = []
    for tp in tps:
        for pp in _divisors(n_devices // tp):
            if real_config.n_layers % pp == 0:
                candidates.append((pp, tp))
    fitting = sorted(c for c in candidates if c[0] * c[1] >= shards)
    if fitting:
        pp, tp = fitting[0]
    else:
        pp, tp = max(candidates, key=lambda c: (c[0] * c[1], -c[0]))
    return ParallelismConfig(model_parallel_size=tp, pipeline_parallel_size=pp,
                             data_parallel_size=n_devices // (tp * pp))


def heuristic_mfc(cfg: Any, mfc: str, n_devices: int, *, n_gpus_per_node: Optional[int] = None,
                  device_mesh: Optional[str] = None) -> MFCConfig:
    """The MFCConfig of call ``mfc`` of experiment config ``cfg`` on ``n_devices`` devices.

    Keeps the call's own ``n_mbs``/``max_tokens_per_mb``; training calls with
    tp > 1 use sequence parallelism.
    """
    model = cfg.mfc_models[mfc][1] if mfc in cfg.mfc_models else None
    try:
        real = load_real_config(model) if model is not None else None
    except Exception:  # unreadable config: validation reports it
        real = None
    gpn = n_gpus_per_node if n_gpus_per_node is not None else cfg.n_gpus_per_node
    gpu = cuda_available()
    train = mfc in cfg.train_mfc_names
    p = choose_layout(real, n_devices, gpn, train=train, gpu=gpu,
                      memory_per_device=device_memory_bytes(cfg.n_gpus_per_node, gpu))
    p.use_sequence_parallel = train and p.model_parallel_size > 1
    base = cfg.allocations.get(mfc)
    return MFCConfig(n_mbs=base.n_mbs if base is not None else None,
                     max_tokens_per_mb=base.max_tokens_per_mb if base is not None else None,
                     parallel=p, device_mesh=device_mesh, cpu_threads=base.cpu_threads if base is not None else None)


def whole_cluster_heuristic(cfg: Any, mfc_names: Optional[Sequence[str]] = None) -> Dict[str, MFCConfig]:
    """Every call on all devices of the cluster, each with its own layout."""
    n = cfg.n_nodes * cfg.n_gpus_per_node
    return {m: heuristic_mfc(cfg, m, n) for m in (mfc_names or cfg.mfc_names)}


__all__ = ["choose_layout", "count_params", "device_memory_bytes", "heuristic_mfc", "whole_cluster_heuristic"]
