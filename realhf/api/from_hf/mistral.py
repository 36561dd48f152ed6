"""Mistral: llama layout plus a sliding attention window."""

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.from_hf.common import LlamaLikeFamily


def make_mistral_config() -> ReaLModelConfig:
    return MISTRAL.config_from_hf(
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
             intermediate_size=64, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="silu", sliding_window=8)
    )


MISTRAL = LlamaLikeFamily(
    name="mistral", hf_cls_name="MistralForCausalLM", hf_config_cls_name="MistralConfig",
    qkv_bias=False, o_proj_bias=False, uses_sliding_window=True, make_test_config=make_mistral_config,
)
MISTRAL.register()
