"""Rotary position embedding on packed tokens (positions given per token)."""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from realhf.impl.ops import fused_layers


def _default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponent)


def _linear_scaling(inv_freq: torch.Tensor, factor: float, extra: Optional[dict]) -> torch.Tensor:
    # Dividing frequencies by ``factor`` equals dividing positions by it.
    return inv_freq / factor


def _llama3_scaling(inv_freq: torch.Tensor, factor: float, extra: Optional[dict]) -> torch.Tensor:
    """Llama 3.1 rule: keep high frequencies, divide low ones, blend in between."""
    extra = extra or {}
    low = extra.get("low_freq_factor", 1.0)
    high = extra.get("high_freq_factor", 4.0)
    old_len = extra.get("original_max_position_embeddings", 8192)
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


ROTARY_SCALINGS: Dict[str, Callable[[torch.Tensor, float, Optional[dict]], torch.Tensor]] = {
    "linear": _linear_scaling,
    "llama3": _llama3_scaling,
}


def rotary_inv_freq(
    head_dim: int,
    base: float,
    scaling: Optional[float] = None,
    scaling_type: Optional[str] = None,
    extra: Optional[dict] = None,
) -> torch.Tensor:
    inv_freq = _default_inv_freq(head_dim, base)
    if scaling_type is not None:
        if scaling_type not in ROTARY_SCALINGS:
            raise ValueError(f"Unsupported rotary scaling {scaling_type!r}; known: {list(ROTARY_SCALINGS)}.")
        inv_freq = ROTARY_SCALINGS[scaling_type](inv_freq, scaling or 1.0, extra)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [tokens, head_dim // 2] in fp32."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] (fp32 math).

    Non-interleaved pairs dimension j with j + head_dim/2 (GPT-NeoX / HF llama
    layout); interleaved pairs dimensions 2j and 2j+1 (original RoFormer layout).
    """
    return fused_layers.rotary(x, cos, sin, interleaved)
