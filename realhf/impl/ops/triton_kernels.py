"""Triton kernels for interval copies and packed GAE.

Imported lazily by the dispatcher (only when Triton is installed).  On a GPU
they compile normally; with ``TRITON_INTERPRET=1`` set before this module is
imported, ``triton.jit`` returns interpreted functions that run on CPU
tensors, which is how they are tested on machines without a GPU.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether the kernels below were created in interpreter mode; this decides
# at decoration time, so it is fixed for the life of the process.
INTERPRETED = _interpreting()

# Sequences per GAE program: one lane (GPU thread) per sequence.
GAE_SEQS = 32

_BITS_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _interval_copy_kernel(flat_ptr, packed_ptr, plan_ptr, n,
                          CHUNK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          GATHER: tl.constexpr):
    # One program per chunk of one interval; plan layout as in
    # csrc/interval_op/interval_op_kernels.h, counted in elements.
    c = tl.program_id(0).to(tl.int64)
    chunk_offsets = plan_ptr + 2 * n + 1
    # Binary search for the first interval whose chunks end after c; the
    # invariant chunk_offsets[hi + 1] > c holds throughout.
    lo = c * 0
    hi = lo + n - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        ends_after = tl.load(chunk_offsets + mid + 1) > c
        hi = tl.where(ends_after, mid, hi)
        lo = tl.where(ends_after, lo, mid + 1)
    start = tl.load(plan_ptr + lo)
    offset = tl.load(plan_ptr + n + lo)
    length = tl.load(plan_ptr + n + lo + 1) - offset
    pos = (c - tl.load(chunk_offsets + lo)) * CHUNK + tl.arange(0, CHUNK)
    mask = pos < length
    if GATHER:
        vals = tl.load(flat_ptr + start + pos, mask=mask)
        tl.store(packed_ptr + offset + pos, vals, mask=mask)
    else:
        vals = tl.load(packed_ptr + offset + pos, mask=mask)
        tl.store(flat_ptr + start + pos, vals, mask=mask)


def interval_copy(flat: torch.Tensor, packed: torch.Tensor, plan: np.ndarray,
                  n_intervals: int, n_chunks: int, chunk: int,
                  gather: bool) -> None:
    """Copy between the planned intervals of ``flat`` and ``packed``.

    ``plan`` comes from ``intervals.copy_plan`` in element units with
    ``chunk`` elements per chunk.  Data is viewed as same-width integers so
    every dtype (bf16, bool, ...) copies bit-exactly.
    """
    if n_chunks == 0:
        return
    bits = _BITS_VIEW.get(flat.element_size())
    if bits is None:
        raise TypeError(f"unsupported element size {flat.element_size()}")
    plan_t = torch.from_numpy(plan).to(flat.device)
    steps = max(0, int(n_intervals - 1).bit_length())
    _interval_copy_kernel[(n_chunks,)](
        flat.view(bits), packed.view(bits), plan_t, n_intervals,
        CHUNK=chunk, SEARCH_STEPS=steps, GATHER=gather)


@triton.jit
def _gae_kernel(rewards_ptr, values_ptr, cu_ptr, truncate_ptr, adv_ptr,
                ret_ptr, coef_ptr, bs, SEQS: tl.constexpr):
    # Lane i of program p handles sequence p * SEQS + i; lanes walk their own
    # sequence backwards, aligned at the sequence ends.  gamma and lam come
    # from a tensor in the data dtype: scalar float arguments would be fp32.
    gamma = tl.load(coef_ptr)
    lam = tl.load(coef_ptr + 1)
    seq = tl.program_id(0).to(tl.int64) * SEQS + tl.arange(0, SEQS)
    live = seq < bs
    v0 = tl.load(cu_ptr + seq, mask=live, other=0).to(tl.int64)
    v1 = tl.load(cu_ptr + seq + 1, mask=live, other=1).to(tl.int64)
    steps = v1 - v0 - 1
    r0 = v0 - seq
    truncated = tl.load(truncate_ptr + seq, mask=live, other=0) != 0
    next_value = tl.load(values_ptr + v0 + steps, mask=live & truncated, other=0.0)
    gae = tl.zeros_like(next_value)
    decay = gamma * lam
    max_steps = tl.max(steps, axis=0).to(tl.int32)
    for j in range(0, max_steps):
        t = steps - 1 - j
        active = t >= 0
        v = tl.load(values_ptr + v0 + t, mask=active, other=0.0)
        r = tl.load(rewards_ptr + r0 + t, mask=active, other=0.0)
        delta = r + gamma * next_value - v
        gae = tl.where(active, delta + decay * gae, gae)
        tl.store(adv_ptr + r0 + t, gae, mask=active)
        tl.store(ret_ptr + r0 + t, gae + v, mask=active)
        next_value = tl.where(active, v, next_value)


def gae_1d(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
           truncate: torch.Tensor, gamma: float,
           lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed GAE on validated, contiguous inputs of one float dtype."""
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    bs = truncate.numel()
    if bs == 0 or rewards.numel() == 0:
        return adv, ret
    coef = torch.tensor([gamma, lam], dtype=values.dtype).to(values.device)
    grid = (triton.cdiv(bs, GAE_SEQS),)
    _gae_kernel[grid](rewards, values, cu_seqlens, truncate.to(torch.int8),
                      adv, ret, coef, bs, SEQS=GAE_SEQS, num_warps=1)
    return adv, ret
