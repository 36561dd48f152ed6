"""The ``megatron`` backend name: megatron-core's DDP and distributed optimizer.

megatron-core's process-group topology and some tensor-parallel layers run on
CPU with gloo, but its data-parallel buffers and model paths allocate on
``torch.cuda.current_device()``, so this backend needs CUDA. Without
megatron-core or a CUDA device it fails at construction, before any worker
does work, and names the ``train`` backend, which offers the same options
(bucketed all-reduce, ZeRO-1, clipping, LR schedules) on any device.
"""

from __future__ import annotations

import importlib.util
from typing import Any, List

import torch

from realhf.api.core.model_api import FinetuneSpec, Model, ModelBackend, register_backend


def missing_requirements() -> List[str]:
    """What this machine lacks for the megatron backend (empty when usable)."""
    missing = []
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        missing.append("megatron-core is not installed (pip install megatron-core)")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is available (megatron-core allocates its buffers on the GPU)")
    return missing


class MegatronTrainBackend(ModelBackend):
    def __init__(self, **kwargs: Any):
        missing = missing_requirements()
        if missing:
            raise RuntimeError(
                "Backend 'megatron' cannot run here: " + "; ".join(missing) + ". "
                "Use backend 'train' instead: it provides the same options on CPU and GPU."
            )
        raise NotImplementedError(
            "Backend 'megatron' is not wired to megatron-core yet; use backend 'train'."
        )

    def _initialize(self, model: Model, spec: FinetuneSpec) -> Model:  # pragma: no cover
        raise NotImplementedError


register_backend("megatron", MegatronTrainBackend)
