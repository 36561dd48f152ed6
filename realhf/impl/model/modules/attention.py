"""Causal self-attention over packed variable-length sequences.

Tokens of all sequences are concatenated ([total_tokens, heads, head_dim]) and
``cu_seqlens`` marks the boundaries; attention never crosses them.

Kernels:
* CUDA with flash-attn installed: ``flash_attn_varlen_func`` (no cache) and
  ``flash_attn_with_kvcache`` (cache).
* float32 on a CPU with AVX2/FMA, no cache (or a prefill's empty one), no
  sliding window narrower than a sequence: one native call over all sequences (``fused_layers.varlen_attention``, "native"), forward
  and backward. At the PPO shape (8 sequences of 42-60 tokens, 4 query / 2 KV
  heads, head_dim 64, one core) 0.85 ms forward + backward against 2.4 ms for
  the per-sequence SDPA loop, 0.27 against 0.8 ms forward only; at the SFT
  shape (16 of 32-256 tokens) 15 against 27 ms.
* Otherwise torch SDPA. Without a cache there are three kernels (``ATTN_IMPL``):
  one SDPA call per sequence with ``is_causal`` ("loop"); one call with a
  block-diagonal causal [T, T] mask ("block_diag"), whose cost is quadratic in
  the *total* token count; or one call over the sequences scattered into a
  padded [bs, max_len] grid with a causal and length mask ("padded"), whose
  cost is bs * max_len^2. "loop" hands SDPA 4-D [1, heads, len, dim] inputs,
  which selects its fused CPU kernel. Forward + backward on one CPU core
  (4 query / 2 KV heads, head_dim 64): 64 sequences of 3-10 tokens: loop 18 ms,
  padded 10 ms; 32 of 10-29: 16 vs 18 ms; 8 of 35-60: 9.5 vs 10.7 ms. "auto"
  (default) therefore uses "padded" only for sequences of at most
  ``PADDED_MAX_LEN`` tokens whose padding at most doubles the work, and
  "loop" otherwise ("auto" takes "native" first where it applies). With a cache,
  the new queries are scattered into a [bs, max_new, ...] grid and one SDPA
  call runs against the cache rows with a per-row length mask, which is what
  decoding (one token per row) needs.
* Prefix-tree batches (``ctx.tree``, see ``realhf.impl.model.nn.prefix_tree``):
  one SDPA call over padded query segments (a prefix, or a branch whose keys
  are its prefix and itself) with their visibility mask, on every device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.modules.norm import RMSNorm, make_norm
from realhf.impl.model.modules.rotary import apply_rotary
from realhf.impl.ops import fused_layers

try:  # optional GPU kernels
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # type: ignore

    HAS_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_FLASH_ATTN = False

# "native": one call of the packed kernel (fused_layers.varlen_attention);
# "loop": one SDPA call per sequence; "block_diag": one call with a [T, T] mask;
# "padded": one call over a padded [bs, max_len] grid; "auto": padded for many
# short sequences (at most PADDED_MAX_LEN tokens, padding at most doubling the
# work), loop otherwise; native before both where its kernel runs.
ATTN_IMPL = "auto"
PADDED_MAX_LEN = 16


@dataclasses.dataclass
class PackedContext:
    """Per-forward metadata shared by all blocks of a model."""

    cu_seqlens: torch.Tensor  # int64 [bs + 1]
    max_seqlen: int
    seqlens: torch.Tensor  # int64 [bs], new tokens per sequence
    positions: torch.Tensor  # int64 [T]
    seq_ids: torch.Tensor  # int64 [T], sequence of each token
    cos: Optional[torch.Tensor] = None  # [T, head_dim // 2]
    sin: Optional[torch.Tensor] = None
    past: Optional[torch.Tensor] = None  # int64 [bs], cached tokens per row (cache only)
    # Grid indices and mask of a cached forward per attention window, built by the
    # first block and reused by the others.
    cache_grids: Dict[Optional[int], Tuple[torch.Tensor, torch.Tensor, int, int]] = dataclasses.field(
        default_factory=dict)
    # Prefix-tree layout: the batch's ``prefix_tree.TreeAttention`` (query segments and visibility).
    tree: Optional[Any] = None
    # Whether a cached forward starts every row from an empty cache (a prefill), set by the first block.
    prefill: Optional[bool] = None


def _repeat_kv(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    # KV head j serves query heads j * n_rep ... (j + 1) * n_rep - 1.
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA over [..., heads, len, dim] with fewer KV heads than query heads served
    in place (``enable_gqa``: KV head j serves query heads j * n_rep ...), so
    a decoding step does not copy the whole KV cache per query head."""
    if q.shape[-3] == k.shape[-3]:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Causal (and sliding-window) visibility of keys k_pos from queries q_pos."""
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


def _attn_loop(q, k, v, ctx: PackedContext, scale: float, window: Optional[int], dropout_p: float = 0.0):
    """One SDPA call per sequence. Inputs are split (not sliced into a preallocated
    output) and given to SDPA as [1, heads, len, dim], which selects its fused CPU
    kernel; the backward then has no full-size zero-fill per sequence."""
    lens = (ctx.cu_seqlens[1:] - ctx.cu_seqlens[:-1]).tolist()
    outs = []
    for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens)):
        n = qi.shape[0]
        if n == 0:
            outs.append(qi)
            continue
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (qi, ki, vi))
        if window is None or n <= window:
            o = _sdpa(qi, ki, vi, is_causal=True, scale=scale, dropout_p=dropout_p)
        else:
            pos = torch.arange(n, device=q.device)
            mask = _window_mask(pos[:, None], pos[None, :], window)
            o = _sdpa(qi, ki, vi, attn_mask=mask, scale=scale, dropout_p=dropout_p)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


# Largest score tensor (elements) that the CPU tree kernel materializes; above it, SDPA.
MATH_MAX_SCORES = 1 << 24


def _attn_tree(q, k, v, ctx: PackedContext, scale: float, window: Optional[int], dropout_p: float = 0.0):
    """Prefix-tree batch: attention over its padded query segments (see ``prefix_tree.TreeAttention``).

    On the CPU the segments are small and many, where SDPA's fused kernel runs
    at a fraction of the matmul rate: there the scores are two batched products
    with the query heads of a KV head stacked (GQA served without copying
    keys), 1.7x faster forward + backward at GRPO's shapes. Elsewhere, SDPA.
    Without a window or dropout, float32 on a CPU with AVX2 runs the native
    kernel over the unpadded segments instead (``fused_layers.tree_attention``).
    """
    seg = ctx.tree
    if (window is None and dropout_p == 0 and seg.segments is not None
            and fused_layers.tree_attention_applies(q, k, v)):
        return fused_layers.tree_attention(q, k, v, seg.segments, seg.groups, scale)
    n_seg, max_q = seg.q_index.shape
    max_k = seg.k_index.shape[1]
    n_q, n_kv, d = q.shape[1], k.shape[1], q.shape[2]
    rep = n_q // n_kv
    qg = q.index_select(0, seg.q_index.view(-1))
    kg = k.index_select(0, seg.k_index.view(-1))
    vg = v.index_select(0, seg.k_index.view(-1))
    if q.device.type == "cpu" and n_seg * n_q * max_q * max_k <= MATH_MAX_SCORES:
        # [S * kv heads, rep * max_q, d]: query heads j * rep .. (j + 1) * rep - 1 share KV head j.
        qf = qg.view(n_seg, max_q, n_kv, rep, d).permute(0, 2, 3, 1, 4).reshape(n_seg * n_kv, rep * max_q, d)
        kf = kg.view(n_seg, max_k, n_kv, d).transpose(1, 2).reshape(n_seg * n_kv, max_k, d)
        vf = vg.view(n_seg, max_k, n_kv, d).transpose(1, 2).reshape(n_seg * n_kv, max_k, d)
        bias = seg.score_bias(window, n_kv, rep, q.dtype)
        probs = torch.baddbmm(bias, qf, kf.transpose(1, 2), alpha=scale).softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        o = torch.bmm(probs, vf).view(n_seg, n_kv, rep, max_q, d).permute(0, 3, 1, 2, 4)
    else:
        qg = qg.view(n_seg, max_q, n_q, d).transpose(1, 2)
        kg = kg.view(n_seg, max_k, n_kv, d).transpose(1, 2)
        vg = vg.view(n_seg, max_k, n_kv, d).transpose(1, 2)
        o = _sdpa(qg, kg, vg, attn_mask=seg.mask(window)[:, None], scale=scale, dropout_p=dropout_p).transpose(1, 2)
    return o.reshape(n_seg * max_q, n_q, d).index_select(0, seg.out_index)


def _attn_block_diag(q, k, v, ctx: PackedContext, scale: float, window: Optional[int]) -> torch.Tensor:
    mask = ctx.seq_ids[:, None] == ctx.seq_ids[None, :]
    mask = mask & _window_mask(ctx.positions[:, None], ctx.positions[None, :], window)
    o = _sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


def _cache_grid(q: torch.Tensor, ctx: PackedContext, window: Optional[int]):
    """Where each new query sits in the [bs, max_new] grid, and which cached keys it sees."""
    bs = ctx.seqlens.shape[0]
    total = ctx.past + ctx.seqlens
    max_q = int(ctx.seqlens.max()) if bs > 0 else 0
    max_k = int(total.max()) if bs > 0 else 0
    # Query j of row i sits at grid cell (i, j); its position is past_i + j.
    col = torch.arange(q.shape[0], device=q.device) - ctx.cu_seqlens[ctx.seq_ids]
    j = torch.arange(max_q, device=q.device)
    q_pos = ctx.past[:, None] + j[None, :]  # [bs, max_q]
    k_pos = torch.arange(max_k, device=q.device)
    mask = _window_mask(q_pos[:, :, None], k_pos[None, None, :], window)
    # Padding queries see everything so that no softmax row is empty; they are dropped.
    mask = mask | (j[None, :] >= ctx.seqlens[:, None])[:, :, None]
    return col, mask, max_q, max_k


def _attn_with_cache(q, k, v, cache_k, cache_v, ctx: PackedContext, scale: float, window: Optional[int]):
    """Append k/v to the cache rows, then attend to each row's cached prefix + new tokens."""
    cache_k[ctx.seq_ids, ctx.positions] = k.to(cache_k.dtype)
    cache_v[ctx.seq_ids, ctx.positions] = v.to(cache_v.dtype)
    if _native_applies(q, ctx, window) and _is_prefill(ctx):
        # Nothing cached before: the new tokens attend among themselves, as without a cache.
        return fused_layers.varlen_attention(q, k, v, ctx.cu_seqlens, scale)
    if window not in ctx.cache_grids:
        ctx.cache_grids[window] = _cache_grid(q, ctx, window)
    col, mask, max_q, max_k = ctx.cache_grids[window]
    if q.shape[0] == 0 or max_k == 0:
        return torch.empty_like(q)
    grid_q = q.new_zeros(ctx.seqlens.shape[0], max_q, q.shape[1], q.shape[2])
    grid_q[ctx.seq_ids, col] = q
    keys = cache_k[:, :max_k].transpose(1, 2).to(q.dtype)
    vals = cache_v[:, :max_k].transpose(1, 2).to(q.dtype)
    o = _sdpa(grid_q.transpose(1, 2), keys, vals, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)[ctx.seq_ids, col]


