"""Qwen2: biased q/k/v projections (unbiased output projection), optional tied embedding."""

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.from_hf.common import LlamaLikeFamily


def make_qwen2_config() -> ReaLModelConfig:
    return QWEN2.config_from_hf(
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
             intermediate_size=64, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="silu", tie_word_embeddings=True)
    )


QWEN2 = LlamaLikeFamily(
    name="qwen2", hf_cls_name="Qwen2ForCausalLM", hf_config_cls_name="Qwen2Config",
    qkv_bias=True, o_proj_bias=False, windowed_layers=True, make_test_config=make_qwen2_config,
)
QWEN2.register()
