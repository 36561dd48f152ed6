"""ReaLModel: a decoder-only transformer whose stage parameters share one flat buffer.

Construction is lazy: ``ReaLModel(config, ...)`` builds the layers on the meta
device and computes the flat layout; ``instantiate()`` allocates the buffer
(``model.flat_param``) and turns every parameter into a view of it at the slot
given by ``model.param_spec[key]``. A model may hold any contiguous subset of
layers (a pipeline stage) and runs alone:

* the stage holding layer 0 takes ``input_ids``; other stages take
  ``hidden_states`` [total_tokens, hidden];
* the stage holding the head returns logits [total_tokens, vocab] (or values
  [total_tokens] for a critic); other stages return hidden states.

Forward contract (packed, no padding): sequence i is
``input_ids[cu_seqlens[i]:cu_seqlens[i+1]]``; without a cache positions restart
at 0 per sequence and attention is causal within a sequence. With a
``KVCache`` the new tokens of sequence i are appended to cache row i after
``kv_cache.seqlens[i]`` tokens, take positions ``seqlens[i] + arange(len_i)``,
attend to the row's cached tokens and themselves, and ``seqlens`` advances
(rows may have length 0). Each stage keeps its own cache (one entry per block).

Tensor parallelism (``tp_size > 1``, given or taken from the active model
scope): the stage holds only its shard (see ``tp_partition``), the actor head
returns this rank's vocabulary slice of the logits [total_tokens, vocab / tp]
(all of them with ``gather_logits=True``), and ``load_state_dict`` accepts
shards or unsplit tensors.

Sequence parallelism (``sequence_parallel``, tp_size > 1 only): inside a
stage the residual stream is split over the tensor-parallel ranks along the
token dimension (see ``tp_forward``); the stage interface is unchanged (full
[total_tokens, ...] inputs and outputs). It is skipped when a ``KVCache`` is
passed, so decoding always runs without it. After backward call
:meth:`ReaLModel.reduce_sequence_parallel_grads` to complete the gradients
of the replicated parameters that saw only this rank's tokens.

Shared prefixes (``share_prefixes``, on by default): without a cache, a
single-stage model without tensor parallelism packs consecutive sequences
that share a prefix (GRPO's answers to one prompt) as a prefix tree (see
``prefix_tree``), computing the prefix once; the outputs are gathered back
to the flat layout, so callers see no difference but the time.

Gradient checkpointing (``gradient_checkpointing``): in training mode with
grad enabled and no cache, each block's activations are recomputed in
backward (non-reentrant ``torch.utils.checkpoint``, RNG state preserved).

Choose dtype and device at construction: ``module.to()``/``.half()`` would
replace the views by standalone tensors and detach them from ``flat_param``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from realhf.api.core.model_api import ReaLModelConfig
from realhf.base import constants
from realhf.impl.model.modules.attention import PackedContext
from realhf.impl.model.modules.norm import norm_init_value
from realhf.impl.model.modules.rotary import rotary_cos_sin, rotary_inv_freq
from realhf.impl.model.nn.flat_param import ParamSlot, build_param_spec, param_view
from realhf.impl.model.nn.kv_cache import KVCache
from realhf.impl.model.nn.real_llm_base import (
    EmbeddingLayer,
    TransformerBlock,
    head_key,
    is_tied_on_stage,
    layer_param_shapes,
    make_layer,
    partition_layers,
)
from realhf.impl.model.nn import linear_replay, offload, prefix_tree, tp_forward
from realhf.impl.model.nn.tp_partition import (
    cache_kv_heads,
    partition_tensor,
    sequence_parallel_grad_keys,
    shard_config,
)
from realhf.impl.model.parallelism.tensor_parallel import mappings
from realhf.impl.model.parallelism.tensor_parallel.layers import kv_heads_partition


def _split_key(key: str):
    idx, name = key.split(".", 1)
    return int(idx), name


def _scope_tp() -> Tuple[int, int]:
    """(size, rank) of the active model's tensor-parallel group; (1, 0) without a scope."""
    if constants.in_model_scope():
        return constants.tensor_parallel_world_size(), constants.tensor_parallel_rank()
    return 1, 0


