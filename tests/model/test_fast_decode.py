"""The fused decoding step equals the general packed forward with a KV cache."""

import dataclasses

import pytest
import torch

from realhf.api.core.model_api import GenerationHyperparameters, ReaLModelConfig
from realhf.impl.model.nn import fast_decode
from realhf.impl.model.nn.fast_decode import FastDecoder, fast_decode_unsupported
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_generate import generate
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
from realhf.impl.ops import dispatch

LLAMA = ReaLModelConfig(n_layers=3, n_kv_heads=2, n_q_heads=4, hidden_dim=32, intermediate_dim=48, vocab_size=50,
                        head_dim=8, layer_norm_type="rms", mlp_type="llama", apply_rotary=True,
                        activation_function="silu", use_attention_bias=False, use_attn_proj_bias=False,
                        scale_attn_by_inverse_layer_idx=False, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-6)

VARIANTS = {
    "llama-gqa": LLAMA,
    "qwen2-biases": dataclasses.replace(LLAMA, use_attention_bias=True),
    "all-biases-mha-tied": dataclasses.replace(LLAMA, n_kv_heads=4, use_attention_bias=True,
                                               use_attn_proj_bias=True, mlp_bias=True, tied_embedding=True),
    "interleaved-scaled": dataclasses.replace(LLAMA, rotary_interleaved=True, rotary_scaling=2.0,
                                              rotary_scaling_type="linear", scale_attn_by_inverse_layer_idx=True),
    # head_dim not a multiple of 8: the native loop's scalar attention
    "head-dim-12": dataclasses.replace(LLAMA, hidden_dim=48, head_dim=12),
}


def _model(cfg: ReaLModelConfig, seed: int = 0) -> ReaLModel:
    model = ReaLModel(cfg).instantiate(init=False)
    model.init_weights(std=0.2, seed=seed)
    return model.eval()


