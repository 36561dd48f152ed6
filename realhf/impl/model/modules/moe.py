"""Mixture-of-experts feed-forward block (top-k routing, experts run one by one).

Routing: softmax over the router logits (fp32), keep the top-k experts and
renormalize their weights to sum to one (equivalently, softmax over the top-k
logits). During training the load-balancing auxiliary loss and the router
z-loss are computed and kept in ``self.aux_loss`` for the trainer to add.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.modules.activations import get_activation
from realhf.impl.model.modules.norm import make_norm


class ExpertMLP(nn.Module):
    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        h, f = config.hidden_dim, config.intermediate_dim
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        self.local_experts = nn.ModuleList(ExpertMLP(config) for _ in range(config.moe.num_experts))


class MoEMLP(nn.Module):
    """ln -> router -> weighted sum of the top-k experts' outputs."""

    def __init__(self, config: ReaLModelConfig):
        super().__init__()
        moe = config.moe
        if moe.routing_type not in ("aux_loss", "none"):
            raise NotImplementedError(f"MoE routing {moe.routing_type!r} is not supported.")
        if moe.capacity_factor is not None:
            raise NotImplementedError("Expert capacity (token dropping) is not supported.")
        self.moe = moe
        self.ln = make_norm(config.layer_norm_type, config.hidden_dim, config.layer_norm_epsilon)
        self.router = nn.Linear(config.hidden_dim, moe.num_experts, bias=False)
        self.experts = Experts(config)
        self.aux_loss: Optional[torch.Tensor] = None

    def _route(self, x: torch.Tensor):
        logits = self.router(x)
        probs = F.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.moe.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if self.training:
            self.aux_loss = self._losses(logits, probs, top_i)
        return top_w, top_i

    def _losses(self, logits, probs, top_i) -> torch.Tensor:
        n_exp = self.moe.num_experts
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.moe.routing_type == "aux_loss" and self.moe.aux_loss_coeff > 0:
            routed = F.one_hot(top_i, n_exp).sum(1).float().mean(0)  # tokens per expert / tokens
            loss = loss + self.moe.aux_loss_coeff * n_exp * (routed * probs.mean(0)).sum() / self.moe.top_k
        if self.moe.z_loss_coeff > 0:
            loss = loss + self.moe.z_loss_coeff * torch.logsumexp(logits.float(), -1).pow(2).mean()
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(x)
        if self.training and self.moe.input_jitter_eps > 0:
            eps = self.moe.input_jitter_eps
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        top_w, top_i = self._route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts.local_experts):
            token, slot = torch.where(top_i == e)
            if token.numel() == 0:
                continue
            y = expert(x[token]) * top_w[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out
