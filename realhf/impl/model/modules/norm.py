"""Normalization layers selected by ``ReaLModelConfig.layer_norm_type``."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from realhf.impl.ops import fused_layers


class RMSNorm(nn.Module):
    """x / rms(x) * w, normalized in fp32 and cast back before the scale (llama)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_layers.rms_norm(x, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """RMS norm with a zero-centred scale: x / rms(x) * (1 + w), all in fp32 (gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (fused_layers.rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


def _layer_norm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps)


NORMS: Dict[Optional[str], Callable[[int, float], nn.Module]] = {
    None: _layer_norm,
    "rms": RMSNorm,
    "gemma": GemmaRMSNorm,
}


def make_norm(norm_type: Optional[str], dim: int, eps: float) -> nn.Module:
    if norm_type not in NORMS:
        raise ValueError(f"Unknown layer_norm_type {norm_type!r}; known: {list(NORMS)}.")
    return NORMS[norm_type](dim, eps)


def norm_init_value(norm_type: Optional[str]) -> float:
    """Value of a norm scale that makes it the identity scale (gemma stores w - 1)."""
    return 0.0 if norm_type == "gemma" else 1.0
