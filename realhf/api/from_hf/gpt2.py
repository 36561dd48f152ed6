"""GPT-2: LayerNorm with bias, learned positions, fused Conv1D q/k/v, tied head.

HF stores GPT-2 projections as Conv1D with weights [in, out], i.e. transposed
with respect to ``nn.Linear``; the fused ``c_attn`` is split into q/k/v.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

import torch

from realhf.api.core.model_api import ReaLModelConfig, register_hf_family
from realhf.api.from_hf.common import hf_config_dict

_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_REAL_RE = re.compile(r"^(\d+)\.(.+)$")
# HF block suffix -> (ReaL name, transpose).
_SIMPLE = {
    "ln_1.weight": ("attn.c_attn.ln.weight", False),
    "ln_1.bias": ("attn.c_attn.ln.bias", False),
    "attn.c_proj.weight": ("attn.c_proj.weight", True),
    "attn.c_proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("mlp.ln.weight", False),
    "ln_2.bias": ("mlp.ln.bias", False),
    "mlp.c_fc.weight": ("mlp.c_fc.weight", True),
    "mlp.c_fc.bias": ("mlp.c_fc.bias", False),
    "mlp.c_proj.weight": ("mlp.c_proj.weight", True),
    "mlp.c_proj.bias": ("mlp.c_proj.bias", False),
}
_SIMPLE_INV = {v[0]: (k, v[1]) for k, v in _SIMPLE.items()}
_QKV = ("q_attn", "k_attn", "v_attn")
_IGNORED = ("attn.bias", "attn.masked_bias")


def config_from_gpt2(hf_config_or_path: Any, is_critic: bool = False) -> ReaLModelConfig:
    d = hf_config_dict(hf_config_or_path)
    hidden = d["n_embd"]
    return ReaLModelConfig(
        n_layers=d["n_layer"],
        n_kv_heads=d["n_head"],
        n_q_heads=d["n_head"],
        hidden_dim=hidden,
        intermediate_dim=d.get("n_inner") or 4 * hidden,
        vocab_size=d["vocab_size"],
        n_positions=d["n_positions"],
        embd_pdrop=d.get("embd_pdrop", 0.1),
        resid_pdrop=d.get("resid_pdrop", 0.1),
        attn_pdrop=d.get("attn_pdrop", 0.1),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        activation_function=d.get("activation_function", "gelu_new"),
        scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
        scale_attn_weights=bool(d.get("scale_attn_weights", True)),
        use_attention_bias=True,
        use_attn_proj_bias=True,
        layer_norm_type=None,
        mlp_type=None,
        apply_rotary=False,
        tied_embedding=bool(d.get("tie_word_embeddings", True)) and not is_critic,
        is_critic=is_critic,
    )


def config_to_gpt2(config: ReaLModelConfig):
    import transformers

    hf = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.hidden_dim,
        n_layer=config.n_layers,
        n_head=config.n_q_heads,
        n_inner=config.intermediate_dim,
        activation_function=config.activation_function,
        resid_pdrop=config.resid_pdrop,
        embd_pdrop=config.embd_pdrop,
        attn_pdrop=config.attn_pdrop,
        layer_norm_epsilon=config.layer_norm_epsilon,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=config.tied_embedding,
    )
    hf.architectures = ["GPT2LMHeadModel"]
    return hf


def sd_from_gpt2(sd: Dict[str, torch.Tensor], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
    n = config.n_layers
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = gpt2_normalize_key(k)
        m = _BLOCK_RE.match(k)
        if m is None:
            name = {"transformer.wte.weight": "0.wte.weight", "transformer.wpe.weight": "0.wpe.weight",
                    "transformer.ln_f.weight": f"{n}.ln_f.weight", "transformer.ln_f.bias": f"{n}.ln_f.bias",
                    "lm_head.weight": f"{n + 1}.weight", "score.weight": f"{n + 1}.weight"}.get(k)
            if name is None:
                raise KeyError(f"Unexpected gpt2 checkpoint key {k!r}.")
            out[name] = v
            continue
        layer, suffix = int(m.group(1)) + 1, m.group(2)
        if suffix in _IGNORED:
            continue
        if suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = suffix.rsplit(".", 1)[1]
            # Conv1D weight [hidden, 3 * hidden]: q, k, v along the output (last) dim.
            for name, part in zip(_QKV, v.chunk(3, dim=-1)):
                out[f"{layer}.attn.c_attn.{name}.{kind}"] = part.t().contiguous() if kind == "weight" else part.clone()
            continue
        name, transpose = _SIMPLE[suffix]
        out[f"{layer}.{name}"] = v.t().contiguous() if transpose else v
    return out


def sd_to_gpt2(sd: Dict[str, torch.Tensor], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
    n = config.n_layers
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[tuple, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        layer, name = _REAL_RE.match(k).groups()
        layer = int(layer)
        top = {(0, "wte.weight"): "transformer.wte.weight", (0, "wpe.weight"): "transformer.wpe.weight",
               (n, "ln_f.weight"): "transformer.ln_f.weight", (n, "ln_f.bias"): "transformer.ln_f.bias",
               (n + 1, "weight"): "lm_head.weight"}.get((layer, name))
        if top is not None:
            out[top] = v
        elif name.startswith("attn.c_attn.") and name.split(".")[2] in _QKV:
            which, kind = name.split(".")[2:]
            qkv.setdefault((layer, kind), {})[which] = v
        else:
            hf_name, transpose = _SIMPLE_INV[name]
            out[f"transformer.h.{layer - 1}.{hf_name}"] = v.t().contiguous() if transpose else v
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise KeyError(f"gpt2 needs q, k and v of layer {layer} together to fuse c_attn.{kind}.")
        fused = torch.cat([parts[w] for w in _QKV], dim=0)
        out[f"transformer.h.{layer - 1}.attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
    return out


def gpt2_embedding_names(config: ReaLModelConfig) -> List[str]:
    return ["transformer.wte.weight", "transformer.wpe.weight"]


def gpt2_tblock_names(config: ReaLModelConfig, idx: int) -> List[str]:
    p = f"transformer.h.{idx}."
    names = [p + s for s in _SIMPLE] + [p + "attn.c_attn.weight", p + "attn.c_attn.bias"]
    if idx == config.n_layers - 1:
        names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return names


def gpt2_head_names(config: ReaLModelConfig) -> List[str]:
    return ["transformer.wte.weight"] if config.tied_embedding else ["lm_head.weight"]


_TOP_LEVEL = re.compile(r"^(h\.\d+\.|wte\.|wpe\.|ln_f\.)")


def gpt2_normalize_key(key: str) -> str:
    """The hub's original gpt2 files name the body without the ``transformer.`` prefix."""
    return "transformer." + key if _TOP_LEVEL.match(key) else key


def make_gpt2_config() -> ReaLModelConfig:
    return config_from_gpt2(dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


register_hf_family(
    name="gpt2",
    hf_cls_name="GPT2LMHeadModel",
    config_from_hf_converter=config_from_gpt2,
    config_to_hf_converter=config_to_gpt2,
    sd_from_hf_converter=sd_from_gpt2,
    sd_to_hf_converter=sd_to_gpt2,
    embedding_param_names=gpt2_embedding_names,
    tblock_param_names=gpt2_tblock_names,
    head_param_names=gpt2_head_names,
    real_config_maker=make_gpt2_config,
    hf_key_normalizer=gpt2_normalize_key,
)