def _scope_option(value: Optional[bool], option) -> bool:
    """``value`` if given, else the active model scope's topology option (False without a scope)."""
    if value is not None:
        return bool(value)
    try:
        return bool(option())
    except RuntimeError:
        return False


class ReaLModel(nn.Module):
    """A decoder-only transformer whose parameters live in one flat buffer.

    The model holds the layers of one pipeline stage (all layers by default;
    ``layer_indices`` or ``(pp_size, pp_rank)`` select a stage, split evenly
    by parameter count). Index 0 is the embedding, 1..n the blocks, n+1 the
    head (vocab logits, or one value per token for a critic).

    Construction only computes the layout (on the meta device);
    :meth:`instantiate` allocates ``flat_param`` and makes every parameter a
    view into it at ``param_spec[key]``. Because the whole stage is one
    buffer, parameter reallocation moves intervals of it between layouts.

    ``forward(input_ids, cu_seqlens, max_seqlen, kv_cache=None)`` takes packed
    variable-length sequences (no padding); with a :class:`KVCache` the
    tokens of row i are appended after the row's cached tokens.

    ``sequence_parallel`` and ``gradient_checkpointing`` default to the
    active model scope's topology options (False without a scope).
    """

    def __init__(
        self,
        config: ReaLModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layer_indices: Optional[Sequence[int]] = None,
        pp_size: int = 1,
        pp_rank: int = 0,
        tp_size: Optional[int] = None,
        tp_rank: Optional[int] = None,
        tp_group: Any = None,
        sequence_parallel: Optional[bool] = None,
        gradient_checkpointing: Optional[bool] = None,
    ):
        super().__init__()
        self.config = config
        if tp_size is None:
            tp_size, scope_rank = _scope_tp()
            tp_rank = scope_rank if tp_rank is None else tp_rank
        tp_rank = 0 if tp_rank is None else tp_rank
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank} out of range for tp_size={tp_size}.")
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self._tp_group = tp_group
        # Plain attributes, so they can be toggled after construction.
        self.sequence_parallel = _scope_option(sequence_parallel, constants.sequence_parallel)
        self.gradient_checkpointing = _scope_option(gradient_checkpointing, constants.gradient_checkpointing)
        self.share_prefixes = True
        # Layer shapes: the whole model, or this rank's shard of it.
        self.local_config = shard_config(config, tp_size)
        self.dtype = dtype
        self.device = torch.device(device)
        if layer_indices is None:
            layer_indices = partition_layers(config, pp_size)[pp_rank]
        self.layer_indices: List[int] = sorted(layer_indices)
        if self.layer_indices != list(range(self.layer_indices[0], self.layer_indices[-1] + 1)):
            raise ValueError(f"Layer indices of a stage must be contiguous, got {self.layer_indices}.")
        with torch.device("meta"):
            self.layers = nn.ModuleList(make_layer(self.local_config, i) for i in self.layer_indices)
        self.tied_on_stage = is_tied_on_stage(config, self.layer_indices)
        self.param_spec, self.flat_size = build_param_spec(self.local_config, self.layer_indices)
        self.flat_param: Optional[torch.Tensor] = None
        self.n_blocks = sum(isinstance(l, TransformerBlock) for l in self.layers)
        self._inv_freq: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ layout
    @property
    def has_embedding(self) -> bool:
        return self.layer_indices[0] == 0

    @property
    def has_head(self) -> bool:
        return self.layer_indices[-1] == self.config.n_layers + 1

    @property
    def instantiated(self) -> bool:
        return self.flat_param is not None

    def tp_info(self) -> tp_forward.TPInfo:
        """The tensor-parallel group: the one given, the active scope's, or the whole world."""
        group = self._tp_group
        if group is None and constants.in_model_scope():
            group = constants.tensor_parallel_group()
        elif group is None:
            if not (dist.is_initialized() and dist.get_world_size() == self.tp_size):
                raise RuntimeError(
                    f"ReaLModel with tp_size={self.tp_size} needs tp_group=, an active model scope, "
                    "or a default process group of that size."
                )
            group = dist.group.WORLD
        if dist.get_world_size(group) != self.tp_size or dist.get_rank(group) != self.tp_rank:
            raise RuntimeError(
                f"Tensor-parallel group has size {dist.get_world_size(group)} and rank {dist.get_rank(group)}, "
                f"model was built for size {self.tp_size} rank {self.tp_rank}."
            )
        _, replicated = kv_heads_partition(self.config.n_kv_heads, self.tp_size)
        return tp_forward.TPInfo(
            group, self.tp_size, self.tp_rank, self.config.n_q_heads, self.config.n_kv_heads, replicated
        )

    def layer(self, layer_index: int) -> nn.Module:
        return self.layers[layer_index - self.layer_indices[0]]

    def _owner(self, key: str):
        """(module, attribute name) holding the parameter ``key``."""
        idx, name = _split_key(key)
        mod = self.layer(idx)
        *path, attr = name.split(".")
        for p in path:
            mod = getattr(mod, p)
        return mod, attr

    def instantiate(self, init: bool = True) -> "ReaLModel":
        """Allocate the flat buffer and make each parameter a view of it."""
        flat = torch.empty(self.flat_size, dtype=self.dtype, device=self.device)
        self.bind_flat_param(flat)
        if init:
            self.init_weights()
        return self

    def bind_flat_param(self, flat: torch.Tensor, spec: Optional[Dict[str, ParamSlot]] = None) -> None:
        """Point all parameters at ``flat`` (also used to install a buffer filled elsewhere)."""
        spec = spec or self.param_spec
        if flat.numel() != self.flat_size:
            raise ValueError(f"Flat buffer has {flat.numel()} elements, layout needs {self.flat_size}.")
        params: Dict[ParamSlot, nn.Parameter] = {}
        for key, slot in spec.items():
            if slot not in params:
                params[slot] = nn.Parameter(param_view(flat, slot))
            mod, attr = self._owner(key)
            mod._parameters[attr] = params[slot]
        self.flat_param = flat
        self._inv_freq = None

    @torch.no_grad()
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: Optional[int] = None) -> None:
        """Random weights that depend only on (seed, parameter key).

        Each matrix is drawn whole from its own generator and this rank keeps
        its tensor-parallel shard, so every layout (and every replica) of the
        same model starts from identical weights: an actor and its reference
        built from scratch on different meshes agree before training.
        """
        base = seed if seed is not None else torch.initial_seed()
        block_norm = norm_init_value(self.config.layer_norm_type)
        full_shapes = dict(kv for i in self.layer_indices for kv in layer_param_shapes(self.config, i))
        for key in self.param_spec:
            p = self.get_param(key)
            name = key.split(".", 1)[1]
            if name.endswith(("q_ln.weight", "k_ln.weight")):  # always plain RMS norms
                p.fill_(1.0)
            elif name.endswith(("ln.weight", "ln_f.weight")):
                p.fill_(block_norm)
            elif name.endswith("bias"):
                p.zero_()
            else:
                # A tied head is the embedding matrix, wherever each copy lives.
                draw = "0.wte.weight" if self.config.tied_embedding and key == head_key(self.config) else key
                gen = torch.Generator().manual_seed((base * 1_000_003 + zlib.crc32(draw.encode())) % 2**63)
                full = torch.empty(full_shapes[key]).normal_(0.0, std, generator=gen)
                p.copy_(partition_tensor(key, full, self.config, self.tp_size, self.tp_rank))

    def get_param(self, key: str) -> torch.Tensor:
        mod, attr = self._owner(key)
        return getattr(mod, attr)

    # ------------------------------------------------------------- state dict
    def state_dict(self, *args, **kwargs) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        """Global keys (``{layer}.{name}``) -> tensors (views of the flat buffer)."""
        return {k: self.get_param(k).detach() for k in self.param_spec}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True):  # type: ignore[override]
        """Copy into the existing views, so the flat buffer stays the storage.

        With ``tp_size > 1`` each tensor may be this rank's shard or the
        unsplit tensor, which is then partitioned.
        """
        missing = [k for k in self.param_spec if k not in state_dict]
        if self.tied_on_stage:
            hk = head_key(self.config)
            missing = [k for k in missing if k != hk and k != "0.wte.weight"]
            if "0.wte.weight" not in state_dict and hk not in state_dict:
                missing.append("0.wte.weight")
        unexpected = [k for k in state_dict if k not in self.param_spec]
        if strict and (missing or unexpected):
            raise KeyError(f"State dict mismatch: missing {missing}, unexpected {unexpected}.")
        for k, v in state_dict.items():
            if k in self.param_spec:
                p = self.get_param(k)
                if self.tp_size > 1 and tuple(v.shape) != tuple(p.shape):
                    v = partition_tensor(k, v, self.config, self.tp_size, self.tp_rank)
                p.copy_(v)
        return missing, unexpected

    # ---------------------------------------------------------------- forward
    def _context(self, cu_seqlens: torch.Tensor, max_seqlen: int, kv_cache: Optional[KVCache],
                 tree: Optional[prefix_tree.PrefixTree] = None) -> PackedContext:
        cu = cu_seqlens.to(device=self.device, dtype=torch.int64)
        seqlens = cu[1:] - cu[:-1]
        total = int(cu[-1])
        seq_ids = torch.repeat_interleave(torch.arange(seqlens.shape[0], device=self.device), seqlens, output_size=total)
        past = None
        positions = torch.arange(total, device=self.device) - cu[seq_ids] if tree is None else tree.positions
        if kv_cache is not None:
            if kv_cache.bs != seqlens.shape[0]:
                raise ValueError(f"Batch size {seqlens.shape[0]} differs from the cache's {kv_cache.bs}.")
            past = kv_cache.seqlens.to(self.device)
            if kv_cache.k and bool((past + seqlens > kv_cache.capacity).any()):
                raise ValueError(f"KV cache capacity {kv_cache.capacity} exceeded.")
            positions = positions + past[seq_ids]
        ctx = PackedContext(cu, int(max_seqlen), seqlens, positions, seq_ids, past=past,
                            tree=None if tree is None else tree.attention)
        cfg = self.config
        if cfg.apply_rotary and self.n_blocks > 0:
            if self._inv_freq is None:
                self._inv_freq = rotary_inv_freq(
                    cfg.head_dim, cfg.rotary_base, cfg.rotary_scaling, cfg.rotary_scaling_type, cfg.rotary_scaling_extra
                ).to(self.device)
            ctx.cos, ctx.sin = rotary_cos_sin(positions, self._inv_freq)
        return ctx

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        kv_cache: Optional[KVCache] = None,
        hidden_states: Optional[torch.Tensor] = None,
        gather_logits: bool = False,
        output_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Packed forward; see the module docstring and ``KVCache`` for the cache rule.

        ``gather_logits`` all-gathers a tensor-parallel actor's vocab-sharded
        logits (no effect without tensor parallelism). ``output_rows`` (indices
        into the packed tokens) returns the outputs of those rows only, in that
        order: where this stage ends with the last block and the head, the last
        block's attention output projection and MLP and the head then skip the
        other rows (a loss that reads answer tokens, a score read at the last
        token); elsewhere the full output is indexed.
        """
        if not self.instantiated:
            if offload.is_offloaded(self):
                raise offload.ModelOffloadedError(
                    "ReaLModel is offloaded; call realhf.impl.model.nn.offload.reload(model) before forward."
                )
            raise RuntimeError("Call instantiate() (or load weights) before forward.")
        tree = self._prefix_tree(input_ids, cu_seqlens, kv_cache, hidden_states)
        replay = None  # a rollout's products for these sequences (linear_replay)
        if getattr(self, "_rollout_captures", None) and kv_cache is None and hidden_states is None:
            replay = linear_replay.replay_rows(self, input_ids, cu_seqlens)
        if tree is not None:
            input_ids, cu_seqlens, max_seqlen = tree.input_ids, tree.cu_seqlens, None
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        ctx = self._context(cu_seqlens, max_seqlen, kv_cache, tree)
        if kv_cache is not None and len(kv_cache.k) != self.n_blocks:
            raise ValueError(f"Cache has {len(kv_cache.k)} layers, this model has {self.n_blocks} blocks.")
        if self.tp_size > 1:
            out = self._tp_forward(input_ids, ctx, kv_cache, hidden_states, gather_logits)
            return out if output_rows is None else out.index_select(0, output_rows.to(out.device))
        rows = None  # output rows in this forward's layout, when the last block computes only them
        if output_rows is not None:
            output_rows = output_rows.to(self.device)
            if self._rows_in_last_block(kv_cache):
                rows = output_rows if tree is None else tree.expand.index_select(0, output_rows)
        with contextlib.nullcontext() if replay is None else self._replayed(replay, tree, rows):
            x = self._layers_forward(input_ids, hidden_states, ctx, kv_cache, rows)
        if kv_cache is not None:
            kv_cache.seqlens += ctx.seqlens.to(kv_cache.seqlens.device)
        if rows is not None:
            return x
        x = x if tree is None else x.index_select(0, tree.expand)
        return x if output_rows is None else x.index_select(0, output_rows)

    def _layers_forward(self, input_ids: Optional[torch.Tensor], x: Optional[torch.Tensor], ctx: PackedContext,
                        kv_cache: Optional[KVCache], rows: Optional[torch.Tensor]) -> torch.Tensor:
        block = 0
        for idx, layer in zip(self.layer_indices, self.layers):
            offload.wait_layer(self, idx)  # overlapped reload: wait for this layer's copy only
            if isinstance(layer, EmbeddingLayer):
                x = layer(input_ids.to(self.device), ctx)
            elif isinstance(layer, TransformerBlock):
                cache = None if kv_cache is None else (kv_cache.k[block], kv_cache.v[block])
                r = rows if layer.is_last else None
                if self._checkpoint_blocks(kv_cache):
                    x = checkpoint(layer, x, ctx, None, r, use_reentrant=False)
                else:
                    x = layer(x, ctx, cache, r)
                block += 1
            else:
                x = layer(x)
                if self.config.is_critic:
                    x = x.squeeze(-1)
        return x

    def _replayed(self, replay, tree: Optional[prefix_tree.PrefixTree], rows: Optional[torch.Tensor]):
        """linear_replay.replayed with the capture rows of this forward's layout: a tree row
        takes those of any flat token it stands for (shared tokens have equal products)."""
        capture, flat_rows = replay
        if tree is None:
            layout_rows = flat_rows
        else:
            layout_rows = torch.empty(tree.n_tokens, dtype=torch.int64)
            layout_rows[tree.expand.cpu()] = flat_rows
        last = None if rows is None else layout_rows.index_select(0, rows.cpu())
        return linear_replay.replayed(self, capture, layout_rows, last)

    def _rows_in_last_block(self, kv_cache: Optional[KVCache]) -> bool:
        """Whether ``output_rows`` can be applied inside the last block: it and the head are
        on this stage and no MoE router counts the tokens (a cache still gets every row's
        keys and values: the rows are taken after attention)."""
        return (self.has_head and self.config.mlp_type != "moe"
                and any(isinstance(layer, TransformerBlock) and layer.is_last for layer in self.layers))

    def _prefix_tree(self, input_ids: Optional[torch.Tensor], cu_seqlens: torch.Tensor, kv_cache: Optional[KVCache],
                     hidden_states: Optional[torch.Tensor]) -> Optional[prefix_tree.PrefixTree]:
        """The prefix-tree layout of this forward's batch, when it applies and saves enough."""
        if (not self.share_prefixes or kv_cache is not None or hidden_states is not None or input_ids is None
                or not (self.has_embedding and self.has_head) or self.tp_size > 1
                or self.config.mlp_type == "moe"):  # the router's balance loss counts tokens
            return None
        return prefix_tree.build_prefix_tree(input_ids, cu_seqlens, device=self.device)

    def _tp_forward(
        self,
        input_ids: Optional[torch.Tensor],
        ctx: PackedContext,
        kv_cache: Optional[KVCache],
        hidden_states: Optional[torch.Tensor],
        gather_logits: bool,
    ) -> torch.Tensor:
        tp = self.tp_info()
        total = ctx.positions.shape[0]
        # Decoding with a cache runs without SP; an empty batch has nothing to split.
        sp = self.sequence_parallel and kv_cache is None and total > 0
        x = hidden_states
        if sp:
            pad = mappings.padded_length(total, tp.size) - total
            tp = dataclasses.replace(tp, sequence_parallel=True, sp_pad=pad)
            if input_ids is not None:
                input_ids, _ = mappings.pad_to_multiple(input_ids, tp.size)
            if not self.has_embedding:
                x = tp_forward.scatter_stage_input(x, tp)
        block = 0
        for idx, layer in zip(self.layer_indices, self.layers):
            offload.wait_layer(self, idx)  # overlapped reload: wait for this layer's copy only
            if isinstance(layer, EmbeddingLayer):
                x = tp_forward.embedding_forward(layer, input_ids.to(self.device), ctx, tp)
            elif isinstance(layer, TransformerBlock):
                cache = None if kv_cache is None else (kv_cache.k[block], kv_cache.v[block])
                if self._checkpoint_blocks(kv_cache):
                    x = checkpoint(tp_forward.block_forward, layer, x, ctx, tp, None, use_reentrant=False)
                else:
                    x = tp_forward.block_forward(layer, x, ctx, tp, cache)
                block += 1
            else:
                x = tp_forward.head_forward(layer, x, tp, self.config.is_critic, gather_logits)
        if sp and not self.has_head:
            x = tp_forward.gather_stage_output(x, tp)
        if kv_cache is not None:
            kv_cache.seqlens += ctx.seqlens.to(kv_cache.seqlens.device)
        return x

    def _checkpoint_blocks(self, kv_cache: Optional[KVCache]) -> bool:
        """Recompute block activations in backward: only when training without a cache."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None

    @torch.no_grad()
    def reduce_sequence_parallel_grads(self) -> None:
        """All-reduce, in place over the tp group, the gradients that are partial under SP.

        With sequence parallelism the replicated parameters listed by
        ``sequence_parallel_grad_keys`` saw only this rank's tokens; call this
        once after backward (after gradient accumulation) and before the
        optimizer step. No-op without SP or with tp_size == 1.
        """
        if not self.sequence_parallel or self.tp_size == 1:
            return
        group = self.tp_info().group
        seen = set()
        for key in sequence_parallel_grad_keys(self.config):
            if key not in self.param_spec:
                continue
            p = self.get_param(key)
            if p.grad is None or id(p) in seen:
                continue
            seen.add(id(p))
            dist.all_reduce(p.grad, group=group)

    def async_offload(self, **kwargs) -> bool:
        """Release the parameter memory until :meth:`reload` (see ``offload.offload``)."""
        return offload.offload(self, **kwargs)

    def reload(self, overlap: bool = False):
        """Restore offloaded parameters (no-op when loaded); see ``offload.reload``."""
        return offload.reload(self, overlap)

    def allocate_kv_cache(self, bs: int, capacity: int) -> KVCache:
        config = self.config
        if self.tp_size > 1:
            config = copy.copy(self.local_config)
            config.n_kv_heads = cache_kv_heads(self.config, self.tp_size)
        return KVCache.allocate(config, bs, capacity, self.dtype, self.device, n_blocks=self.n_blocks)

    # ---------------------------------------------------------------- helpers
    def num_params(self) -> int:
        return sum(s.numel for s in set(self.param_spec.values()))

    @classmethod
    def new_critic_head(cls, config: ReaLModelConfig, std: Optional[float] = None, seed: int = 1) -> torch.Tensor:
        """Random [1, hidden] value head for a critic made from an actor.

        Drawn from a generator keyed by (seed, head key), like :meth:`init_weights`,
        so every rank and every layout of the critic gets the same head whatever
        the global RNG state is.
        """
        std = std if std is not None else 1.0 / math.sqrt(config.hidden_dim + 1)
        key = head_key(config)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        return torch.randn(1, config.hidden_dim, generator=gen) * std
