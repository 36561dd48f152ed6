"""Family details that only show on real checkpoints: legacy config values, the hub's
gpt2 key layout, Qwen's per-layer sliding window, and critic heads made from actors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import realhf.impl.model  # noqa: F401  (attaches from_/to_ helpers)
from realhf.api.core.model_api import get_hf_family
from realhf.impl.model.nn.real_llm_api import ReaLModel

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=96,
            max_position_embeddings=128)


def _randomize(model: torch.nn.Module, norm_mean: float = 1.0) -> None:
    """Weights large enough that attention is far from uniform (windows then matter)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif "norm" in name or "ln" in name:
                p.normal_(norm_mean, 0.1)
            else:
                p.normal_(0.0, 0.1)


def _hf(cfg: transformers.PretrainedConfig, family: str, norm_mean: float = 1.0, **kw):
    torch.manual_seed(0)
    cfg.architectures = [get_hf_family(family).hf_cls_name]
    model = transformers.AutoModelForCausalLM.from_config(cfg, **kw).float().eval()
    _randomize(model, norm_mean)
    return model


def _ids(vocab: int, n: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))


def _real_logits(model: ReaLModel, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, torch.tensor([0, ids.numel()]), ids.numel())


# --------------------------------------------------------------------------- gemma
@torch.no_grad()
def test_gemma_legacy_gelu_is_tanh_gelu(tmp_path):
    """Official Gemma-1 configs say hidden_act="gelu" and mean the tanh approximation."""
    hf = _hf(transformers.GemmaConfig(**TINY, num_hidden_layers=2, num_key_value_heads=1, head_dim=16),
             "gemma", norm_mean=0.0)
    hf.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["hidden_act"] = "gelu"
    raw.pop("hidden_activation", None)
    cfg_path.write_text(json.dumps(raw))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    model = ReaLModel.from_gemma(str(tmp_path)).eval()
    assert model.config.activation_function == "gelu_pytorch_tanh"
    ids = _ids(96, 11)
    ref = ref_model(ids[None]).logits[0]
    assert (_real_logits(model, ids) - ref).abs().max().item() <= 1e-5


def test_gemma_activation_fields():
    fam = get_hf_family("gemma")
    base = dict(TINY, num_hidden_layers=1, num_key_value_heads=1, head_dim=16)
    assert fam.config_from_hf_converter(dict(base, hidden_act="gelu")).activation_function == "gelu_pytorch_tanh"
    assert fam.config_from_hf_converter(base).activation_function == "gelu_pytorch_tanh"
    assert fam.config_from_hf_converter(dict(base, hidden_activation="gelu_new")).activation_function == "gelu_new"


