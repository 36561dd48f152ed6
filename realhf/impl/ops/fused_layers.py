"""RMS norm, rotary embedding and the gated-MLP product as single fused passes.

The element-wise parts of a llama block cost little arithmetic but, written
in torch, 5-15 passes over memory each (and as many autograd nodes); on a
CPU they take about as long as the block's matrix products' remainder. The
``cpp`` backend (``realhf._C.fused_layers``) does each in one pass forward
and one backward for float32 CPU tensors; the ``python`` backend is the
plain torch formula, the reference the tests compare against, and the one
every other dtype or device uses.

* :func:`rms_norm` -- ``w * x / sqrt(mean(x^2) + eps)`` over the last dim;
* :func:`rotary` -- x ``[N, H, D]`` rotated by per-token angles (cos/sin
  ``[N, D/2]``), non-interleaved (j with j + D/2) or interleaved (2j, 2j+1);
* :func:`swiglu` -- ``silu(gate) * up``;
* :func:`varlen_attention` -- causal attention over packed sequences
  (q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, GQA), one call for all sequences
  (``csrc/fused_layers/varlen_attention.h``); the torch formula is one SDPA
  call per sequence;
* :func:`tree_attention` -- the same kernel over the query segments of a
  prefix-tree batch (``realhf.impl.model.nn.prefix_tree``), where a branch
  also attends to its group's shared prefix; native only (the attention
  layer keeps its batched-product path as the fallback);
* :func:`token_logprobs` -- ``log_softmax(logits[rows])[labels]`` over
  logits ``[R, V]``, one pass over each read row forward and backward.

All are differentiable in their tensor inputs, the norm also in its weight.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from realhf.impl.ops import dispatch, native

_EXT = "fused_layers"


def _fp32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


# ------------------------------------------------------------ torch formulas
def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps)`` in fp32 (no scale; the torch formula)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_python(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * rms_normalize(x, eps).to(x.dtype)


def _rotary_python(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)


def _swiglu_python(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _varlen_attention_python(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             scale: float) -> torch.Tensor:
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    outs = []
    for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens)):
        if qi.shape[0] == 0:
            outs.append(qi)
            continue
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (qi, ki, vi))
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, **gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


# ------------------------------------------------------------ native kernels
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = native.load(_EXT).rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = native.load(_EXT).rms_norm_bwd(grad.contiguous(), x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return native.load(_EXT).rotary(x, cos, sin, interleaved, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # The inverse of a rotation is the rotation by the opposite angle.
        return native.load(_EXT).rotary(grad.contiguous(), cos, sin, ctx.interleaved, -1.0), None, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        y, sig = native.load(_EXT).swiglu_fwd(gate, up, True)
        ctx.save_for_backward(gate, sig, up)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, sig, up = ctx.saved_tensors
        dgate, dup = native.load(_EXT).swiglu_bwd(grad.contiguous(), gate, sig, up)
        return dgate, dup


class _NativeAttention(torch.autograd.Function):
    """The attention kernels of ``realhf._C.fused_layers``: ``kernel`` names the pair
    ``<kernel>_fwd`` / ``<kernel>_bwd``, ``layout`` its packing tensors (``cu_seqlens`` for
    ``varlen_attention``, ``segments, groups`` for ``tree_attention``)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel: str,
                *layout: torch.Tensor) -> torch.Tensor:
        out, lse = getattr(native.load(_EXT), f"{kernel}_fwd")(q, k, v, *layout, scale)
        ctx.save_for_backward(q, k, v, out, lse, *layout)
        ctx.scale, ctx.kernel = scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse, *layout = ctx.saved_tensors
        dq, dk, dv = getattr(native.load(_EXT), f"{ctx.kernel}_bwd")(grad.contiguous(), q, k, v, out, lse, *layout,
                                                                     ctx.scale)
        return (dq, dk, dv, None, None) + (None,) * len(layout)


