"""Feed-forward blocks: plain (gpt2) and gated (llama family) MLPs."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.modules.activations import get_activation
from realhf.impl.model.modules.moe import MoEMLP
from realhf.impl.model.modules.norm import make_norm
from realhf.impl.ops import fused_layers


class PlainMLP(nn.Module):
    """ln -> c_fc -> act -> c_proj, all with biases (gpt2)."""

    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        self.ln = make_norm(config.layer_norm_type, config.hidden_dim, config.layer_norm_epsilon)
        self.c_fc = nn.Linear(config.hidden_dim, config.intermediate_dim)
        self.c_proj = nn.Linear(config.intermediate_dim, config.hidden_dim)
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(self.ln(x))))


class GatedMLP(nn.Module):
    """ln -> down(act(gate(x)) * up(x)) (llama, mistral, qwen, gemma)."""

    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        self.ln = make_norm(config.layer_norm_type, config.hidden_dim, config.layer_norm_epsilon)
        h, f, b = config.hidden_dim, config.intermediate_dim, config.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=b)
        self.up_proj = nn.Linear(h, f, bias=b)
        self.down_proj = nn.Linear(f, h, bias=b)
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(x)
        if self.act is F.silu:
            return self.down_proj(fused_layers.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


MLPS: Dict[object, Callable[[ReaLModelConfig], nn.Module]] = {
    None: PlainMLP,
    "llama": GatedMLP,
    "moe": MoEMLP,
}


def make_mlp(config: ReaLModelConfig) -> nn.Module:
    if config.mlp_type not in MLPS:
        raise ValueError(f"Unsupported mlp_type {config.mlp_type!r}; known: {list(MLPS)}.")
    return MLPS[config.mlp_type](config)