@pytest.mark.parametrize("blocks", ["cpp", "python"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_steps_equal_general_forward(variant, blocks, monkeypatch):
    """Prefill, then decode steps in which rows drop out: logits and caches agree,
    with the block loop as one native call (``cpp``) and as torch operations."""
    reason = dispatch.unusable_reason("decode_blocks", blocks, "cpu")
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv(dispatch.ENV_VAR, blocks)
    cfg = VARIANTS[variant]
    model = _model(cfg)
    assert fast_decode_unsupported(model) is None
    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([5, 1, 9, 3])
    ids = torch.randint(0, cfg.vocab_size, (int(lens.sum()),), generator=g)
    caches = [model.allocate_kv_cache(4, 20) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(ids, cu_seqlens_from_lengths(lens), int(lens.max()), kv_cache=c)
    dec = FastDecoder(model, caches[1])
    assert (dec._native is not None) == (blocks == "cpp")
    for rows in ([0, 1, 2, 3], [0, 2, 3], [1, 3], [2], [0, 1, 2, 3]):
        rows = torch.tensor(rows)
        tok = torch.randint(0, cfg.vocab_size, (len(rows),), generator=g)
        feed = torch.zeros(4, dtype=torch.long)
        feed[rows] = 1
        with torch.no_grad():
            want = model(tok, cu_seqlens_from_lengths(feed), 1, kv_cache=caches[0])
        got = dec.step(tok, rows)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(caches[1].seqlens, caches[0].seqlens)
    for k0, k1 in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("greedy", [True, False])
def test_generate_same_with_either_path(monkeypatch, greedy):
    """Whole generations (EOS ends rows at different steps) agree token for token."""
    model = _model(VARIANTS["qwen2-biases"], seed=1)
    lens = torch.tensor([4, 2, 7, 1, 5])
    ids = torch.randint(0, 50, (int(lens.sum()),), generator=torch.Generator().manual_seed(0))
    cu = cu_seqlens_from_lengths(lens)
    gcfg = GenerationHyperparameters(max_new_tokens=16, min_new_tokens=0, greedy=greedy, top_k=20, top_p=0.9, temperature=0.8)

    def run(impl, eos):
        monkeypatch.setattr(fast_decode, "DECODE_IMPL", impl)
        return generate(model, ids, cu, gcfg, eos_token_id=eos, generator=torch.Generator().manual_seed(42))

    # EOS ids taken from an unstopped run, so that some rows stop early and others do not.
    free = run("eager", None).sequences
    eos = sorted({int(free[0][3]), int(free[2][9])})
    outs = {impl: run(impl, eos) for impl in ("eager", "fast")}
    a, b = outs["eager"], outs["fast"]
    assert torch.equal(a.gen_lengths, b.gen_lengths) and torch.equal(a.gen_tokens, b.gen_tokens)
    assert len(set(a.gen_lengths.tolist())) > 1, "the case must end rows at different steps"
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.no_eos, b.no_eos)
    assert (a.logits_mask is None) == (b.logits_mask is None)
    if a.logits_mask is not None:
        assert torch.equal(a.logits_mask, b.logits_mask)


def test_fast_path_is_used_on_cpu(monkeypatch):
    calls = []
    real_step = FastDecoder.step
    monkeypatch.setattr(FastDecoder, "step", lambda self, t, r: calls.append(len(t)) or real_step(self, t, r))
    model = _model(LLAMA)
    generate(model, torch.tensor([1, 2, 3]), torch.tensor([0, 3]),
             GenerationHyperparameters(max_new_tokens=5, min_new_tokens=5, greedy=True), eos_token_id=None)
    assert calls == [1, 1, 1, 1]


@pytest.mark.parametrize("change,reason", [
    (dict(layer_norm_type=None), "layer_norm_type"),
    (dict(mlp_type=None), "mlp_type"),
    (dict(qk_layernorm=True), "qk_layernorm"),
    (dict(sliding_window=4), "sliding window"),
    (dict(apply_rotary=False, n_positions=64), "rotary"),
    (dict(is_critic=True), "critic"),
])
def test_unsupported_models_keep_general_path(change, reason):
    model = _model(dataclasses.replace(LLAMA, **change))
    why = fast_decode_unsupported(model)
    assert why is not None and reason in why
    assert not fast_decode.use_fast_decode(model, torch.device("cpu"))
    with pytest.raises(ValueError, match=reason):
        FastDecoder(model, model.allocate_kv_cache(1, 4))


def test_dropout_in_training_mode_keeps_general_path():
    model = _model(dataclasses.replace(LLAMA, resid_pdrop=0.1)).train()
    assert "dropout" in fast_decode_unsupported(model)
    assert fast_decode_unsupported(model.eval()) is None


def test_pipeline_stage_not_served():
    stage = ReaLModel(LLAMA, pp_size=2, pp_rank=0).instantiate(init=False)
    assert "pipeline stage" in fast_decode_unsupported(stage)


def test_sample_categorical_distribution_and_zeros(monkeypatch):
    """Inverse-CDF draws follow the probabilities; zero-probability entries never appear."""
    from realhf.impl.model.nn import real_llm_generate
    from realhf.impl.model.nn.real_llm_generate import sample_categorical

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, g) for _ in range(20000)])
    freq = torch.bincount(draws[:, 0], minlength=6).float() / draws.shape[0]
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    assert bool((draws[:, 1] == 5).all())
    # A draw that rounding pushes past the row's total takes the last non-zero entry.
    monkeypatch.setattr(real_llm_generate.torch, "rand", lambda *a, **k: torch.full((1, 1), 1.0 + 1e-6))
    assert int(sample_categorical(torch.tensor([[0.0, 0.25, 0.25, 0.5, 0.0, 0.0]]))[0]) == 3


def test_native_transpose_cat_equals_torch():
    from realhf.impl.ops import native

    ext = native.load("decode_step")
    if ext is None:
        pytest.skip(native.import_error("decode_step"))
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(37, 45, generator=g), torch.randn(5, 45, generator=g), torch.randn(64, 45, generator=g)]
    assert torch.equal(ext.transpose_cat(mats), torch.cat(mats).t().contiguous())