def _attention_served(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """float32 CPU q [T, Hq, D], k/v [T, Hkv, D] with D a multiple of 8 and Hkv dividing Hq."""
    return (_fp32_cpu(q, k, v) and q.dim() == 3 and q.shape[-1] % 8 == 0 and k.shape == v.shape
            and q.shape[1] % k.shape[1] == 0)


def _native_attention(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      *layout: torch.Tensor) -> torch.Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _needs_graph(q, k, v):
        return _NativeAttention.apply(q, k, v, float(scale), kernel, *layout)
    return getattr(native.load(_EXT), f"{kernel}_fwd")(q, k, v, *layout, float(scale))[0]


class _TokenLogProbsTorch(torch.autograd.Function):
    """``logits[rows, labels] - logsumexp(logits[rows])`` in few torch passes over the logits.

    The plain composition (select rows, logsumexp, gather) copies the selected
    rows forward and, backward, allocates a zero [R, V] tensor for each of
    the row selection and the gather. Here the forward reads the logits in
    place; the backward writes the gradient once:
    ``-g * softmax(logits)`` on the read rows plus ``g`` at the labels.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=-1)
        ctx.save_for_backward(lf, lse, rows, labels)
        ctx.in_dtype = logits.dtype
        return lf[rows, labels] - lse[rows]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        lf, lse, rows, labels = ctx.saved_tensors
        g = g.float()
        row_scale = torch.zeros_like(lse)
        row_scale.index_add_(0, rows, -g)  # a row read twice gets both entries' share
        grad = torch.exp(lf - lse.unsqueeze(1))
        grad.mul_(row_scale.unsqueeze(1))
        grad.index_put_((rows, labels), g, accumulate=True)
        return grad.to(ctx.in_dtype), None, None


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp, lse = native.load(_EXT).token_logprobs_fwd(logits, rows, labels)
        ctx.save_for_backward(logits, rows, labels, lse)
        return logp

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, rows, labels, lse = ctx.saved_tensors
        return native.load(_EXT).token_logprobs_bwd(g.float().contiguous(), logits, rows, labels, lse), None, None


def _needs_graph(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _rms_norm_cpp(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _fp32_cpu(x, weight) or x.shape[-1] != weight.shape[0]:
        return _rms_norm_python(x, weight, eps)
    shape = x.shape
    x2, w = x.reshape(-1, shape[-1]).contiguous(), weight.contiguous()
    if _needs_graph(x, weight):
        return _RMSNorm.apply(x2, w, float(eps)).view(shape)
    return native.load(_EXT).rms_norm_fwd(x2, w, float(eps))[0].view(shape)


def _rotary_cpp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not _fp32_cpu(x, cos, sin) or x.dim() != 3:
        return _rotary_python(x, cos, sin, interleaved)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    if _needs_graph(x):
        return _Rotary.apply(x, cos, sin, bool(interleaved))
    return native.load(_EXT).rotary(x, cos, sin, bool(interleaved), 1.0)


def _swiglu_cpp(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if not _fp32_cpu(gate, up) or gate.shape != up.shape:
        return _swiglu_python(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    if _needs_graph(gate, up):
        return _SwiGLU.apply(gate, up)
    return native.load(_EXT).swiglu_fwd(gate, up, False)[0]


def _varlen_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          scale: float) -> torch.Tensor:
    if not _attention_served(q, k, v):
        return _varlen_attention_python(q, k, v, cu_seqlens, scale)
    return _native_attention("varlen_attention", q, k, v, scale,
                             cu_seqlens.to(device="cpu", dtype=torch.int64).contiguous())


def _token_logprobs_python(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _TokenLogProbsTorch.apply(logits, rows, labels)


def _token_logprobs_cpp(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not _fp32_cpu(logits) or logits.dim() != 2 or rows.device.type != "cpu" or labels.device.type != "cpu":
        return _token_logprobs_python(logits, rows, labels)
    logits, rows, labels = logits.contiguous(), rows.long().contiguous(), labels.long().contiguous()
    if _needs_graph(logits):
        return _TokenLogProbs.apply(logits, rows, labels)
    return native.load(_EXT).token_logprobs_fwd(logits, rows, labels)[0]


def _attention_probe() -> Optional[str]:
    missing = native.import_error(_EXT)
    if missing is not None:
        return missing
    if not native.load(_EXT).varlen_attention_supported():
        return "the packed attention kernels need a CPU with AVX2 and FMA"
    return None


_cpu = dispatch.on_device_types("cpu")
for _op, _py, _cpp in (("rms_norm", _rms_norm_python, _rms_norm_cpp), ("rotary", _rotary_python, _rotary_cpp),
                       ("swiglu", _swiglu_python, _swiglu_cpp)):
    dispatch.register(_op, "python", _py)
    dispatch.register(_op, "cpp", _cpp, serves=_cpu, probe=native.cpu_probe(_EXT))
dispatch.register("token_logprobs", "python", _token_logprobs_python)
dispatch.register("token_logprobs", "cpp", _token_logprobs_cpp, serves=_cpu, probe=native.cpu_probe(_EXT))
dispatch.register("varlen_attention", "python", _varlen_attention_python)
dispatch.register("varlen_attention", "cpp", _varlen_attention_cpp, serves=_cpu, probe=_attention_probe)

# These run ~100 times a forward pass: the automatic choice is made once per
# (operator, device type, REAL_OP_BACKEND value) instead of on every call.
_chosen: Dict[Tuple[str, str, Optional[str]], Callable] = {}


def _impl(op: str, device: torch.device, backend: Optional[str]) -> Callable:
    if backend is not None:
        return dispatch.select(op, device, backend).fn
    key = (op, device.type, os.environ.get(dispatch.ENV_VAR))
    fn = _chosen.get(key)
    if fn is None:
        fn = _chosen[key] = dispatch.select(op, device).fn
    return fn


# ---------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: Optional[str] = None) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)``, normalized in fp32 and cast back before the scale."""
    return _impl("rms_norm", x.device, backend)(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
           backend: Optional[str] = None) -> torch.Tensor:
    """Rotate x ``[N, H, D]`` by the per-token angles whose cos/sin are ``[N, D/2]`` (fp32 math)."""
    return _impl("rotary", x.device, backend)(x, cos, sin, interleaved)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up``."""
    return _impl("swiglu", gate.device, backend)(gate, up)


def token_logprobs(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``log_softmax(logits[rows[i]])[labels[i]]`` (float32) for logits ``[R, V]``; differentiable in
    the logits, whose rows no entry reads get a zero gradient."""
    return _impl("token_logprobs", logits.device, backend)(logits, rows, labels)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Causal attention within each packed sequence (boundaries ``cu_seqlens``): q ``[T, Hq, D]``,
    k/v ``[T, Hkv, D]`` (KV head j serves query heads j * Hq/Hkv ...) -> ``[T, Hq, D]``."""
    return _impl("varlen_attention", q.device, backend)(q, k, v, cu_seqlens, scale)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor,
                   groups: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over prefix-tree query segments (native kernel; float32 CPU tensors, head_dim a
    multiple of 8, see :func:`tree_attention_applies`). ``segments`` [S, 4] int64: (first query
    row, queries, first row of its prefix keys, prefix keys), tiling the rows in order; a
    segment's queries see its prefix keys and, causally, its own rows. ``groups`` [G + 1]:
    boundaries of the runs of segments that share prefix keys."""
    return _native_attention("tree_attention", q, k, v, scale, segments, groups)


def tree_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`tree_attention` serves these inputs here (else the caller's own formula)."""
    return native_attention(q.device) and _attention_served(q, k, v)


def native_attention(device: torch.device) -> bool:
    """Whether :func:`varlen_attention` runs the native kernel on ``device`` (else per-sequence SDPA)."""
    return _impl("varlen_attention", device, None) is _varlen_attention_cpp
