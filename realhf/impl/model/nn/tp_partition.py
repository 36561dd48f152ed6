"""How the parameters of a ReaLModel are split over tensor-parallel ranks.

Keys are the global ReaLModel keys (``{layer}.{name}``); a rank's shard keeps
the key and holds a slice of the tensor:

* column-parallel (split along dim 0): q/k/v projections (weights and
  biases), gate/up/c_fc, the vocabulary embedding and the LM head;
* row-parallel (split along dim 1): attention and MLP output projections;
  their biases are replicated because they are added once after the
  all-reduce;
* K/V projections are replicated instead of split when the number of KV
  heads is not divisible by the tensor-parallel size;
* everything else (norms, absolute positions, the critic head) is replicated.

The shapes of a shard are exactly those of a model built from
:func:`shard_config`, so the flat layout of a tensor-parallel stage is
computed by the same code as an unsplit one.

With sequence parallelism the replicated parameters that act on the
residual stream see only this rank's token chunk;
:func:`sequence_parallel_grad_keys` lists them, since their gradients must be
all-reduced over the tensor-parallel group after backward.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import torch

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.nn.real_llm_base import layer_param_shapes
from realhf.impl.model.parallelism.tensor_parallel.layers import kv_heads_partition, shard_weight

COL = "col"
ROW = "row"
KV = "kv"
REP = "rep"

_COL_SUFFIXES = (
    "attn.c_attn.q_attn.weight",
    "attn.c_attn.q_attn.bias",
    "mlp.gate_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.weight",
    "mlp.up_proj.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
)
_KV_SUFFIXES = (
    "attn.c_attn.k_attn.weight",
    "attn.c_attn.k_attn.bias",
    "attn.c_attn.v_attn.weight",
    "attn.c_attn.v_attn.bias",
)
_ROW_SUFFIXES = ("attn.c_proj.weight", "mlp.down_proj.weight", "mlp.c_proj.weight")


def check_tp_supported(config: ReaLModelConfig, tp_size: int) -> None:
    """Fail early on configurations whose sizes cannot be split over ``tp_size``."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be positive, got {tp_size}.")
    if tp_size == 1:
        return
    if config.vocab_size % tp_size != 0:
        raise ValueError(
            f"vocab_size={config.vocab_size} must be divisible by the tensor-parallel size {tp_size}; "
            "pad the vocabulary."
        )
    for name in ("n_q_heads", "intermediate_dim"):
        if getattr(config, name) % tp_size != 0:
            raise ValueError(f"{name}={getattr(config, name)} is not divisible by tp_size={tp_size}.")
    if config.mlp_type == "moe":
        raise NotImplementedError("Tensor parallelism for MoE MLPs is not supported.")
    if config.qk_layernorm:
        raise NotImplementedError("Tensor parallelism with per-head q/k norms is not supported.")


def shard_config(config: ReaLModelConfig, tp_size: int) -> ReaLModelConfig:
    """The config whose layers have the shapes of one rank's shard.

    Replicated KV heads keep their full count, so the local head counts may
    violate the ``n_q_heads % n_kv_heads`` rule of a whole model; the config
    is therefore copied without re-running its validation.
    """
    check_tp_supported(config, tp_size)
    if tp_size == 1:
        return config
    n_kv, _ = kv_heads_partition(config.n_kv_heads, tp_size)
    local = copy.copy(config)
    local.n_q_heads = config.n_q_heads // tp_size
    local.n_kv_heads = n_kv
    local.intermediate_dim = config.intermediate_dim // tp_size
    local.vocab_size = config.vocab_size // tp_size
    return local


def cache_kv_heads(config: ReaLModelConfig, tp_size: int) -> int:
    """KV heads per rank in a KV cache: replicated heads are stored once per local query head."""
    n_kv, replicated = kv_heads_partition(config.n_kv_heads, tp_size)
    return config.n_q_heads // tp_size if replicated else n_kv


def param_kind(key: str, config: ReaLModelConfig) -> str:
    """How the parameter ``key`` is split: COL, ROW, KV or REP."""
    idx, name = key.split(".", 1)
    layer = int(idx)
    if layer == 0:
        return COL if name == "wte.weight" else REP
    if layer == config.n_layers + 1:
        return REP if config.is_critic else COL
    if name.endswith(_COL_SUFFIXES):
        return COL
    if name.endswith(_KV_SUFFIXES):
        return KV
    if name.endswith(_ROW_SUFFIXES):
        return ROW
    return REP


def sequence_parallel_grad_keys(config: ReaLModelConfig) -> List[str]:
    """Keys whose gradients are partial per rank under sequence parallelism.

    These are the replicated (REP) parameters applied to the local token
    chunk: the norms (incl. the final ``ln_f``), the row-parallel biases added
    after the reduce-scatter and learned absolute positions. They must be
    all-reduced over the tensor-parallel group after backward. The critic
    head is excluded: it runs on the all-gathered tokens, so its gradient is
    already complete, as are those of split or replicated K/V parameters.
    """
    head = config.n_layers + 1
    return [
        key
        for i in range(head)
        for key, _ in layer_param_shapes(config, i)
        if param_kind(key, config) == REP
    ]


def partition_tensor(key: str, full: torch.Tensor, config: ReaLModelConfig, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's shard of the unsplit tensor ``full`` stored under ``key``."""
    kind = param_kind(key, config)
    if tp_size == 1 or kind == REP:
        return full
    if kind == COL:
        return shard_weight(full, 0, tp_rank, tp_size)
    if kind == ROW:
        return shard_weight(full, 1, tp_rank, tp_size)
    _, replicated = kv_heads_partition(config.n_kv_heads, tp_size)
    return full if replicated else shard_weight(full, 0, tp_rank, tp_size)


def partition_state_dict(
    full_sd: Dict[str, torch.Tensor], config: ReaLModelConfig, tp_size: int, tp_rank: int
) -> Dict[str, torch.Tensor]:
    """Unsplit state dict -> the shards held by ``tp_rank`` (same keys)."""
    check_tp_supported(config, tp_size)
    return {k: partition_tensor(k, v, config, tp_size, tp_rank) for k, v in full_sd.items()}


def merge_state_dicts(shards: Sequence[Dict[str, torch.Tensor]], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`partition_state_dict` over all ranks (in rank order).

    Replicated tensors are taken from rank 0. Also merges per-rank gradients
    keyed the same way, provided replicated gradients are already complete.
    """
    tp_size = len(shards)
    if tp_size == 0:
        raise ValueError("No shards to merge.")
    if tp_size == 1:
        return dict(shards[0])
    _, kv_replicated = kv_heads_partition(config.n_kv_heads, tp_size)
    merged: Dict[str, torch.Tensor] = {}
    for key in shards[0]:
        parts: List[torch.Tensor] = [s[key] for s in shards]
        kind = param_kind(key, config)
        if kind == COL or (kind == KV and not kv_replicated):
            merged[key] = torch.cat(parts, dim=0)
        elif kind == ROW:
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = parts[0].clone()
    return merged
