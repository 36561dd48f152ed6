"""Qwen3: per-head RMS norm of queries and keys before rotary, explicit head_dim."""

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.from_hf.common import LlamaLikeFamily


def make_qwen3_config() -> ReaLModelConfig:
    return QWEN3.config_from_hf(
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=16,
             intermediate_size=64, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="silu", tie_word_embeddings=True)
    )


QWEN3 = LlamaLikeFamily(
    name="qwen3", hf_cls_name="Qwen3ForCausalLM", hf_config_cls_name="Qwen3Config",
    qk_layernorm=True, windowed_layers=True, make_test_config=make_qwen3_config,
)
QWEN3.register()
