"""Mixtral: llama attention with a top-k mixture of gated experts per block.

HF checkpoints store experts per expert (``block_sparse_moe.experts.{j}.w1/w2/w3``
= gate/down/up); transformers >= 5 keeps them fused in memory
(``mlp.experts.gate_up_proj`` [E, 2F, H], ``mlp.experts.down_proj`` [E, H, F]).
Both are read; the per-expert checkpoint layout is written.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List

import torch

from realhf.api.core.model_api import ReaLModelConfig, ReaLMoEConfig
from realhf.api.from_hf.common import LlamaLikeFamily, hf_config_dict

_CKPT_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER_RE = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_REAL_MOE_RE = re.compile(r"^(\d+)\.mlp\.(?:router\.weight|experts\.local_experts\.(\d+)\.(\w+)_proj\.weight)$")
_W_TO_PROJ = {"w1": "gate", "w2": "down", "w3": "up"}
_PROJ_TO_W = {v: k for k, v in _W_TO_PROJ.items()}


@dataclasses.dataclass
class MixtralFamily(LlamaLikeFamily):
    def config_from_hf(self, hf_config_or_path: Any, is_critic: bool = False) -> ReaLModelConfig:
        d = hf_config_dict(hf_config_or_path)
        config = super().config_from_hf(d, is_critic)
        config.mlp_type = "moe"
        config.moe = ReaLMoEConfig(
            num_experts=d["num_local_experts"],
            top_k=d["num_experts_per_tok"],
            aux_loss_coeff=d.get("router_aux_loss_coef", 1e-3),
            input_jitter_eps=d.get("router_jitter_noise", 0.0) or 0.0,
        )
        return config

    def config_to_hf(self, config: ReaLModelConfig):
        hf = super().config_to_hf(config)
        hf.num_local_experts = config.moe.num_experts
        hf.num_experts_per_tok = config.moe.top_k
        hf.router_aux_loss_coef = config.moe.aux_loss_coeff
        hf.router_jitter_noise = config.moe.input_jitter_eps
        return hf

    def sd_from_hf(self, sd: Dict[str, torch.Tensor], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
        rest, out = {}, {}
        for k, v in sd.items():
            if m := _CKPT_EXPERT_RE.match(k):
                layer, e, w = m.groups()
                out[f"{int(layer) + 1}.mlp.experts.local_experts.{e}.{_W_TO_PROJ[w]}_proj.weight"] = v
            elif m := _FUSED_RE.match(k):
                layer = int(m.group(1)) + 1
                for e in range(v.shape[0]):
                    p = f"{layer}.mlp.experts.local_experts.{e}."
                    if m.group(2) == "down_proj":
                        out[p + "down_proj.weight"] = v[e].clone()
                    else:
                        gate, up = v[e].chunk(2, dim=0)
                        out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = gate.clone(), up.clone()
            elif m := _ROUTER_RE.match(k):
                out[f"{int(m.group(1)) + 1}.mlp.router.weight"] = v
            else:
                rest[k] = v
        out.update(super().sd_from_hf(rest, config))
        return out

    def sd_to_hf(self, sd: Dict[str, torch.Tensor], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
        rest, out = {}, {}
        for k, v in sd.items():
            m = _REAL_MOE_RE.match(k)
            if m is None:
                rest[k] = v
                continue
            layer, e, proj = m.groups()
            p = f"model.layers.{int(layer) - 1}.block_sparse_moe."
            if e is None:
                out[p + "gate.weight"] = v
            else:
                out[p + f"experts.{e}.{_PROJ_TO_W[proj]}.weight"] = v
        out.update(super().sd_to_hf(rest, config))
        return out

    def tblock_names(self, config: ReaLModelConfig, idx: int) -> List[str]:
        p = f"model.layers.{idx}."
        names = [n for n in super().tblock_names(config, idx) if ".mlp." not in n]
        names.append(p + "block_sparse_moe.gate.weight")
        for e in range(config.moe.num_experts):
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
        return names


def make_mixtral_config() -> ReaLModelConfig:
    return MIXTRAL.config_from_hf(
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
             intermediate_size=48, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="silu", num_local_experts=4, num_experts_per_tok=2)
    )


MIXTRAL = MixtralFamily(
    name="mixtral", hf_cls_name="MixtralForCausalLM", hf_config_cls_name="MixtralConfig",
    qkv_bias=False, o_proj_bias=False, uses_sliding_window=True, make_test_config=make_mixtral_config,
)
MIXTRAL.register()
