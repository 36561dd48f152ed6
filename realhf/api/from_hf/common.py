"""Conversions shared by the llama-like families (llama, mistral, qwen2/3, gemma).

These checkpoints share the HF key layout ``model.layers.{i}.self_attn.*``,
``model.layers.{i}.mlp.*``; families differ only in config details, which a
:class:`LlamaLikeFamily` describes. ``make_llama_like_family`` then produces the
converters ``register_hf_family`` needs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from realhf.api.core.model_api import ReaLModelConfig, register_hf_family

# HF block-relative key suffix -> ReaL block-relative name.
LLAMA_BLOCK_KEYS: Dict[str, str] = {
    "input_layernorm.weight": "attn.c_attn.ln.weight",
    "self_attn.q_proj.weight": "attn.c_attn.q_attn.weight",
    "self_attn.q_proj.bias": "attn.c_attn.q_attn.bias",
    "self_attn.k_proj.weight": "attn.c_attn.k_attn.weight",
    "self_attn.k_proj.bias": "attn.c_attn.k_attn.bias",
    "self_attn.v_proj.weight": "attn.c_attn.v_attn.weight",
    "self_attn.v_proj.bias": "attn.c_attn.v_attn.bias",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "self_attn.o_proj.bias": "attn.c_proj.bias",
    "self_attn.q_norm.weight": "attn.q_ln.weight",
    "self_attn.k_norm.weight": "attn.k_ln.weight",
    "post_attention_layernorm.weight": "mlp.ln.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.gate_proj.bias": "mlp.gate_proj.bias",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.up_proj.bias": "mlp.up_proj.bias",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
}
LLAMA_BLOCK_KEYS_INV = {v: k for k, v in LLAMA_BLOCK_KEYS.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_REAL_KEY_RE = re.compile(r"^(\d+)\.(.+)$")
# Buffers some checkpoints store that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_config_dict(hf_config_or_path: Any) -> Dict[str, Any]:
    """Accept a transformers config object, a dict, or a checkpoint directory."""
    if isinstance(hf_config_or_path, (str, os.PathLike)):
        from realhf.impl.model.conversion.hf_io import read_hf_config

        return read_hf_config(hf_config_or_path)
    if isinstance(hf_config_or_path, dict):
        return dict(hf_config_or_path)
    return hf_config_or_path.to_dict()


def rotary_from_hf(d: Dict[str, Any]) -> Dict[str, Any]:
    """ReaLModelConfig rotary fields from ``rope_parameters`` (or legacy rope_theta/rope_scaling)."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else legacy
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    out: Dict[str, Any] = dict(rotary_base=float(theta))
    if rope_type in (None, "default"):
        return out
    if rope_type not in ("linear", "llama3"):
        raise NotImplementedError(f"Rotary scaling {rope_type!r} is not supported.")
    out.update(rotary_scaling=float(scaling["factor"]), rotary_scaling_type=rope_type)
    if rope_type == "llama3":
        out["rotary_scaling_extra"] = {
            k: scaling[k]
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k in scaling
        }
    return out


def rotary_to_hf(config: ReaLModelConfig) -> Dict[str, Any]:
    params: Dict[str, Any] = {"rope_type": config.rotary_scaling_type or "default", "rope_theta": config.rotary_base}
    if config.rotary_scaling_type is not None:
        params["factor"] = config.rotary_scaling
        params.update(config.rotary_scaling_extra or {})
    return {"rope_parameters": params}


def _sliding_window(d: Dict[str, Any]) -> Optional[int]:
    if d.get("use_sliding_window") is False:
        return None
    return d.get("sliding_window")


def windowed_layers_from_hf(d: Dict[str, Any]) -> Tuple[Optional[int], Optional[List[int]]]:
    """``(sliding_window, sliding_window_layers)`` of a Qwen2/Qwen3 config.

    As in transformers, the window is off unless ``use_sliding_window`` is true
    (its default is false), and it applies to the layers that ``layer_types``
    marks ``"sliding_attention"``; without ``layer_types`` those are the layers
    ``i >= max_window_layers`` (default 28). ``None`` layers means all layers.
    """
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    if window is None:
        return None, None
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 28)
        layers = [i for i in range(n) if i >= first]
    else:
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not layers:
        return None, None
    return window, (None if len(layers) == n else layers)


