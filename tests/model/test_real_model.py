"""ReaLModel internals: flat parameter buffer, pipeline stages, critic head, KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.model_api import ReaLModelConfig, get_hf_family
from realhf.impl.model.modules import attention as attn_mod
from realhf.impl.model.modules.rotary import apply_rotary, rotary_cos_sin, rotary_inv_freq
from realhf.impl.model.nn.flat_param import build_param_spec, get_intervals, param_intervals, set_intervals
from realhf.impl.model.nn.kv_cache import KVCache
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_base import partition_layers

LENGTHS = [1, 5, 17, 9]


def _config(family: str, **overrides) -> ReaLModelConfig:
    return dataclasses.replace(get_hf_family(family).real_config_maker(), **overrides)


CONFIGS = {
    "llama": lambda: _config("llama"),
    "llama_tied_interleaved": lambda: _config("llama", tied_embedding=True, rotary_interleaved=True),
    "mistral_window": lambda: _config("mistral", sliding_window=4),
    "qwen3": lambda: _config("qwen3"),
    "gpt2": lambda: _config("gpt2"),
    "gemma": lambda: _config("gemma"),
    "mixtral": lambda: _config("mixtral"),
}


def _model(name: str, seed: int = 0, **kwargs) -> ReaLModel:
    torch.manual_seed(seed)
    model = ReaLModel(CONFIGS[name](), **kwargs).instantiate()
    model.init_weights(std=0.2, seed=seed)
    return model.eval()


def _packed(vocab: int, lengths=LENGTHS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + list(lengths)).cumsum(0)
    return ids, cu


def _check_flat(model: ReaLModel):
    flat = model.flat_param
    base, itemsize = flat.data_ptr(), flat.element_size()
    seen = {}
    for key, slot in model.param_spec.items():
        p = model.get_param(key)
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), key
        assert p.data_ptr() == base + slot.start * itemsize, key
        assert p.numel() == slot.numel and tuple(p.shape) == slot.shape
        seen.setdefault((slot.start, slot.end), []).append(key)
    intervals = sorted(seen)
    assert intervals[0][0] == 0 and intervals[-1][1] == model.flat_size
    for (s0, e0), (s1, e1) in zip(intervals, intervals[1:]):
        assert e0 == s1  # no overlap and no hole
    # Only a tied embedding/head pair may share a slot.
    shared = [keys for keys in seen.values() if len(keys) > 1]
    if model.tied_on_stage:
        assert shared == [["0.wte.weight", f"{model.config.n_layers + 1}.weight"]]
    else:
        assert shared == []
    # Module parameters are exactly the spec's views.
    assert {p.data_ptr() for p in model.parameters()} == {model.get_param(k).data_ptr() for k in model.param_spec}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flat_buffer_views(name):
    model = ReaLModel(CONFIGS[name]())
    assert model.flat_param is None and all(p.is_meta for p in model.parameters())
    model.instantiate()
    _check_flat(model)
    for rank in range(2):
        _check_flat(ReaLModel(CONFIGS[name](), pp_size=2, pp_rank=rank).instantiate())
    # Writing through the buffer is visible in the parameters.
    model.flat_param.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())


def test_flat_spec_order_buckets_and_intervals():
    config = CONFIGS["llama"]()
    spec, total = build_param_spec(config, [0, 1, 2, 3])
    keys = list(spec)
    assert keys[0].startswith("3.") and keys[-1] == "0.wte.weight"  # reverse layer order
    spec2, total2 = build_param_spec(config, [0, 1, 2, 3], bucket_size=1000, pad_multiple=64)
    assert total2 % 64 == 0 and total2 >= total
    starts = sorted((s.start, s.end) for s in spec2.values())
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(starts, starts[1:]))
    model = _model("llama")
    iv = param_intervals(model.param_spec, ["1.attn.c_proj.weight", "1.mlp.ln.weight"])
    data = get_intervals(model.flat_param, iv)
    before = model.get_param("1.mlp.ln.weight").clone()
    set_intervals(model.flat_param, iv, data * 2)
    assert torch.equal(model.get_param("1.mlp.ln.weight"), before * 2)


def test_partition_balanced():
    config = _config("llama", n_layers=6)
    for pp in (1, 2, 3, 4):
        stages = partition_layers(config, pp)
        assert [i for s in stages for i in s] == list(range(config.n_layers + 2))
        assert all(stages)
    # Embedding and head are counted as layers: with a large vocab they get stages of their own.
    big_vocab = _config("llama", n_layers=4, vocab_size=4096)
    stages = partition_layers(big_vocab, 3)
    assert stages[0] == [0] and stages[-1] == [big_vocab.n_layers + 1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_pipeline_stages_equal_whole_model(name):
    whole = _model(name)
    ids, cu = _packed(whole.config.vocab_size)
    ref = whole(ids, cu, max(LENGTHS))
    sd = whole.state_dict()
    x = None
    for rank in range(2):
        stage = ReaLModel(whole.config, pp_size=2, pp_rank=rank).instantiate(init=False).eval()
        stage.load_state_dict({k: v for k, v in sd.items() if k in stage.param_spec})
        x = stage(ids, cu, max(LENGTHS)) if rank == 0 else stage(None, cu, max(LENGTHS), hidden_states=x)
        if rank == 0:
            assert x.shape == (sum(LENGTHS), whole.config.hidden_dim)
    assert (x - ref).abs().max().item() <= 1e-5
    # An explicit middle stage: blocks only, hidden states in and out.
    mid = ReaLModel(whole.config, layer_indices=[1]).instantiate(init=False).eval()
    mid.load_state_dict({k: v for k, v in sd.items() if k in mid.param_spec})
    assert mid(None, cu, max(LENGTHS), hidden_states=torch.randn(sum(LENGTHS), whole.config.hidden_dim)).shape == (
        sum(LENGTHS), whole.config.hidden_dim)


@torch.no_grad()
def test_critic_head():
    config = _config("llama", is_critic=True)
    model = ReaLModel(config).instantiate().eval()
    ids, cu = _packed(config.vocab_size)
    values = model(ids, cu, max(LENGTHS))
    assert values.shape == (sum(LENGTHS),)
    assert model.get_param(f"{config.n_layers + 1}.weight").shape == (1, config.hidden_dim)
    with pytest.raises(ValueError):
        _config("llama", is_critic=True, tied_embedding=True)


@pytest.mark.parametrize("impl", ["native", "loop", "block_diag", "padded", "auto"])
@pytest.mark.parametrize("name", ["llama", "mistral_window"])
@torch.no_grad()
def test_attention_kernels_agree(impl, name, monkeypatch):
    model = _model(name)
    ids, cu = _packed(model.config.vocab_size, [3, 0, 17, 9, 1])
    monkeypatch.setattr(attn_mod, "ATTN_IMPL", "loop")
    ref = model(ids, cu, 17)
    monkeypatch.setattr(attn_mod, "ATTN_IMPL", impl)
    assert (model(ids, cu, 17) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lengths", [[12, 9, 15, 11], [3, 0, 17, 9, 1]])
def test_padded_attention_gradients_match_per_sequence(lengths):
    """Forward and backward of the padded-grid kernel equal one call per sequence
    (also with an empty sequence, whose grid row is all padding)."""
    cu = torch.tensor([0] + lengths).cumsum(0)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ctx = attn_mod.PackedContext(cu_seqlens=cu, max_seqlen=max(lengths), seqlens=torch.tensor(lengths),
                                 positions=torch.arange(int(cu[-1])) - cu[seq_ids], seq_ids=seq_ids)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(int(cu[-1]), h, 16, generator=gen) for h in (4, 2, 2)]
    grads = {}
    for kernel in (attn_mod._attn_loop, attn_mod._attn_padded):
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = kernel(q, k, v, ctx, 0.25, 5)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[kernel] = [out.detach(), q.grad, k.grad, v.grad]
    for a, b in zip(grads[attn_mod._attn_loop], grads[attn_mod._attn_padded]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_interleaved_rotary_is_a_permutation_of_half_rotation():
    d = 8
    x = torch.randn(5, 2, d)
    cos, sin = rotary_cos_sin(torch.arange(5), rotary_inv_freq(d, 10000.0))
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # (2i, 2i+1) -> (i, i + d/2)
    inter = apply_rotary(x, cos, sin, interleaved=True)
    half = apply_rotary(x[..., perm], cos, sin, interleaved=False)
    assert torch.allclose(inter[..., perm], half, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(name):
    model = _model(name)
    vocab = model.config.vocab_size
    prompts = [3, 0, 6, 1]
    gen = [4, 6, 2, 5]  # rows stop at different steps (length 0 afterwards)
    total = [p + g for p, g in zip(prompts, gen)]
    ids, cu_full = _packed(vocab, total, seed=3)
    seqs = [ids[s:e] for s, e in zip(cu_full[:-1].tolist(), cu_full[1:].tolist())]
    ref = model(ids, cu_full, max(total))
    ref_seqs = [ref[s:e] for s, e in zip(cu_full[:-1].tolist(), cu_full[1:].tolist())]

    cache = KVCache.allocate(model.config, len(prompts), capacity=max(total) + 2, dtype=torch.float32, device="cpu")
    got = [[] for _ in prompts]
    # Prefill whole prompts (a row with an empty prompt appends nothing).
    cu = torch.tensor([0] + prompts).cumsum(0)
    out = model(torch.cat([s[:p] for s, p in zip(seqs, prompts)]), cu, max(prompts), kv_cache=cache)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        got[i].append(out[s:e])
    assert cache.seqlens.tolist() == prompts
    # Then one token per row and step; finished rows pass length 0.
    for step in range(max(gen)):
        lens = [1 if step < g else 0 for g in gen]
        tokens = [seqs[i][prompts[i] + step : prompts[i] + step + 1] for i in range(len(prompts)) if lens[i]]
        cu = torch.tensor([0] + lens).cumsum(0)
        out = model(torch.cat(tokens), cu, 1, kv_cache=cache)
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            got[i].append(out[s:e])
    assert cache.seqlens.tolist() == total
    for i in range(len(prompts)):
        diff = (torch.cat(got[i]) - ref_seqs[i]).abs().max().item()
        assert diff <= 1e-5, (i, diff)


@torch.no_grad()
def test_kv_cache_per_stage():
    whole = _model("llama")
    ids, cu = _packed(whole.config.vocab_size, [4, 7])
    ref = whole(ids, cu, 7)
    sd = whole.state_dict()
    stages = []
    for rank in range(2):
        st = ReaLModel(whole.config, pp_size=2, pp_rank=rank).instantiate(init=False).eval()
        st.load_state_dict({k: v for k, v in sd.items() if k in st.param_spec})
        stages.append((st, st.allocate_kv_cache(2, 16)))
    outs = []
    for lens, sl in (([3, 5], [slice(0, 3), slice(4, 9)]), ([1, 2], [slice(3, 4), slice(9, 11)])):
        x = torch.cat([ids[s] for s in sl])
        c = torch.tensor([0] + lens).cumsum(0)
        h = stages[0][0](x, c, max(lens), kv_cache=stages[0][1])
        outs.append(stages[1][0](None, c, max(lens), kv_cache=stages[1][1], hidden_states=h))
    got = torch.cat([outs[0][:3], outs[1][:1], outs[0][3:], outs[1][1:]])
    assert (got - ref).abs().max().item() <= 1e-5


def test_kv_cache_checks():
    model = _model("llama")
    cache = model.allocate_kv_cache(2, 4)
    assert len(cache.k) == model.config.n_layers and cache.k[0].shape == (2, 4, 2, 8)
    ids, cu = _packed(model.config.vocab_size, [3, 5])
    with pytest.raises(ValueError):
        model(ids, cu, 5, kv_cache=cache)  # capacity exceeded
    with pytest.raises(ValueError):
        model(ids[:3], torch.tensor([0, 3]), 3, kv_cache=cache)  # batch size mismatch


def test_training_mode_gradients_and_moe_aux_loss():
    model = _model("mixtral")
    model.train()
    ids, cu = _packed(model.config.vocab_size)
    logits = model(ids, cu, max(LENGTHS))
    aux = sum(layer.mlp.aux_loss for layer in model.layers[1:-1])
    assert aux.item() > 0
    (logits.float().logsumexp(-1).mean() + aux).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.get_param("1.mlp.router.weight").grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_random_init_is_the_same_in_every_layout(family):
    # An actor and its reference initialized from scratch on different meshes must agree.
    from realhf.impl.model.nn.tp_partition import partition_tensor

    config = dataclasses.replace(get_hf_family(family).real_config_maker(), n_layers=3)
    whole = ReaLModel(config, tp_size=1, tp_rank=0).instantiate(init=False)
    whole.init_weights(seed=7)
    full = whole.state_dict()
    for pp_size, pp_rank, tp_size, tp_rank in [(2, 1, 1, 0), (1, 0, 2, 1), (2, 0, 2, 0)]:
        part = ReaLModel(config, pp_size=pp_size, pp_rank=pp_rank, tp_size=tp_size, tp_rank=tp_rank)
        part.instantiate(init=False)
        part.init_weights(seed=7)
        for key, value in part.state_dict().items():
            assert torch.equal(value, partition_tensor(key, full[key], config, tp_size, tp_rank)), key
    other = ReaLModel(config, tp_size=1, tp_rank=0).instantiate(init=False)
    other.init_weights(seed=8)
    assert not torch.equal(other.state_dict()["1.attn.c_attn.q_attn.weight"], full["1.attn.c_attn.q_attn.weight"])