def _attn_padded(q, k, v, ctx: PackedContext, scale: float, window: Optional[int]) -> torch.Tensor:
    bs, width = ctx.seqlens.shape[0], ctx.max_seqlen
    cells = ctx.seq_ids * width + ctx.positions  # token -> cell of the [bs, width] grid

    def grid(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [bs, H, width, D]
        z = x.new_zeros(bs * width, *x.shape[1:]).index_copy(0, cells, x)
        return z.view(bs, width, *x.shape[1:]).transpose(1, 2)

    j = torch.arange(width, device=q.device)
    lens = ctx.seqlens[:, None, None]
    mask = _window_mask(j[:, None], j[None, :], window)[None] & (j[None, None, :] < lens)
    # Padding queries see everything so that no softmax row is empty; they are dropped.
    mask = mask | (j[None, :, None] >= lens)
    o = _sdpa(grid(q), grid(k), grid(v), attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2).reshape(bs * width, *q.shape[1:]).index_select(0, cells)


def _attn_native(q, k, v, ctx: PackedContext, scale: float, window: Optional[int]) -> torch.Tensor:
    if window is not None and ctx.max_seqlen > window:
        return _attn_loop(q, k, v, ctx, scale, window)
    return fused_layers.varlen_attention(q, k, v, ctx.cu_seqlens, scale)


def _is_prefill(ctx: PackedContext) -> bool:
    if ctx.prefill is None:
        ctx.prefill = not bool(ctx.past.any())
    return ctx.prefill


def _native_applies(q: torch.Tensor, ctx: PackedContext, window: Optional[int]) -> bool:
    """float32, head_dim a multiple of 8, no window narrower than a sequence, and the kernel runs here."""
    return (q.dtype == torch.float32 and q.shape[-1] % 8 == 0 and (window is None or ctx.max_seqlen <= window)
            and fused_layers.native_attention(q.device))


def _attn_auto(q, k, v, ctx: PackedContext, scale: float, window: Optional[int]) -> torch.Tensor:
    if _native_applies(q, ctx, window):
        return fused_layers.varlen_attention(q, k, v, ctx.cu_seqlens, scale)
    lens = ctx.seqlens
    if (lens.shape[0] > 1 and ctx.max_seqlen <= PADDED_MAX_LEN
            and lens.shape[0] * ctx.max_seqlen ** 2 <= 2 * int((lens * lens).sum())):
        return _attn_padded(q, k, v, ctx, scale, window)
    return _attn_loop(q, k, v, ctx, scale, window)


ATTN_KERNELS = {"native": _attn_native, "loop": _attn_loop, "block_diag": _attn_block_diag,
                "padded": _attn_padded, "auto": _attn_auto}


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: PackedContext,
    scale: float,
    window: Optional[int] = None,
    kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; ``dropout_p`` applies to the
    attention probabilities (training without a cache only)."""
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if ctx.tree is not None:
        return _attn_tree(q, k, v, ctx, scale, window, dropout_p)
    if HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attention(q, k, v, ctx, scale, window, kv_cache, dropout_p)
    if kv_cache is not None:
        return _attn_with_cache(q, k, v, kv_cache[0], kv_cache[1], ctx, scale, window)
    if dropout_p > 0:
        return _attn_loop(q, k, v, ctx, scale, window, dropout_p)
    return ATTN_KERNELS[ATTN_IMPL](q, k, v, ctx, scale, window)


def _flash_attention(q, k, v, ctx, scale, window, kv_cache, dropout_p):  # pragma: no cover - GPU only
    win = (-1, -1) if window is None else (window - 1, 0)
    if kv_cache is None:
        cu = ctx.cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, ctx.max_seqlen, ctx.max_seqlen, dropout_p=dropout_p, softmax_scale=scale,
            causal=True, window_size=win,
        )
    if bool((ctx.seqlens == 1).all()):
        out = flash_attn_with_kvcache(
            q[:, None], kv_cache[0], kv_cache[1], k[:, None], v[:, None],
            cache_seqlens=ctx.past.to(torch.int32), softmax_scale=scale, causal=True, window_size=win,
        )
        return out[:, 0]
    return _attn_with_cache(q, k, v, kv_cache[0], kv_cache[1], ctx, scale, window)


class CAttn(nn.Module):
    """Pre-attention norm plus separate q/k/v projections (kept separate so that
    tensor-parallel slicing of each is a contiguous row interval)."""

    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        h, d, b = config.hidden_dim, config.head_dim, config.use_attention_bias
        self.ln = make_norm(config.layer_norm_type, h, config.layer_norm_epsilon)
        self.q_attn = nn.Linear(h, config.n_q_heads * d, bias=b)
        self.k_attn = nn.Linear(h, config.n_kv_heads * d, bias=b)
        self.v_attn = nn.Linear(h, config.n_kv_heads * d, bias=b)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.ln(x)
        return self.q_attn(x), self.k_attn(x), self.v_attn(x)


class Attention(nn.Module):
    def __init__(self, config: ReaLModelConfig, layer_index: int):
        """``layer_index`` is the 0-based block index (for inverse-layer scaling)."""
        super().__init__()
        self.config = config
        self.c_attn = CAttn(config)
        self.c_proj = nn.Linear(config.n_q_heads * config.head_dim, config.hidden_dim, bias=config.use_attn_proj_bias)
        if config.qk_layernorm:
            self.q_ln = RMSNorm(config.head_dim, config.layer_norm_epsilon)
            self.k_ln = RMSNorm(config.head_dim, config.layer_norm_epsilon)
        self.scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_index + 1)
        self.attn_drop = config.attn_pdrop
        layers = config.sliding_window_layers
        # Some families (Qwen) apply the window to a subset of the blocks only.
        self.window = config.sliding_window if layers is None or layer_index in layers else None

    def forward(self, x: torch.Tensor, ctx: PackedContext, kv_cache=None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output of every row, or of ``rows`` only (all rows still attend)."""
        cfg = self.config
        q, k, v = self.c_attn(x)
        q = q.view(-1, cfg.n_q_heads, cfg.head_dim)
        k = k.view(-1, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_layernorm:
            q, k = self.q_ln(q), self.k_ln(k)
        if cfg.apply_rotary:
            q = apply_rotary(q, ctx.cos, ctx.sin, cfg.rotary_interleaved)
            k = apply_rotary(k, ctx.cos, ctx.sin, cfg.rotary_interleaved)
        drop = self.attn_drop if self.training else 0.0
        o = packed_attention(q, k, v, ctx, self.scale, self.window, kv_cache, dropout_p=drop)
        o = o.reshape(o.shape[0], -1)
        if rows is not None:
            o = o.index_select(0, rows)
        return self.c_proj(o)
