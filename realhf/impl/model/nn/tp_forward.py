"""Forward passes of ReaLModel layers that hold a tensor-parallel shard.

The layers are the ordinary modules built from
:func:`~realhf.impl.model.nn.tp_partition.shard_config`, so their parameters
already have the shard shapes; these functions add the collectives around
them (Megatron style: one all-reduce after attention and one after the MLP).

Replicated parameters must end up with complete gradients on every rank, so
that an optimizer step keeps them identical. Norms therefore run *before*
``copy_to_tp_region`` (whose backward sums the partial input gradients of
the column-parallel projections), row-parallel biases are added after the
reduction, and replicated K/V projections, which every rank applies only for
its own query heads, pass their weights through ``copy_to_tp_region`` so that
their gradients are summed over ranks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from realhf.impl.model.modules.attention import Attention, PackedContext, packed_attention
from realhf.impl.model.modules.mlp import GatedMLP, PlainMLP
from realhf.impl.model.modules.rotary import apply_rotary
from realhf.impl.model.nn.real_llm_base import EmbeddingLayer, OutputHead, TransformerBlock
from realhf.impl.model.parallelism.tensor_parallel import mappings


@dataclasses.dataclass
class TPInfo:
    """What a shard needs to know about its place in the tensor-parallel group."""

    group: Any
    size: int
    rank: int
    full_n_q_heads: int
    full_n_kv_heads: int
    kv_replicated: bool


def embedding_forward(layer: EmbeddingLayer, input_ids: torch.Tensor, ctx: PackedContext, tp: TPInfo) -> torch.Tensor:
    """Vocab-parallel lookup: ids outside this rank's range contribute zeros."""
    weight = layer.wte.weight
    start = tp.rank * weight.shape[0]
    outside = (input_ids < start) | (input_ids >= start + weight.shape[0])
    local = (input_ids - start).masked_fill(outside, 0)
    x = F.embedding(local, weight).masked_fill(outside.unsqueeze(-1), 0.0)
    x = mappings.reduce_from_tp_region(x, tp.group)
    cfg = layer.config
    if layer.wpe is not None:
        x = x + layer.wpe(ctx.positions + cfg.abs_position_embedding_offset)
    if cfg.normalize_embed:
        x = x * torch.tensor(math.sqrt(cfg.hidden_dim), dtype=x.dtype)
    return layer.drop(x)


def _replicated_linear(h: torch.Tensor, linear: torch.nn.Linear, tp: TPInfo) -> torch.Tensor:
    weight = mappings.copy_to_tp_region(linear.weight, tp.group)
    bias = None if linear.bias is None else mappings.copy_to_tp_region(linear.bias, tp.group)
    return F.linear(h, weight, bias)


def _qkv(attn: Attention, x: torch.Tensor, tp: TPInfo) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = attn.config
    ca = attn.c_attn
    h = mappings.copy_to_tp_region(ca.ln(x), tp.group)
    q = ca.q_attn(h).view(-1, cfg.n_q_heads, cfg.head_dim)
    if not tp.kv_replicated:
        k = ca.k_attn(h).view(-1, cfg.n_kv_heads, cfg.head_dim)
        v = ca.v_attn(h).view(-1, cfg.n_kv_heads, cfg.head_dim)
        return q, k, v
    k = _replicated_linear(h, ca.k_attn, tp).view(-1, tp.full_n_kv_heads, cfg.head_dim)
    v = _replicated_linear(h, ca.v_attn, tp).view(-1, tp.full_n_kv_heads, cfg.head_dim)
    # Global query head g attends to KV head g // (n_q / n_kv); keep one per local query head.
    heads = torch.arange(cfg.n_q_heads, device=x.device) + tp.rank * cfg.n_q_heads
    kv_idx = heads // (tp.full_n_q_heads // tp.full_n_kv_heads)
    return q, k.index_select(1, kv_idx), v.index_select(1, kv_idx)


def _row_parallel(h: torch.Tensor, linear: torch.nn.Linear, tp: TPInfo) -> torch.Tensor:
    y = mappings.reduce_from_tp_region(F.linear(h, linear.weight), tp.group)
    return y if linear.bias is None else y + linear.bias


def attention_forward(
    attn: Attention,
    x: torch.Tensor,
    ctx: PackedContext,
    tp: TPInfo,
    kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Column-parallel q/k/v over local heads, row-parallel output projection."""
    cfg = attn.config
    q, k, v = _qkv(attn, x, tp)
    if cfg.apply_rotary:
        q = apply_rotary(q, ctx.cos, ctx.sin, cfg.rotary_interleaved)
        k = apply_rotary(k, ctx.cos, ctx.sin, cfg.rotary_interleaved)
    drop = attn.attn_drop if attn.training else 0.0
    o = packed_attention(q, k, v, ctx, attn.scale, cfg.sliding_window, kv_cache, dropout_p=drop)
    return _row_parallel(o.reshape(o.shape[0], -1), attn.c_proj, tp)


def mlp_forward(mlp: torch.nn.Module, x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    h = mappings.copy_to_tp_region(mlp.ln(x), tp.group)
    if isinstance(mlp, GatedMLP):
        return _row_parallel(mlp.act(mlp.gate_proj(h)) * mlp.up_proj(h), mlp.down_proj, tp)
    if isinstance(mlp, PlainMLP):
        return _row_parallel(mlp.act(mlp.c_fc(h)), mlp.c_proj, tp)
    raise NotImplementedError(f"No tensor-parallel forward for {type(mlp).__name__}.")


def block_forward(
    block: TransformerBlock,
    x: torch.Tensor,
    ctx: PackedContext,
    tp: TPInfo,
    kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    x = x + block.drop(attention_forward(block.attn, x, ctx, tp, kv_cache))
    x = x + block.drop(mlp_forward(block.mlp, x, tp))
    if block.is_last:
        x = block.ln_f(x)
    return x


def head_forward(head: OutputHead, x: torch.Tensor, tp: TPInfo, is_critic: bool, gather_logits: bool) -> torch.Tensor:
    """Actor: logits of this rank's vocab slice [T, V / tp] (all of them with
    ``gather_logits``); critic: the replicated value head [T]."""
    if is_critic:
        return head(x).squeeze(-1)
    logits = F.linear(mappings.copy_to_tp_region(x, tp.group), head.weight)
    if gather_logits:
        logits = mappings.gather_from_tp_region(logits, tp.group)
    return logits