def windowed_layers_to_hf(config: ReaLModelConfig) -> Dict[str, Any]:
    """Qwen2/Qwen3 config fields that reproduce ``config``'s per-layer window."""
    n = config.n_layers
    if config.sliding_window is None:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=n,
                    layer_types=["full_attention"] * n)
    layers = list(range(n)) if config.sliding_window_layers is None else sorted(config.sliding_window_layers)
    types = ["sliding_attention" if i in layers else "full_attention" for i in range(n)]
    # max_window_layers describes a window on a suffix of the layers; layer_types is authoritative.
    suffix = layers == list(range(n - len(layers), n))
    return dict(use_sliding_window=True, sliding_window=config.sliding_window,
                max_window_layers=n - len(layers) if suffix else (layers[0] if layers else n), layer_types=types)


def gemma_activation(d: Dict[str, Any]) -> str:
    """Gemma's MLP activation: the legacy ``"gelu"`` of the official configs means tanh GELU.

    transformers' GemmaConfig rewrites ``hidden_act="gelu"`` to
    ``"gelu_pytorch_tanh"``; ``hidden_activation`` (older configs) is used only
    when ``hidden_act`` is absent.
    """
    act = d.get("hidden_act") or d.get("hidden_activation") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


@dataclasses.dataclass
class LlamaLikeFamily:
    """What distinguishes one llama-like family from another."""

    name: str
    hf_cls_name: str
    hf_config_cls_name: str
    qkv_bias: Optional[bool] = None  # None: read "attention_bias" from the HF config
    o_proj_bias: Optional[bool] = None
    layer_norm_type: str = "rms"
    normalize_embed: bool = False
    qk_layernorm: bool = False
    uses_sliding_window: bool = False
    # Qwen-style window: opt-in (use_sliding_window) and only on some layers.
    windowed_layers: bool = False
    activation_from_hf: Optional[Callable[[Dict[str, Any]], str]] = None
    tie_default: bool = False  # HF default of tie_word_embeddings
    # Extra HF config fields written when converting back.
    hf_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    make_test_config: Optional[Callable[[], ReaLModelConfig]] = None

    # ------------------------------------------------------------- config
    def config_from_hf(self, hf_config_or_path: Any, is_critic: bool = False) -> ReaLModelConfig:
        d = hf_config_dict(hf_config_or_path)
        bias = bool(d.get("attention_bias", False))
        n_heads = d["num_attention_heads"]
        window = _sliding_window(d) if self.uses_sliding_window else None
        window_layers: Optional[List[int]] = None
        if self.windowed_layers:
            window, window_layers = windowed_layers_from_hf(d)
        act = (self.activation_from_hf(d) if self.activation_from_hf is not None
               else d.get("hidden_act") or d.get("hidden_activation") or "silu")
        return ReaLModelConfig(
            n_layers=d["num_hidden_layers"],
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            n_q_heads=n_heads,
            hidden_dim=d["hidden_size"],
            intermediate_dim=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            n_positions=d.get("max_position_embeddings"),
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attn_pdrop=float(d.get("attention_dropout", 0.0) or 0.0),
            layer_norm_epsilon=d.get("rms_norm_eps", 1e-6),
            activation_function=act,
            scale_attn_by_inverse_layer_idx=False,
            use_attention_bias=bias if self.qkv_bias is None else self.qkv_bias,
            use_attn_proj_bias=bias if self.o_proj_bias is None else self.o_proj_bias,
            layer_norm_type=self.layer_norm_type,
            mlp_type="llama",
            apply_rotary=True,
            rotary_interleaved=False,
            **rotary_from_hf(d),
            normalize_embed=self.normalize_embed,
            tied_embedding=bool(d.get("tie_word_embeddings", self.tie_default)) and not is_critic,
            sliding_window=window,
            sliding_window_layers=window_layers,
            qk_layernorm=self.qk_layernorm,
            mlp_bias=bool(d.get("mlp_bias", False)),
            is_critic=is_critic,
        )

    def config_to_hf(self, config: ReaLModelConfig):
        import transformers

        kwargs: Dict[str, Any] = dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_dim,
            intermediate_size=config.intermediate_dim,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_q_heads,
            num_key_value_heads=config.n_kv_heads,
            head_dim=config.head_dim,
            hidden_act=config.activation_function,
            max_position_embeddings=config.n_positions or 4096,
            rms_norm_eps=config.layer_norm_epsilon,
            tie_word_embeddings=config.tied_embedding,
            attention_dropout=config.attn_pdrop,
            **rotary_to_hf(config),
        )
        if self.qkv_bias is None:
            kwargs["attention_bias"] = config.use_attention_bias
        if config.mlp_bias:
            kwargs["mlp_bias"] = True
        if self.windowed_layers:
            kwargs.update(windowed_layers_to_hf(config))
        elif self.uses_sliding_window:
            kwargs["sliding_window"] = config.sliding_window
        kwargs.update(self.hf_extra)
        hf = getattr(transformers, self.hf_config_cls_name)(**kwargs)
        hf.architectures = [self.hf_cls_name]
        return hf

    # --------------------------------------------------------- state dict
    def sd_from_hf(self, sd: Dict[str, torch.Tensor], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
        n = config.n_layers
        out: Dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            m = _HF_BLOCK_RE.match(k)
            if m is not None:
                if m.group(2).endswith(_IGNORED_SUFFIXES):
                    continue
                out[f"{int(m.group(1)) + 1}.{LLAMA_BLOCK_KEYS[m.group(2)]}"] = v
            elif k == "model.embed_tokens.weight":
                out["0.wte.weight"] = v
            elif k == "model.norm.weight":
                out[f"{n}.ln_f.weight"] = v
            elif k in ("lm_head.weight", "score.weight"):
                out[f"{n + 1}.weight"] = v
            else:
                raise KeyError(f"Unexpected {self.name} checkpoint key {k!r}.")
        return out

    def sd_to_hf(self, sd: Dict[str, torch.Tensor], config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
        n = config.n_layers
        out: Dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            layer, name = _REAL_KEY_RE.match(k).groups()
            layer = int(layer)
            if layer == 0 and name == "wte.weight":
                out["model.embed_tokens.weight"] = v
            elif layer == n + 1 and name == "weight":
                out["lm_head.weight"] = v
            elif layer == n and name == "ln_f.weight":
                out["model.norm.weight"] = v
            else:
                out[f"model.layers.{layer - 1}.{LLAMA_BLOCK_KEYS_INV[name]}"] = v
        return out

    # ------------------------------------------------------- param names
    def embedding_names(self, config: ReaLModelConfig) -> List[str]:
        return ["model.embed_tokens.weight"]

    def tblock_names(self, config: ReaLModelConfig, idx: int) -> List[str]:
        p = f"model.layers.{idx}."
        names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj"):
            names.append(p + f"self_attn.{proj}.weight")
            if config.use_attention_bias:
                names.append(p + f"self_attn.{proj}.bias")
        names.append(p + "self_attn.o_proj.weight")
        if config.use_attn_proj_bias:
            names.append(p + "self_attn.o_proj.bias")
        if config.qk_layernorm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(p + f"mlp.{proj}.weight")
            if config.mlp_bias:
                names.append(p + f"mlp.{proj}.bias")
        if idx == config.n_layers - 1:
            names.append("model.norm.weight")
        return names

    def head_names(self, config: ReaLModelConfig) -> List[str]:
        # A tied head is read from the embedding entry.
        return ["model.embed_tokens.weight"] if config.tied_embedding else ["lm_head.weight"]

    def register(self) -> None:
        register_hf_family(
            name=self.name,
            hf_cls_name=self.hf_cls_name,
            config_from_hf_converter=self.config_from_hf,
            config_to_hf_converter=self.config_to_hf,
            sd_from_hf_converter=self.sd_from_hf,
            sd_to_hf_converter=self.sd_to_hf,
            embedding_param_names=self.embedding_names,
            tblock_param_names=self.tblock_names,
            head_param_names=self.head_names,
            real_config_maker=self.make_test_config,
        )
