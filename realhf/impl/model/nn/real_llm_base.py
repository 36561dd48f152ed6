"""Layers of a ReaLModel and the naming of their parameters.

A model is a list of layers indexed globally: 0 is the embedding, 1..n the
transformer blocks and n + 1 the output head. The key of a parameter is
``"{layer_index}.{name inside the layer}"`` (e.g. ``3.attn.c_attn.q_attn.weight``),
independent of which pipeline stage holds the layer, so that keys identify the
same tensor in every parallel layout.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.modules.attention import Attention, PackedContext
from realhf.impl.model.modules.mlp import make_mlp
from realhf.impl.model.modules.norm import make_norm


def _uninitialized_embedding(n: int, dim: int) -> nn.Embedding:
    """An embedding table whose initializer does not run: layers are built on the meta device and
    their weights are set afterwards from the flat buffer. (On meta, ``normal_`` runs through torch's
    Python decompositions, whose first use imports torch._dynamo, and triton where it is installed:
    ~1.2 s in every worker for values that do not exist.)"""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class EmbeddingLayer(nn.Module):
    """Token embedding plus optional learned absolute positions (gpt2)."""

    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        self.config = config
        self.wte = _uninitialized_embedding(config.vocab_size, config.hidden_dim)
        if not config.apply_rotary and config.n_positions is not None:
            n_positions = config.n_positions + config.abs_position_embedding_offset
            self.wpe = _uninitialized_embedding(n_positions, config.hidden_dim)
        else:
            self.wpe = None
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, input_ids: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(ctx.positions + self.config.abs_position_embedding_offset)
        if self.config.normalize_embed:
            # gemma scales by sqrt(hidden) rounded to the activation dtype.
            x = x * torch.tensor(math.sqrt(self.config.hidden_dim), dtype=x.dtype)
        return self.drop(x)


class TransformerBlock(nn.Module):
    """Pre-norm block; the norms live inside ``attn.c_attn`` and ``mlp``.

    The last block also owns the final norm ``ln_f`` so that a model has no
    norm-only layer between the last block and the head.
    """

    def __init__(self, config: ReaLModelConfig, block_index: int):
        super().__init__()
        if not config.do_layernorm_before:
            raise NotImplementedError("Only pre-norm transformer blocks are supported.")
        self.attn = Attention(config, block_index)
        self.mlp = make_mlp(config)
        self.drop = nn.Dropout(config.resid_pdrop)
        self.is_last = block_index == config.n_layers - 1
        if self.is_last:
            self.ln_f = make_norm(config.layer_norm_type, config.hidden_dim, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, ctx: PackedContext, kv_cache=None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rows``: compute the output of these rows only. Keys and values still come
        from every row; the output projection, the residual and the MLP skip the others."""
        a = self.attn(x, ctx, kv_cache, rows=rows)
        if rows is not None:
            x = x.index_select(0, rows)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(x))
        if self.is_last:
            x = self.ln_f(x)
        return x


class OutputHead(nn.Linear):
    """Bias-free projection: vocab logits (actor) or one value (critic)."""

    def __init__(self, config: ReaLModelConfig):
        out = 1 if config.is_critic else config.vocab_size
        super().__init__(config.hidden_dim, out, bias=False)


def layer_kind(config: ReaLModelConfig, layer_index: int) -> str:
    if layer_index == 0:
        return "embedding"
    if 1 <= layer_index <= config.n_layers:
        return "block"
    if layer_index == config.n_layers + 1:
        return "head"
    raise IndexError(f"Layer index {layer_index} out of range [0, {config.n_layers + 1}].")


def make_layer(config: ReaLModelConfig, layer_index: int) -> nn.Module:
    kind = layer_kind(config, layer_index)
    if kind == "embedding":
        return EmbeddingLayer(config)
    if kind == "block":
        return TransformerBlock(config, layer_index - 1)
    return OutputHead(config)


def head_key(config: ReaLModelConfig) -> str:
    return f"{config.n_layers + 1}.weight"


def is_tied_on_stage(config: ReaLModelConfig, layer_indices: Sequence[int]) -> bool:
    """Embedding and head share one tensor only when both are on this stage."""
    return config.tied_embedding and 0 in layer_indices and (config.n_layers + 1) in layer_indices


# Building a layer on the meta device costs ~1 ms; layouts, plans and checks ask
# for the same shapes on every parameter reallocation, so they are memoized
# per (config, layer); the key is the config's repr, which lists every field.
_SHAPES_CACHE: Dict[Tuple[str, int], Tuple[Tuple[str, torch.Size], ...]] = {}
_PARTITION_CACHE: Dict[Tuple[str, int], Tuple[Tuple[int, ...], ...]] = {}
_CACHE_LIMIT = 4096


def _remember(cache: dict, key, value):
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def layer_param_shapes(config: ReaLModelConfig, layer_index: int) -> List[Tuple[str, torch.Size]]:
    """(key, shape) of one layer in registration order, built on the meta device."""
    key = (repr(config), layer_index)
    shapes = _SHAPES_CACHE.get(key)
    if shapes is None:
        with torch.device("meta"):
            layer = make_layer(config, layer_index)
        shapes = _remember(_SHAPES_CACHE, key,
                           tuple((f"{layer_index}.{n}", p.shape) for n, p in layer.named_parameters()))
    return list(shapes)


def layer_num_params(config: ReaLModelConfig, layer_index: int) -> int:
    return sum(math.prod(s) for _, s in layer_param_shapes(config, layer_index))


def partition_layers(config: ReaLModelConfig, pp_size: int) -> List[List[int]]:
    """Contiguous split of layers 0..n+1 into ``pp_size`` stages minimizing the
    largest stage's parameter count (each stage gets at least one layer)."""
    n_total = config.n_layers + 2
    if not 1 <= pp_size <= n_total:
        raise ValueError(f"pp_size={pp_size} must be in [1, {n_total}].")
    key = (repr(config), pp_size)
    stages = _PARTITION_CACHE.get(key)
    if stages is None:
        stages = _remember(_PARTITION_CACHE, key, tuple(map(tuple, _partition_layers(config, pp_size, n_total))))
    return [list(s) for s in stages]


def _partition_layers(config: ReaLModelConfig, pp_size: int, n_total: int) -> List[List[int]]:
    sizes = [layer_num_params(config, i) for i in range(n_total)]
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][j]: minimal max-stage size splitting the first j layers into k stages.
    best = [[inf] * (n_total + 1) for _ in range(pp_size + 1)]
    cut = [[0] * (n_total + 1) for _ in range(pp_size + 1)]
    best[0][0] = 0
    for k in range(1, pp_size + 1):
        for j in range(k, n_total + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [], n_total
    for k in range(pp_size, 0, -1):
        i = cut[k][j]
        bounds.append(list(range(i, j)))
        j = i
    return bounds[::-1]
