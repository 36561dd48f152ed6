"""Gemma: (1 + w) RMS norm, embeddings scaled by sqrt(hidden), tied head, explicit head_dim."""

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.from_hf.common import LlamaLikeFamily, gemma_activation


def make_gemma_config() -> ReaLModelConfig:
    return GEMMA.config_from_hf(
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32, head_dim=16,
             intermediate_size=64, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
    )


GEMMA = LlamaLikeFamily(
    name="gemma", hf_cls_name="GemmaForCausalLM", hf_config_cls_name="GemmaConfig",
    layer_norm_type="gemma", normalize_embed=True, tie_default=True, activation_from_hf=gemma_activation, make_test_config=make_gemma_config,
)
GEMMA.register()