@pytest.mark.parametrize("blocks", ["cpp", "python"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_equals_general_forward(variant, blocks, monkeypatch):
    """Whole prompts through the decoder's block loop: last-token logits and caches agree,
    also when the rows already hold a cached prefix."""
    reason = dispatch.unusable_reason("decode_blocks", blocks, "cpu")
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv(dispatch.ENV_VAR, blocks)
    cfg = VARIANTS[variant]
    model = _model(cfg, seed=2)
    g = torch.Generator().manual_seed(5)
    caches = [model.allocate_kv_cache(3, 24) for _ in range(2)]
    dec = FastDecoder(model, caches[1])
    for lens in (torch.tensor([4, 1, 7]), torch.tensor([2, 5, 1])):
        ids = torch.randint(0, cfg.vocab_size, (int(lens.sum()),), generator=g)
        cu = cu_seqlens_from_lengths(lens)
        with torch.no_grad():
            want = model(ids, cu, int(lens.max()), kv_cache=caches[0])[cu[1:] - 1]
        got = dec.prefill(ids, cu)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(caches[1].seqlens, caches[0].seqlens)
    for k0, k1 in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-5)


def test_native_loop_refuses_rows_outside_the_cache():
    from realhf.impl.ops import native

    ext = native.load("decode_step")
    if ext is None:
        pytest.skip(native.import_error("decode_step"))
    h, d = 8, 8
    block = [torch.ones(h), torch.zeros(h, 3 * d), torch.empty(0), torch.zeros(d, h), torch.empty(0),
             torch.ones(h), torch.zeros(h, 8), torch.empty(0), torch.zeros(4, h), torch.empty(0)]
    cache = torch.zeros(2, 4, 1, d)
    with pytest.raises(RuntimeError, match="outside a cache of 2 rows"):
        ext.decode_blocks(torch.zeros(1, h), block, [1e-6, 1e-6], [1.0], [], [cache], [cache.clone()],
                          torch.tensor([5]), torch.tensor([0]), torch.ones(1, d // 2), torch.zeros(1, d // 2),
                          1, 1, d, 4, False)


def test_back_to_back_weights_are_viewed_not_copied():
    from realhf.impl.model.nn.fast_decode import _rows_back_to_back

    flat = torch.randn(5 * 4 + 3 * 4 + 7)
    a, b = flat[:20].view(5, 4), flat[20:32].view(3, 4)
    view = _rows_back_to_back([a, b])
    assert view is not None and view.data_ptr() == a.data_ptr()
    assert torch.equal(view, torch.cat([a, b]))
    assert _rows_back_to_back([b, a]) is None  # out of order
    assert _rows_back_to_back([a, flat[21:33].view(3, 4)]) is None  # a gap
    assert _rows_back_to_back([a, b.clone()]) is None  # another storage
    assert _rows_back_to_back([a, flat[20:35].view(3, 5)]) is None  # another width


def _decode_ext():
    from realhf.impl.ops import native

    ext = native.load("decode_step")
    if ext is None:
        pytest.skip(native.import_error("decode_step"))
    return ext


def test_pack_panels_layout():
    """Stacked [out_i, in] matrices become [ceil(N / 24), in, 24]: panel p, row k, column c
    holds W[k, 24 p + c] of W = cat(mats).T, zeros past N."""
    ext = _decode_ext()
    a, b = torch.randn(20, 7), torch.randn(9, 7)
    got = ext.pack_panels([a, b])
    assert got.shape == (2, 7, 24)
    w = torch.cat([a, b]).t()  # [in, 29]
    flat = got.permute(1, 0, 2).reshape(7, 48)
    assert torch.equal(flat[:, :29], w)
    assert torch.equal(flat[:, 29:], torch.zeros(7, 19))
    with pytest.raises(RuntimeError, match="one in"):
        ext.pack_panels([a, torch.randn(3, 8)])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13, 16, 32, 70])
