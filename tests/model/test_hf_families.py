"""ReaLModel against transformers on tiny random models of every family (fp32, CPU)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import realhf.impl.model  # noqa: F401  (attaches from_/to_ helpers)
from realhf.api.core.model_api import HF_MODEL_FAMILIES, get_hf_family
from realhf.impl.model.conversion.hf_io import load_hf_state_dict
from realhf.impl.model.nn.real_llm_api import ReaLModel

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
            max_position_embeddings=128)

# id -> (family, HF config class, config kwargs)
CASES = {
    "llama_gqa": ("llama", "LlamaConfig", dict(TINY, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied_bias_llama3": ("llama", "LlamaConfig", dict(
        TINY, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_rope": ("llama", "LlamaConfig", dict(
        TINY, num_key_value_heads=1, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral_window": ("mistral", "MistralConfig", dict(TINY, num_key_value_heads=2, sliding_window=4)),
    "qwen2_bias_tied": ("qwen2", "Qwen2Config", dict(TINY, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", "Qwen2Config", dict(TINY, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3_qknorm": ("qwen3", "Qwen3Config", dict(TINY, num_key_value_heads=2, head_dim=16,
                                                 tie_word_embeddings=False)),
    # An odd vocabulary, like GPT-2's 50257 (it can never be split over tensor-parallel ranks).
    "gpt2": ("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt2_inv_layer_scale": ("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                                        n_positions=64, scale_attn_by_inverse_layer_idx=True)),
    "gemma": ("gemma", "GemmaConfig", dict(TINY, num_key_value_heads=1, head_dim=16)),
    "mixtral": ("mixtral", "MixtralConfig", dict(TINY, num_key_value_heads=2, num_local_experts=4,
                                                 num_experts_per_tok=2)),
}
CASES = {k: v for k, v in CASES.items() if v[0] in HF_MODEL_FAMILIES}
LENGTHS = [1, 5, 17, 9]


@functools.lru_cache(maxsize=None)
def _hf_model(case: str):
    """Built once per case; tests only read it."""
    family, cfg_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    cfg.architectures = [get_hf_family(family).hf_cls_name]
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        # Larger weights than HF's init so that attention is far from uniform (scales,
        # windows and positions then matter); random norms and biases are tested too.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif "norm" in name or "ln" in name:
                p.normal_(0.0 if family == "gemma" else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return family, model


def _real_from_hf(family: str, hf_model, **kwargs) -> ReaLModel:
    fam = get_hf_family(family)
    config = fam.config_from_hf_converter(hf_model.config)
    model = ReaLModel(config, **kwargs).instantiate()
    sd = fam.sd_from_hf_converter(hf_model.state_dict(), config)
    model.load_state_dict({k: v for k, v in sd.items() if k in model.param_spec}, strict=False)
    return model.eval()


def _packed(vocab: int, lengths=LENGTHS):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0)
    return ids, cu


@torch.no_grad()
def _hf_logits(hf_model, ids, cu):
    return torch.cat([hf_model(ids[s:e][None]).logits[0] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_match_hf(case):
    family, hf = _hf_model(case)
    model = _real_from_hf(family, hf)
    ids, cu = _packed(model.config.vocab_size)
    out = model(ids, cu, max(LENGTHS))
    ref = _hf_logits(hf, ids, cu)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip(case, tmp_path):
    family, hf = _hf_model(case)
    fam = get_hf_family(family)
    config = fam.config_from_hf_converter(hf.config)
    # The checkpoint-file layout (transformers may fuse tensors in memory, e.g. MoE experts).
    hf.save_pretrained(tmp_path)
    hf_sd = load_hf_state_dict(tmp_path)
    from_memory = fam.sd_from_hf_converter(hf.state_dict(), config)
    from_file = fam.sd_from_hf_converter(hf_sd, config)
    assert set(from_memory) - set(from_file) <= {f"{config.n_layers + 1}.weight"}  # tied heads are not saved
    assert all(torch.equal(from_memory[k], v) for k, v in from_file.items())
    back = fam.sd_to_hf_converter(fam.sd_from_hf_converter(hf_sd, config), config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    # Any subset converts alone (a pipeline stage holds only some layers).
    names = fam.tblock_param_names(config, 1)
    part = fam.sd_from_hf_converter({k: hf_sd[k] for k in names}, config)
    assert all(k.startswith("2.") for k in part)
    assert set(fam.sd_to_hf_converter(part, config)) == set(names)
    # Config survives the trip through HF.
    assert fam.config_from_hf_converter(fam.config_to_hf_converter(config)) == config


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_save_load_hf_checkpoint(case, tmp_path):
    family, hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "src")
    model = getattr(ReaLModel, f"from_{family}")(str(tmp_path / "src")).eval()
    ids, cu = _packed(model.config.vocab_size)
    ref = _hf_logits(hf, ids, cu)
    assert (model(ids, cu, max(LENGTHS)) - ref).abs().max().item() <= 1e-5
    getattr(model, f"to_{family}")(None, str(tmp_path / "dst"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").float().eval()
    assert (_hf_logits(reloaded, ids, cu) - ref).abs().max().item() <= 1e-5
    # Stage-wise loading reads only its own layers and matches the whole model.
    stages = [getattr(ReaLModel, f"from_{family}")(str(tmp_path / "src"), pp_size=2, pp_rank=r).eval()
              for r in range(2)]
    h = stages[0](ids, cu, max(LENGTHS))
    assert (stages[1](None, cu, max(LENGTHS), hidden_states=h) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_critic_from_actor(case, tmp_path):
    family, hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    critic = getattr(ReaLModel, f"from_{family}")(str(tmp_path), init_critic_from_actor=True).eval()
    assert critic.config.is_critic and not critic.config.tied_embedding
    ids, cu = _packed(critic.config.vocab_size)
    values = critic(ids, cu, max(LENGTHS))
    assert values.shape == (sum(LENGTHS),)
    assert torch.isfinite(values).all()
    # A critic checkpoint (scalar head) written by ReaL loads back as a critic.
    getattr(critic, f"to_{family}")(None, str(tmp_path / "critic"))
    again = getattr(ReaLModel, f"from_{family}")(str(tmp_path / "critic"), is_critic=True).eval()
    assert torch.equal(again(ids, cu, max(LENGTHS)), values)


@pytest.mark.parametrize("family", sorted(HF_MODEL_FAMILIES.names()))
def test_family_helpers_attached(family):
    for attr in (f"from_{family}", f"to_{family}", f"config_from_{family}", f"config_to_{family}",
                 f"make_{family}_config"):
        assert hasattr(ReaLModel, attr)
    config = getattr(ReaLModel, f"make_{family}_config")()
    model = ReaLModel(config).instantiate()
    ids, cu = _packed(config.vocab_size)
    assert model(ids, cu, max(LENGTHS)).shape == (sum(LENGTHS), config.vocab_size)


def test_to_family_writes_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(TINY["vocab_size"] - 1)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    family, hf = _hf_model("llama_gqa")
    model = _real_from_hf(family, hf)
    model.to_llama(tokenizer, str(tmp_path))
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("w1 w5 w7")["input_ids"] == [1, 5, 7]
    # A checkpoint written by ReaL loads back into ReaL unchanged.
    again = ReaLModel.from_llama(str(tmp_path))
    assert torch.equal(again.flat_param, model.flat_param)
