"""Decoding steps of llama-family models with few, fused operations.

A decoding step feeds one token per row, so its matrix products are tiny
and, on a CPU, the general packed forward spends most of the step in the
overhead of its ~1000 small operations (module calls, packed-context
bookkeeping, grid scatter for the cache, per-projection rotary). This module
runs the same computation with about 25 operations per block:

* q/k/v and gate/up projections each use one matrix product over weights
  concatenated once per :class:`FastDecoder` (one ``generate`` call);
* rotary is applied to q and k together;
* each row's key/value is written straight into its cache slot and one SDPA
  call attends over the cached prefix with a per-row length mask.

That torch loop is the reference. On the CPU the whole block loop of a step
is one native call (``realhf._C.decode_step``); on AVX2 + FMA CPUs it
multiplies with the weights packed once per decoder into panels of 24 output
columns (``pack_panels``), which runs every row count of a decoding step
faster than sgemm over the model's own or transposed weights.

Only whole (single-stage, ``tp_size == 1``) models of the llama family are
served: RMS norms, rotary (either pairing), gated MLP, optional biases, no
qk-norm, no sliding window, no learned positions, no dropout in effect.
:func:`fast_decode_unsupported` says why a model is not served; ``generate``
then keeps the general forward. ``DECODE_IMPL`` selects the policy: "auto"
(fast path on the CPU, where per-operation overhead dominates; GPUs keep the
flash-attention cache kernels), "fast" (everywhere supported) or "eager".
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from realhf.base import cpu_threads
from realhf.impl.model.modules.norm import RMSNorm
from realhf.impl.model.nn.kv_cache import KVCache
from realhf.impl.model.modules.rotary import rotary_inv_freq
from realhf.impl.ops import dispatch, fused_layers, native

_EXT = "decode_step"

DECODE_IMPL = "auto"  # "auto" | "fast" | "eager"


def fast_decode_unsupported(model: torch.nn.Module) -> Optional[str]:
    """None when :class:`FastDecoder` can run ``model``, else the reason it cannot."""
    from realhf.impl.model.nn import offload
    from realhf.impl.model.nn.real_llm_api import ReaLModel

    if not isinstance(model, ReaLModel):
        return "not a ReaLModel"
    cfg = model.config
    checks = [
        (model.tp_size == 1, "tensor parallel"),
        (model.has_embedding and model.has_head, "pipeline stage, not a whole model"),
        (model.instantiated and not offload.is_offloaded(model), "weights not in place"),
        (not cfg.is_critic, "critic"),
        (cfg.layer_norm_type == "rms", f"layer_norm_type={cfg.layer_norm_type!r}"),
        (cfg.mlp_type == "llama", f"mlp_type={cfg.mlp_type!r}"),
        (cfg.apply_rotary, "no rotary embedding"),
        (not cfg.qk_layernorm, "qk_layernorm"),
        (cfg.sliding_window is None, "sliding window"),
        (not cfg.normalize_embed, "normalize_embed"),
        (not (model.training and (cfg.attn_pdrop > 0 or cfg.resid_pdrop > 0 or cfg.embd_pdrop > 0)),
         "dropout in training mode"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def use_fast_decode(model: torch.nn.Module, device: torch.device) -> bool:
    if DECODE_IMPL == "eager":
        return False
    if DECODE_IMPL == "auto" and device.type != "cpu":
        return False
    return fast_decode_unsupported(model) is None


def _rows_back_to_back(ws: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """One [sum(out), in] view of row-major matrices stored one after another, in
    this order, in one storage (a single matrix always is), or None."""
    first = ws[0]
    ptr, off = first.untyped_storage().data_ptr(), first.storage_offset()
    for w in ws:
        if (w.dim() != 2 or not w.is_contiguous() or w.shape[1] != first.shape[1] or w.dtype != first.dtype
                or w.untyped_storage().data_ptr() != ptr or w.storage_offset() != off):
            return None
        off += w.numel()
    return first.as_strided((sum(w.shape[0] for w in ws), first.shape[1]), (first.shape[1], 1))


def _cat_linear(mods: List[torch.nn.Linear]):
    """Weights of ``mods`` side by side as one [in, sum(out)] matrix (and bias).

    Weights stored back to back in this order (any single matrix: o, down,
    the head) give a transposed view, built for free; products with it run as
    fast as with a contiguous transposed copy. Others are copied (tiled, when
    native): ReaLModel's flat buffer holds v, k, q and up, gate in reverse
    order, and a view in that order made every decoding step ~5% slower.
    """
    ws = [m.weight.detach() for m in mods]
    view = _rows_back_to_back(ws)
    ext = native.load(_EXT)
    if view is not None:
        weight = view.t()
    elif ext is not None and all(w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
                                 for w in ws):
        weight = ext.transpose_cat(ws)  # tiled: 2-3x faster than the strided copy below
    else:
        weight = torch.cat(ws).t().contiguous()
    return weight, _cat_bias(mods)


def _cat_bias(mods: List[torch.nn.Linear]) -> Optional[torch.Tensor]:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])


def panel_kernel_supported() -> bool:
    """Whether the native panel products run on this CPU (AVX2 + FMA); without them
    the native block loop multiplies with at::mm over [in, out] weight copies."""
    global _PANELS_OK
    if _PANELS_OK is None:
        ext = native.load(_EXT)
        probe = None
        if ext is not None:
            probe = ext.packed_linear(torch.zeros(1, 8), ext.pack_panels([torch.zeros(8, 8)]), 8, torch.zeros(0))
        _PANELS_OK = probe is not None
    return _PANELS_OK


_PANELS_OK: Optional[bool] = None


def _pack(mods: List[torch.nn.Linear], threads: int = 1) -> torch.Tensor:
    """The weights of ``mods`` stacked, as the native loop's packed panels (see panel_matmul.h)."""
    return native.load(_EXT).pack_panels([m.weight.detach().contiguous() for m in mods], threads)


