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

Sequence parallelism (``TPInfo.sequence_parallel``): the residual stream
between sublayers is split along the token dimension, so norms, dropout and
residual adds run on ``T_pad / tp`` tokens per rank (the packed tokens are
padded at the end to a multiple of tp). Each sublayer all-gathers its normed
input (backward: reduce-scatter, which also sums the partial gradients that
``copy_to_tp_region`` would otherwise sum) and reduce-scatters its
row-parallel output instead of all-reducing it. Attention runs on the
gathered, unpadded tokens, so the packed context is unchanged. Replicated
parameters used on the local chunk then get partial gradients, which the
caller all-reduces (see ``tp_partition.sequence_parallel_grad_keys``).
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
    # Split the residual stream over tokens; ``sp_pad`` rows were appended to
    # the packed tokens so that they divide evenly over ranks.
    sequence_parallel: bool = False
    sp_pad: int = 0


def local_chunk(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """This rank's token chunk of an already padded tensor that needs no gradient."""
    n = x.shape[0] // tp.size
    return x.narrow(0, tp.rank * n, n)


def enter_tp_region(h: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Input of column-parallel compute: all tokens on every rank.

    With SP the local chunks are all-gathered (backward reduce-scatter) and
    the padding is dropped; otherwise the identity with all-reduce backward.
    """
    if not tp.sequence_parallel:
        return mappings.copy_to_tp_region(h, tp.group)
    h = mappings.gather_from_sequence_parallel_region(h, tp.group, tensor_parallel_output_grad=True)
    return mappings.unpad(h, tp.sp_pad)


def exit_tp_region(y: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Sum the partial outputs of row-parallel compute (this rank's chunk with SP)."""
    if not tp.sequence_parallel:
        return mappings.reduce_from_tp_region(y, tp.group)
    y, _ = mappings.pad_to_multiple(y, tp.size)
    return mappings.reduce_scatter_to_sequence_parallel_region(y, tp.group)


def scatter_stage_input(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Full [T, H] hidden states entering a stage -> this rank's padded chunk."""
    x, _ = mappings.pad_to_multiple(x, tp.size)
    return mappings.scatter_to_sequence_parallel_region(x, tp.group)


def gather_stage_output(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """This rank's chunk -> full [T, H] hidden states leaving a stage.

    The next consumer sees replicated hidden states (next stage or critic
    head), so each rank's gradient is complete and backward only splits it.
    """
    x = mappings.gather_from_sequence_parallel_region(x, tp.group, tensor_parallel_output_grad=False)
    return mappings.unpad(x, tp.sp_pad)


def embedding_forward(layer: EmbeddingLayer, input_ids: torch.Tensor, ctx: PackedContext, tp: TPInfo) -> torch.Tensor:
    """Vocab-parallel lookup: ids outside this rank's range contribute zeros.

    With SP ``input_ids`` are already padded and the sum over ranks is a
    reduce-scatter; positions are then added on the local chunk only.
    """
    weight = layer.wte.weight
    start = tp.rank * weight.shape[0]
    outside = (input_ids < start) | (input_ids >= start + weight.shape[0])
    local = (input_ids - start).masked_fill(outside, 0)
    x = F.embedding(local, weight).masked_fill(outside.unsqueeze(-1), 0.0)
    x = exit_tp_region(x, tp)
    cfg = layer.config
    if layer.wpe is not None:
        positions = ctx.positions
        if tp.sequence_parallel:
            positions = local_chunk(mappings.pad_to_multiple(positions, tp.size)[0], tp)
        x = x + layer.wpe(positions + cfg.abs_position_embedding_offset)
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
    h = enter_tp_region(ca.ln(x), tp)
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
    y = exit_tp_region(F.linear(h, linear.weight), tp)
    return y if linear.bias is None else y + linear.bias


def attention_forward(
    attn: Attention,
    x: torch.Tensor,
    ctx: PackedContext,
    tp: TPInfo,
    kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Column-parallel q/k/v over local heads, row-parallel output projection.

    ``x`` is the local token chunk with SP; attention itself sees all tokens.
    """
    cfg = attn.config
    q, k, v = _qkv(attn, x, tp)
    if cfg.apply_rotary:
        q = apply_rotary(q, ctx.cos, ctx.sin, cfg.rotary_interleaved)
        k = apply_rotary(k, ctx.cos, ctx.sin, cfg.rotary_interleaved)
    drop = attn.attn_drop if attn.training else 0.0
    o = packed_attention(q, k, v, ctx, attn.scale, attn.window, kv_cache, dropout_p=drop)
    return _row_parallel(o.reshape(o.shape[0], -1), attn.c_proj, tp)


def mlp_forward(mlp: torch.nn.Module, x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    h = enter_tp_region(mlp.ln(x), tp)
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
    ``gather_logits``); critic: the replicated value head [T].

    With SP ``x`` is the local chunk; the output always has the T real rows.
    """
    if is_critic:
        if tp.sequence_parallel:
            x = gather_stage_output(x, tp)
        return head(x).squeeze(-1)
    logits = F.linear(enter_tp_region(x, tp), head.weight)
    if gather_logits:
        logits = mappings.gather_from_tp_region(logits, tp.group)
    return logits
