"""Generalized advantage estimation (GAE) over packed PPO batches.

Layout (no padding): ``values`` has ``sum(L_i)`` entries, sequence ``i``
occupying ``cu_seqlens[i]:cu_seqlens[i+1]``, and its last value is the
bootstrap value ``V(s_T)``.  ``rewards`` has ``sum(L_i - 1)`` entries,
sequence ``i``'s ``T_i = L_i - 1`` rewards starting at ``cu_seqlens[i] - i``.
``truncate[i]`` is True when the sequence was cut off (bootstrap from its last
value) and False when it terminated (the value after the last step is 0).

For ``t = T-1 .. 0``::

    next_v = values[t+1] if t+1 < T else (values[T] if truncate else 0)
    delta  = r_t + gamma * next_v - v_t
    gae    = delta + gamma * lam * gae          (gae starts at 0)
    adv_t  = gae;  ret_t = adv_t + v_t
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from realhf.impl.ops import dispatch, native

# Half-precision inputs are computed in fp32 and cast back: the recursion
# accumulates over hundreds of steps.
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _check_shapes(rewards: torch.Tensor, values: torch.Tensor,
                  cu_seqlens: torch.Tensor, truncate: torch.Tensor) -> None:
    """Checks that need no data access (shared by all backends)."""
    for name, t in (("rewards", rewards), ("values", values),
                    ("cu_seqlens", cu_seqlens), ("truncate", truncate)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not (rewards.is_floating_point() and values.is_floating_point()):
        raise TypeError(f"rewards and values must be floating point, got "
                        f"{rewards.dtype} and {values.dtype}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or \
            cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be integers, got {cu_seqlens.dtype}")
    if truncate.dtype != torch.bool:
        raise TypeError(f"truncate must be bool, got {truncate.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have at least one entry")
    bs = cu_seqlens.numel() - 1
    if truncate.numel() != bs:
        raise ValueError(f"truncate must have shape [{bs}], got {list(truncate.shape)}")
    devices = {t.device for t in (rewards, values, cu_seqlens, truncate)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def check_layout(cu: np.ndarray, n_values: int, n_rewards: int) -> None:
    """Checks of the offsets themselves (same wording as the C++ extension)."""
    bs = len(cu) - 1
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu[0])}")
    lengths = np.diff(cu)
    short = np.flatnonzero(lengths < 1)
    if len(short):
        i = int(short[0])
        raise ValueError(
            f"sequence {i} has length {int(lengths[i])} (cu_seqlens[{i}]={int(cu[i])}, "
            f"cu_seqlens[{i + 1}]={int(cu[i + 1])}); each sequence needs at least "
            "its bootstrap value")
    if int(cu[-1]) != n_values:
        raise ValueError(f"values has {n_values} elements but cu_seqlens[-1] is "
                         f"{int(cu[-1])}")
    if n_rewards != n_values - bs:
        raise ValueError(f"rewards has {n_rewards} elements but the sequences need "
                         f"sum(L_i - 1) = {n_values - bs}")


def _validate(rewards: torch.Tensor, values: torch.Tensor,
              cu_seqlens: torch.Tensor) -> np.ndarray:
    cu = cu_seqlens.detach().to("cpu", torch.int64).numpy()
    check_layout(cu, values.numel(), rewards.numel())
    return cu


def _gae_python(rewards: torch.Tensor, values: torch.Tensor,
                cu_seqlens: torch.Tensor, truncate: torch.Tensor, gamma: float,
                lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad to [maxT, bs] (time-major) and step backwards, vectorized over sequences."""
    cu = _validate(rewards, values, cu_seqlens)
    device, dtype = rewards.device, rewards.dtype
    bs = len(cu) - 1
    steps_np = np.diff(cu) - 1
    max_steps = int(steps_np.max()) if bs else 0
    if max_steps == 0:
        return torch.empty_like(rewards), torch.empty_like(rewards)
    steps = torch.from_numpy(steps_np).to(device)
    seq_ids = torch.repeat_interleave(torch.arange(bs, device=device), steps,
                                      output_size=rewards.numel())
    starts = torch.from_numpy(cu[:-1] - np.arange(bs)).to(device)
    t_ids = torch.arange(rewards.numel(), device=device) - starts[seq_ids]
    value_pos = starts[seq_ids] + seq_ids + t_ids        # index of v_t in values
    v_t = values[value_pos].to(dtype)
    # next value: v_{t+1} inside the sequence; at the last step the bootstrap
    # value if truncated, else 0.
    next_v = values[value_pos + 1].to(dtype)
    last = t_ids == steps[seq_ids] - 1
    next_v = torch.where(last & ~truncate[seq_ids], torch.zeros_like(next_v), next_v)
    delta = rewards + gamma * next_v - v_t
    # Time-major padding: row t holds step t of every sequence; padded steps
    # have delta 0, and since padding only follows a sequence's end it keeps
    # gae at 0 until the sequence's last real step.
    padded = torch.zeros(max_steps + 1, bs, dtype=dtype, device=device)
    padded[t_ids, seq_ids] = delta
    decay = gamma * lam
    for t in range(max_steps - 1, -1, -1):
        torch.add(padded[t], padded[t + 1], alpha=decay, out=padded[t])
    adv = padded[t_ids, seq_ids]
    return adv, adv + v_t


def _gae_cpp(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
             truncate: torch.Tensor, gamma: float,
             lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # The extension validates cu_seqlens itself (same messages as check_layout).
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        cu_seqlens = cu_seqlens.to(torch.int64)
    return native.load("gae").gae_1d(rewards, values, cu_seqlens.contiguous(),
                                     truncate.contiguous(), gamma, lam)


def _gae_cuda(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
              truncate: torch.Tensor, gamma: float,
              lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    _validate(rewards, values, cu_seqlens)
    return native.load("cugae").gae_1d(rewards, values,
                                       cu_seqlens.to(torch.int64).contiguous(),
                                       truncate.contiguous(), gamma, lam)


def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
                truncate: torch.Tensor, gamma: float,
                lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    from realhf.impl.ops import triton_kernels

    _validate(rewards, values, cu_seqlens)
    return triton_kernels.gae_1d(rewards, values, cu_seqlens.contiguous(),
                                 truncate.contiguous(), gamma, lam)


dispatch.register("gae_1d", "python", _gae_python)
dispatch.register("gae_1d", "cpp", _gae_cpp, serves=dispatch.on_device_types("cpu"),
                  probe=native.cpu_probe("gae"))
dispatch.register("gae_1d", "cuda", _gae_cuda, serves=dispatch.on_device_types("cuda"),
                  probe=native.cuda_probe("cugae"))
dispatch.register("gae_1d", "triton", _gae_triton, serves=native.triton_serves,
                  probe=native.triton_probe)


def gae_1d(rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
           truncate: torch.Tensor, gamma: float, lam: float,
           backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of a packed batch; see the module docstring.

    Outputs have the shape and dtype of ``rewards``.  Half-precision inputs
    are computed in fp32.
    """
    _check_shapes(rewards, values, cu_seqlens, truncate)
    out_dtype = rewards.dtype
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if dtype not in _COMPUTE_DTYPES:
        dtype = torch.float32
    rewards = rewards.to(dtype).contiguous()
    values = values.to(dtype).contiguous()
    impl = dispatch.select("gae_1d", values.device, backend, values.numel())
    adv, ret = impl.fn(rewards, values, cu_seqlens, truncate, float(gamma), float(lam))
    if out_dtype != dtype:
        adv, ret = adv.to(out_dtype), ret.to(out_dtype)
    return adv, ret