@pytest.mark.parametrize("n_out, width", [(6, 32), (7, 20), (24, 9), (25, 64), (128, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_torch(rows, n_out, width, bias):
    """The decoding steps' panel product: any row count (blocks of four and the rest), full
    and padded panels, widths not a multiple of 8, bias."""
    ext = _decode_ext()
    g = torch.Generator().manual_seed(rows * 1000 + n_out)
    x, w = torch.randn(rows, width, generator=g), torch.randn(n_out, width, generator=g)
    b = torch.randn(n_out, generator=g) if bias else torch.empty(0)
    got = ext.packed_linear(x, ext.pack_panels([w]), n_out, b)
    if got is None:
        pytest.skip("no AVX2 + FMA on this CPU: decoding steps use at::mm")
    # Sums of `width` products in another order: rounding grows with the width.
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b if bias else None), atol=1e-6 * width, rtol=1e-5)


def test_packed_linear_refuses_a_mismatched_weight():
    ext = _decode_ext()
    w = ext.pack_panels([torch.randn(30, 16)])
    with pytest.raises(RuntimeError, match=r"packed panels \[2, 8, 24\]"):
        ext.packed_linear(torch.randn(4, 8), w, 30, torch.empty(0))
    with pytest.raises(RuntimeError, match="bias of 3 for 30 outputs"):
        ext.packed_linear(torch.randn(4, 16), w, 30, torch.randn(3))


def test_decoder_is_freed_without_the_cyclic_collector():
    """A decoder holds weight copies and views of the model's parameters: it must go away when
    generation ends, not when the (frozen, rarely run) cyclic collector gets to it."""
    import gc
    import weakref

    model = _model(VARIANTS["llama-gqa"])
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        ref = weakref.ref(FastDecoder(model, model.allocate_kv_cache(2, 8)))
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("min_new", [0, 4])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_loop_equals_the_step_loop(variant, min_new, monkeypatch):
    """With plain sampling every step after the prefill runs in one native call
    (``decode_loop``): the same draws, tokens, log-probabilities, lengths and EOS flags as
    the Python loop of one native step at a time, bit for bit, with rows ending at EOS and
    EOS banned before ``min_new_tokens``."""
    if not fast_decode.panel_kernel_supported():
        pytest.skip("no AVX2 + FMA on this CPU: no native loop")
    cfg = VARIANTS[variant]
    model = _model(cfg, seed=2)
    lens = torch.tensor([3, 6, 1, 8, 2, 5])
    ids = torch.randint(0, cfg.vocab_size, (int(lens.sum()),), generator=torch.Generator().manual_seed(1))
    cu = cu_seqlens_from_lengths(lens)
    gcfg = GenerationHyperparameters(max_new_tokens=14, min_new_tokens=min_new, greedy=False,
                                     top_k=cfg.vocab_size, top_p=1.0, temperature=0.7)
    loops = []
    run_steps = FastDecoder.run_steps

    def spy(self, logits, state):
        loops.append(run_steps(self, logits, state))
        return loops[-1]

    def run(eos, native_loop):
        monkeypatch.setattr(FastDecoder, "run_steps", spy if native_loop else (lambda self, logits, state: None))
        return generate(model, ids, cu, gcfg, eos_token_id=eos, generator=torch.Generator().manual_seed(7))

    free = run(None, True).sequences
    eos = sorted({int(free[1][min_new + 2]), int(free[3][min_new + 5])})
    a, b = run(eos, True), run(eos, False)
    assert loops and all(n is not None for n in loops), "the native loop must have run"
    assert len(set(a.gen_lengths.tolist())) > 1, "the case must end rows at different steps"
    assert int(a.gen_lengths.min()) > min_new
    assert torch.equal(a.gen_lengths, b.gen_lengths) and torch.equal(a.gen_tokens, b.gen_tokens)
    assert torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.no_eos, b.no_eos)


@pytest.mark.parametrize("impl", ["eager", "fast"])
def test_generation_records_no_autograd_graph(impl, monkeypatch):
    """A trainable model (parameters requiring grad, grad mode on) generates without building a graph."""
    monkeypatch.setattr(fast_decode, "DECODE_IMPL", impl)
    model = _model(LLAMA)
    for p in model.parameters():
        p.requires_grad_(True)
    assert torch.is_grad_enabled()
    out = generate(model, torch.tensor([1, 2, 3, 4, 5, 6]), cu_seqlens_from_lengths(torch.tensor([4, 2])),
                   GenerationHyperparameters(max_new_tokens=3, min_new_tokens=0), None)
    assert out.logprobs.numel() > 0 and not out.logprobs.requires_grad