def _matmul(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


class _Block:
    """Weights of one transformer block in the fused layouts.

    Two layouts, each made on first need: :meth:`pack` for the native loop's
    panel products (AVX2 + FMA CPUs), :meth:`fuse` for ``x @ w`` products
    (q/k/v and gate/up copied side by side; o and down are free views).
    """

    def __init__(self, block: torch.nn.Module):
        attn, mlp = block.attn, block.mlp
        self.ln1, self.eps1 = attn.c_attn.ln.weight.detach(), attn.c_attn.ln.eps
        self._qkv = [attn.c_attn.q_attn, attn.c_attn.k_attn, attn.c_attn.v_attn]
        self._gu = [mlp.gate_proj, mlp.up_proj]
        self.qkv_w: Optional[torch.Tensor] = None
        self.gu_w: Optional[torch.Tensor] = None
        self.qkv_b, self.gu_b = _cat_bias(self._qkv), _cat_bias(self._gu)
        self.o_w, self.o_b = _cat_linear([attn.c_proj])
        self.scale = attn.scale
        self.ln2, self.eps2 = mlp.ln.weight.detach(), mlp.ln.eps
        self.d_w, self.d_b = _cat_linear([mlp.down_proj])
        self.act = mlp.act
        self._linears = [self._qkv, [attn.c_proj], self._gu, [mlp.down_proj]]
        self.panels: Optional[List[torch.Tensor]] = None  # qkv, o, gate/up, down (pack_panels)
        self.ln_f = (block.ln_f.weight.detach(), block.ln_f.eps) if block.is_last else None

    def fuse(self) -> "_Block":
        if self.qkv_w is None:
            self.qkv_w, _ = _cat_linear(self._qkv)
            self.gu_w, _ = _cat_linear(self._gu)
        return self

    def pack(self, threads: int = 1) -> List[torch.Tensor]:
        if self.panels is None:
            self.panels = [_pack(mods, threads) for mods in self._linears]
        return self.panels


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as RMSNorm: normalize in fp32, cast back, then scale.
    return fused_layers.rms_norm(x, w, eps)


class FastDecoder:
    """One decoding step at a time for the rows of ``cache`` (see module docstring).

    Built once per generation; the fused weights are views of the model's
    (or copies), so the model must not change while it is in use.

    ``threads``: threads of the native panel products (packing included), each
    computing a range of every weight's output columns, so results do not
    depend on it; None takes :func:`realhf.base.cpu_threads.current`, the
    running call's ``cpu_threads``.
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, threads: Optional[int] = None):
        reason = fast_decode_unsupported(model)
        if reason is not None:
            raise ValueError(f"FastDecoder cannot run this model: {reason}.")
        cfg = model.config
        assert all(isinstance(b.attn.c_attn.ln, RMSNorm) for b in model.layers[1:-1])
        self.cache = cache
        cpu_threads.check(threads, "FastDecoder threads")
        self.threads = cpu_threads.current() if threads is None else threads
        self.n_q, self.n_kv, self.head_dim = cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim
        self.interleaved = cfg.rotary_interleaved
        self.wte = model.layers[0].wte.weight.detach()
        self.head, _ = _cat_linear([model.layers[-1]])
        self.head_panels: Optional[torch.Tensor] = None
        self.blocks = [_Block(b) for b in model.layers[1:-1]]
        self.f = cfg.intermediate_dim
        inv = model._inv_freq if model._inv_freq is not None else rotary_inv_freq(
            cfg.head_dim, cfg.rotary_base, cfg.rotary_scaling, cfg.rotary_scaling_type, cfg.rotary_scaling_extra)
        self.inv_freq = inv.to(self.wte.device)
        # The block loop of a step: one native call when the extension serves this model.
        impl = dispatch.select("decode_blocks", self.wte.device)
        self._native = self._native_args() if impl.backend == "cpp" else None
        if self._native is not None and self._native[3]:
            self.head_panels = _pack([model.layers[-1]], self.threads)  # the head through the panel products too
        # Where prefill and run_steps keep their products' outputs (linear_replay), when set.
        self.capture = None
        self.capture_base = 0  # capture row of the first answer token fed (after the prompts')
        self.capture_slots: Optional[torch.Tensor] = None  # [bs, max_new]: capture row of each fed answer token
        self._capture_start: Optional[int] = None
        # The plain function, not a bound method: a bound method stored on self is a reference
        # cycle, which would keep the decoder (its weight copies and views of the model's
        # parameters) alive until the cyclic collector runs, long after generation.
        self._blocks_fn = impl.fn

    def use_cache(self, cache: KVCache) -> None:
        """Decode into ``cache`` from now on (same layers, dtype and device; any number of rows)."""
        if len(cache.k) != len(self.cache.k) or (cache.k and cache.k[0].shape[1:] != self.cache.k[0].shape[1:]):
            raise ValueError("FastDecoder.use_cache: the new cache's layers or row shape differ.")
        self.cache = cache

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary on x [n, heads, head_dim] with cos/sin [n, head_dim / 2] (fp32 math, as ``apply_rotary``)."""
        return fused_layers.rotary(x, cos, sin, self.interleaved)

    def _native_args(self) -> Optional[tuple]:
        """Weights, epsilons, scales and packed panels for the ``cpp`` block loop, or None
        when it cannot run this model (it serves float32 CPU weights and caches and the
        silu activation). The panels are packed once here (one copy of the block weights,
        made per ``generate`` call) where the CPU runs the panel products; elsewhere the
        loop multiplies with at::mm over :meth:`_Block.fuse` copies."""
        tensors = [self.wte] + [t for b in self.blocks for t in (b.ln1, b.ln2)]
        tensors += [m.weight for b in self.blocks for mods in b._linears for m in mods]  # every block weight
        tensors += [t for b in self.blocks for t in (b.qkv_b, b.o_b, b.gu_b, b.d_b) if t is not None]
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors + self.cache.k + self.cache.v):
            return None
        if any(b.act is not F.silu for b in self.blocks):
            return None
        panels = panel_kernel_supported()
        if not panels:
            for b in self.blocks:
                b.fuse()
        none = self.wte.new_empty(0)  # the q/k/v and gate/up copies the panel products never read
        weights = [t if t is not None else none for b in self.blocks
                   for t in (b.ln1, b.qkv_w, b.qkv_b, b.o_w, b.o_b, b.ln2, b.gu_w, b.gu_b, b.d_w, b.d_b)]
        eps = [float(e) for b in self.blocks for e in (b.eps1, b.eps2)]
        packed = [t for b in self.blocks for t in b.pack(self.threads)] if panels else []
        return weights, eps, [float(b.scale) for b in self.blocks], packed

    def blocks_python(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, whole: bool) -> torch.Tensor:
        """All blocks of the step in torch operations (the reference for the native loop)."""
        cache, n = self.cache, x.shape[0]
        for blk in self.blocks:
            blk.fuse()
        max_k = int(pos.max()) + 1
        mask = (torch.arange(max_k, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
        nq, nkv, d = self.n_q, self.n_kv, self.head_dim
        for i, blk in enumerate(self.blocks):
            h = _rms(x, blk.ln1, blk.eps1)
            qkv = _matmul(h, blk.qkv_w, blk.qkv_b).view(n, nq + 2 * nkv, d)
            qk = self._rotate(qkv[:, : nq + nkv], cos, sin)
            ck, cv = cache.k[i], cache.v[i]
            ck[rows, pos] = qk[:, nq:].to(ck.dtype)
            cv[rows, pos] = qkv[:, nq + nkv:].to(cv.dtype)
            keys = ck[:, :max_k] if whole else ck[rows, :max_k]
            vals = cv[:, :max_k] if whole else cv[rows, :max_k]
            o = F.scaled_dot_product_attention(
                qk[:, :nq, None, :], keys.transpose(1, 2).to(x.dtype), vals.transpose(1, 2).to(x.dtype),
                attn_mask=mask, scale=blk.scale, enable_gqa=nq != nkv)
            x = x + _matmul(o.reshape(n, nq * d), blk.o_w, blk.o_b)
            h = _rms(x, blk.ln2, blk.eps2)
            gu = _matmul(h, blk.gu_w, blk.gu_b)
            x = x + _matmul(blk.act(gu[:, : self.f]) * gu[:, self.f:], blk.d_w, blk.d_b)
        return x

    def blocks_cpp(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, whole: bool) -> torch.Tensor:
        """All blocks of the step in one call of realhf._C.decode_step (float32 CPU, silu)."""
        if self._native is None:
            return self.blocks_python(x, rows, pos, cos, sin, whole)
        weights, eps, scales, packed = self._native
        keep = {} if self._capture_start is None else {"capture": self.capture.flat(),
                                                         "capture_start": self._capture_start}
        return native.load(_EXT).decode_blocks(
            x.contiguous(), weights, eps, scales, packed, self.cache.k, self.cache.v, rows.contiguous(),
            pos.contiguous(), cos.contiguous(), sin.contiguous(), self.n_q, self.n_kv, self.head_dim, self.f,
            self.interleaved, self.threads, **keep)

    def run_steps(self, logits: torch.Tensor, state) -> Optional[int]:
        """Every remaining step of ``state`` (a fresh ``DecodeState`` whose first
        logits, of every row, are ``logits``) in one native call, when the native
        loop serves it: panel products and plain sampling (``state.native_sampler``).
        Fills the state's tensors and returns the number of steps, else None."""
        if self._native is None or self.head_panels is None or not state.native_sampler(logits.shape[-1]):
            return None
        weights, eps, scales, packed = self._native
        keep = {} if self.capture is None else {"capture": self.capture.flat(), "head_capture": self.capture.head,
                                                 "capture_base": self.capture_base,
                                                 "capture_slots": self.capture_slots}
        ln_f = self.blocks[-1].ln_f
        ln_w, ln_eps = (ln_f[0], float(ln_f[1])) if ln_f is not None else (self.wte.new_empty(0), 0.0)
        g = state.gconfig
        return native.load(_EXT).decode_loop(
            logits.float().contiguous(), weights, eps, scales, packed, self.cache.k, self.cache.v, self.cache.seqlens,
            self.wte, self.inv_freq, ln_w, ln_eps, self.head_panels, state.eos_tensor, g.min_new_tokens,
            float(g.temperature), state.generator, state.tokens, state.logprobs, state.gen_lengths,
            state.ended_by_eos, self.n_q, self.n_kv, self.head_dim, self.f, self.interleaved, self.threads, **keep)

    @property
    def native(self) -> bool:
        """Whether steps (and :meth:`prefill`) run the native block loop."""
        return self._native is not None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Feed packed prompts (row i gets ``input_ids[cu[i]:cu[i+1]]``, appended after
        its cached prefix); returns the next-token logits of every row [bs, vocab].

        Every prompt token is one query of the native loop (its row and position
        given), so the whole prompt is one call and the output head runs on the
        last token of each row only.
        """
        cache, dev = self.cache, self.wte.device
        cu = cu_seqlens.to(dev).long()
        lens = cu[1:] - cu[:-1]
        rows = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens)
        pos = cache.seqlens[rows] + torch.arange(rows.numel(), device=dev) - cu[:-1][rows]
        if self.capture is not None:  # prompt token i keeps its products in capture row i (native loops only)
            self._capture_start = 0
        try:
            x = self._hidden(input_ids.to(dev), rows, pos, False)
        finally:
            self._capture_start = None
        cache.seqlens += lens
        if self.capture is None:
            return self._logits(x[cu[1:] - 1])
        logits = self._logits(x)  # every prompt token's, for the replaying forward
        self.capture.head[: logits.shape[0]].copy_(logits)
        return logits[cu[1:] - 1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [n] to ``rows`` [n] (distinct cache rows, in order);
        returns their next-token logits [n, vocab] and advances the cache."""
        cache = self.cache
        whole = tokens.shape[0] == cache.bs  # every row, in order: views instead of gathers
        pos = cache.seqlens if whole else cache.seqlens[rows]
        x = self._hidden(tokens, rows, pos, whole)
        if whole:
            cache.seqlens += 1
        else:
            cache.seqlens[rows] += 1
        return self._logits(x)

    def _hidden(self, tokens: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, whole: bool) -> torch.Tensor:
        """Hidden states after every block for ``tokens`` at cache ``rows`` / positions ``pos``."""
        if bool((pos >= self.cache.capacity).any()):
            raise ValueError(f"KV cache capacity {self.cache.capacity} exceeded.")
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        return self._blocks_fn(self, F.embedding(tokens, self.wte), rows, pos, freqs.cos(), freqs.sin(), whole)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks[-1].ln_f is not None:
            x = _rms(x, *self.blocks[-1].ln_f)
        if self.head_panels is not None:
            return native.load(_EXT).packed_linear(x.contiguous(), self.head_panels, self.head.shape[1],
                                                   self.wte.new_empty(0), self.threads)
        return x @ self.head


dispatch.register("decode_blocks", "python", FastDecoder.blocks_python)
dispatch.register("decode_blocks", "cpp", FastDecoder.blocks_cpp, serves=dispatch.on_device_types("cpu"),
                  probe=native.cpu_probe(_EXT))