# --------------------------------------------------------------------------- gpt2 hub layout
@torch.no_grad()
def test_gpt2_hub_key_layout(tmp_path):
    """The hub's gpt2 files store keys without 'transformer.' plus attention-mask buffers."""
    from safetensors.torch import save_file

    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = _hf(cfg, "gpt2")
    hf.config.save_pretrained(tmp_path)
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte
        sd[k.removeprefix("transformer.")] = v.clone().contiguous()
    for i in range(cfg.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids = _ids(97, 13)
    ref = hf(ids[None]).logits[0]
    model = ReaLModel.from_gpt2(str(tmp_path)).eval()
    assert (_real_logits(model, ids) - ref).abs().max().item() <= 1e-5
    # A pipeline stage reads its own layers from the same layout.
    last = ReaLModel.from_gpt2(str(tmp_path), pp_size=2, pp_rank=1)
    assert torch.equal(last.get_param("2.attn.c_proj.weight"), model.get_param("2.attn.c_proj.weight"))


# --------------------------------------------------------------------------- qwen windows
QWEN_WINDOW = dict(TINY, num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                   max_window_layers=1, tie_word_embeddings=False)


@pytest.mark.parametrize("family,cfg_cls,extra", [("qwen2", "Qwen2Config", {}),
                                                  ("qwen3", "Qwen3Config", dict(head_dim=16))])
@torch.no_grad()
def test_qwen_window_only_on_some_layers(family, cfg_cls, extra, tmp_path):
    cfg = getattr(transformers, cfg_cls)(**QWEN_WINDOW, **extra)
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    hf = _hf(cfg, family, attn_implementation="eager")
    hf.save_pretrained(tmp_path / "src")
    model = getattr(ReaLModel, f"from_{family}")(str(tmp_path / "src")).eval()
    assert model.config.sliding_window == 3 and model.config.sliding_window_layers == [1, 2]
    ids = _ids(96, 14)
    ref = hf(ids[None]).logits[0]
    assert (_real_logits(model, ids) - ref).abs().max().item() <= 1e-5
    # The window really matters here: everywhere or nowhere gives other logits.
    for window, layers in ((3, None), (None, None)):
        other = getattr(ReaLModel, f"from_{family}")(str(tmp_path / "src")).eval()
        for i, block in enumerate(other.layers[1:-1]):
            block.attn.window = window if layers is None or i in layers else None
        assert (_real_logits(other, ids) - ref).abs().max().item() > 1e-3
    # Saving writes the fields back; transformers reads the same layer types.
    getattr(model, f"to_{family}")(None, str(tmp_path / "dst"))
    saved = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert saved["use_sliding_window"] is True and saved["sliding_window"] == 3
    assert saved["max_window_layers"] == 1
    assert saved["layer_types"] == cfg.layer_types
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager").eval()
    assert (back(ids[None]).logits[0] - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_window_config_fields(family):
    fam = get_hf_family(family)
    base = dict(TINY, num_hidden_layers=4, num_key_value_heads=2, head_dim=8)
    # transformers' default: no window unless use_sliding_window is true.
    assert fam.config_from_hf_converter(dict(base, sliding_window=2)).sliding_window is None
    on = dict(base, use_sliding_window=True, sliding_window=2)
    assert fam.config_from_hf_converter(dict(on, max_window_layers=28)).sliding_window is None
    c = fam.config_from_hf_converter(dict(on, max_window_layers=0))
    assert (c.sliding_window, c.sliding_window_layers) == (2, None)
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    c = fam.config_from_hf_converter(dict(on, max_window_layers=3, layer_types=types))
    assert c.sliding_window_layers == [0, 2]  # layer_types wins over max_window_layers
    hf = fam.config_to_hf_converter(c)
    assert hf.layer_types == types and hf.sliding_window == 2
    assert fam.config_from_hf_converter(hf) == c


# --------------------------------------------------------------------------- critic heads
def _llama_ckpt(tmp_path):
    hf = _hf(transformers.LlamaConfig(**TINY, num_hidden_layers=2, num_key_value_heads=2), "llama")
    hf.save_pretrained(tmp_path)
    return str(tmp_path)


def test_critic_head_from_actor_is_seeded(tmp_path):
    """Every worker must draw the same value head: it depends on the seed, not on the global RNG."""
    path = _llama_ckpt(tmp_path)
    heads = []
    for rng in (1, 2):
        torch.manual_seed(rng)
        critic = ReaLModel.from_llama(path, init_critic_from_actor=True, seed=7)
        heads.append(critic.get_param("3.weight").clone())
    assert torch.equal(heads[0], heads[1])
    assert heads[0].abs().sum() > 0
    other = ReaLModel.from_llama(path, init_critic_from_actor=True, seed=8).get_param("3.weight")
    assert not torch.equal(other, heads[0])
    # The last pipeline stage alone draws the same head.
    torch.manual_seed(3)
    stage = ReaLModel.from_llama(path, init_critic_from_actor=True, seed=7, pp_size=2, pp_rank=1)
    assert torch.equal(stage.get_param("3.weight"), heads[0])


def test_critic_head_through_model_factory(tmp_path):
    from realhf.assets import tokenizer_path
    from realhf.impl.model.real_model_factory import make_real_model

    path = _llama_ckpt(tmp_path)
    heads = []
    for rng in (5, 6):
        torch.manual_seed(rng)
        m = make_real_model("critic", family="llama", path=path, is_critic=True,
                            init_critic_from_actor=True, seed=3, tokenizer_path=tokenizer_path())
        heads.append(m.module.get_param("3.weight").clone())
    assert torch.equal(heads[0], heads[1])


def _tp2_critic_head(rank: int, world: int, path: str):
    from realhf.base import constants
    from tests.parallel._mesh import MODEL, setup_mesh

    setup_mesh(dp=1, tp=2, pp=1)
    torch.manual_seed(100 + rank)  # a different global RNG state on each rank
    with constants.model_scope(MODEL):
        critic = ReaLModel.from_llama(path, init_critic_from_actor=True, seed=7)
        assert critic.tp_size == 2
        return critic.get_param("3.weight").clone()


@pytest.mark.distributed
def test_critic_head_from_actor_same_on_tp_ranks(tmp_path):
    from realhf.base.testing import run_distributed

    path = _llama_ckpt(tmp_path)
    heads = run_distributed(_tp2_critic_head, 2, timeout=60, args=(path,))
    single = ReaLModel.from_llama(path, init_critic_from_actor=True, seed=7).get_param("3.weight")
    assert all(torch.equal(h, single) for h in heads)
