"""LLaMA (and code/deepseek variants sharing LlamaForCausalLM)."""

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.from_hf.common import LlamaLikeFamily


def make_llama_config() -> ReaLModelConfig:
    """Tiny GQA llama for tests."""
    return LLAMA.config_from_hf(
        dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
             intermediate_size=64, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="silu", tie_word_embeddings=False)
    )


LLAMA = LlamaLikeFamily(
    name="llama", hf_cls_name="LlamaForCausalLM", hf_config_cls_name="LlamaConfig",
    make_test_config=make_llama_config,
)
LLAMA.register()
for _alias in ("codellama", "deepseek"):
    LlamaLikeFamily(name=_alias, hf_cls_name="LlamaForCausalLM", hf_config_cls_name="LlamaConfig",
                    make_test_config=make_llama_config).register()
