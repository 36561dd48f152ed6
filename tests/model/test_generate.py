"""Generation over packed prompts, checked against Hugging Face and recomputation."""

import dataclasses
import importlib

import pytest
import torch
import transformers

from _reference_lm import LogitBiasLM, ReferenceLM, tiny_llama_config
from realhf.api.core.model_api import GenerationHyperparameters
from realhf.impl.model.nn.real_llm_generate import GenerationOutput, generate
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

VOCAB = 96
PROMPT_LENS = [3, 7, 1, 5]


def _gconfig(**kw) -> GenerationHyperparameters:
    base = dict(max_new_tokens=12, min_new_tokens=0, greedy=False, top_p=1.0, top_k=VOCAB, temperature=1.0)
    base.update(kw)
    return GenerationHyperparameters(**base)


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()


def _real_model_from_hf(hf: transformers.LlamaForCausalLM) -> torch.nn.Module:
    """The same weights in a ReaLModel (real KV cache), via the llama converters."""
    from realhf.api.from_hf.llama import LLAMA
    from realhf.impl.model.nn.real_llm_api import ReaLModel

    cfg = LLAMA.config_from_hf(hf.config)
    model = ReaLModel(cfg).instantiate(init=False)
    model.load_state_dict(LLAMA.sd_from_hf(hf.state_dict(), cfg))
    return model.eval()


def _real_model_unavailable() -> str | None:
    try:
        for name in ("realhf.api.from_hf.llama", "realhf.impl.model.nn.real_llm_api"):
            importlib.import_module(name)
    except Exception as e:  # any import-time failure means the backend cannot run
        return f"{type(e).__name__}: {e}"
    return None


_REAL_SKIP = _real_model_unavailable()
_REAL_CACHE: dict[int, torch.nn.Module] = {}


def _wrap(hf: transformers.LlamaForCausalLM, backend: str) -> torch.nn.Module:
    if backend == "reference":
        return ReferenceLM(hf)
    if backend == "real":
        if id(hf) not in _REAL_CACHE:
            _REAL_CACHE[id(hf)] = _real_model_from_hf(hf)
        return _REAL_CACHE[id(hf)]
    raise AssertionError(backend)


BACKENDS = [
    "reference",
    pytest.param("real", marks=pytest.mark.skipif(_REAL_SKIP is not None, reason=f"ReaLModel: {_REAL_SKIP}")),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (sum(PROMPT_LENS),), generator=g)
    cu = torch.tensor([0] + torch.tensor(PROMPT_LENS).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


def _split(ids: torch.Tensor, cu: torch.Tensor) -> list[torch.Tensor]:
    return [ids[int(cu[i]):int(cu[i + 1])] for i in range(len(cu) - 1)]


def _hf_greedy(hf, prompt: torch.Tensor, max_new: int, eos, min_new: int = 0) -> torch.Tensor:
    out = hf.generate(
        prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=max_new, min_new_tokens=min_new, eos_token_id=eos, pad_token_id=0,
    )
    return out[0, len(prompt):]


def _pick_emitted_eos(hf, prompts_list, max_new: int) -> int:
    """A token that greedy decoding emits mid-answer for some prompts, to act as EOS."""
    counts: dict[int, int] = {}
    for p in prompts_list:
        seen = set(_hf_greedy(hf, p, max_new, eos=None)[1:max_new - 2].tolist())
        for t in seen:
            counts[t] = counts.get(t, 0) + 1
    # Prefer a token that ends some but not all rows, so both cases occur.
    ranked = sorted(counts, key=lambda t: (counts[t] == len(prompts_list), -counts[t]))
    return ranked[0]


# ---------------------------------------------------------------- greedy vs HF


@pytest.mark.parametrize("min_new", [0, 4])
def test_greedy_matches_hf_generate(hf_model, backend, prompts, min_new):
    ids, cu = prompts
    plist = _split(ids, cu)
    max_new = 12
    eos = _pick_emitted_eos(hf_model, plist, max_new)
    model = _wrap(hf_model, backend)
    out = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=max_new, min_new_tokens=min_new),
                   eos_token_id=eos, pad_token_id=0)
    n_eos = 0
    for i, p in enumerate(plist):
        ref = _hf_greedy(hf_model, p, max_new, eos=eos, min_new=min_new)
        ref = ref[: (ref == eos).nonzero()[0, 0] + 1] if (ref == eos).any() else ref  # drop HF's padding
        got = out.sequences[i]
        assert got.tolist() == ref.tolist(), f"row {i}"
        ended = bool((got == eos).any())
        n_eos += ended
        assert bool(out.no_eos[i]) == (not ended)
        assert ended or len(got) == max_new
        assert not bool((got[:min_new] == eos).any())
    if min_new == 0:
        assert 1 <= n_eos < len(plist), "the chosen EOS should end some rows but not all"
    assert out.logits_mask is None


def test_decode_calls_follow_contract(hf_model, prompts):
    """One prefill call with all prompts, then one token per unfinished row."""
    ids, cu = prompts
    model = ReferenceLM(hf_model)
    plist = _split(ids, cu)
    eos = _pick_emitted_eos(hf_model, plist, 10)
    out = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=10), eos_token_id=eos)
    assert model.calls[0] == PROMPT_LENS
    gen_lens = out.gen_lengths.tolist()
    for step, lens in enumerate(model.calls[1:], start=1):
        assert lens == [1 if g > step else 0 for g in gen_lens]
    assert len(model.calls) - 1 == max(gen_lens) - 1


# ---------------------------------------------------------------- sampling


def test_sampling_reproducible_and_seed_dependent(hf_model, backend, prompts):
    ids, cu = prompts
    model = _wrap(hf_model, backend)
    cfg = _gconfig(temperature=1.3, top_k=40, top_p=0.95, max_new_tokens=10)

    def run(seed: int) -> GenerationOutput:
        return generate(model, ids, cu, cfg, eos_token_id=2, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.gen_tokens, b.gen_tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.logits_mask, b.logits_mask)
    assert not (a.gen_lengths.tolist() == c.gen_lengths.tolist() and torch.equal(a.gen_tokens, c.gen_tokens))


def _recompute_logprobs(model, out: GenerationOutput, ids, cu, cfg: GenerationHyperparameters, eos: int):
    """Behaviour log-probs recomputed by one forward pass over prompt + answer."""
    batch = out.packed_ppo_inputs(ids, cu)
    logits = model(batch.packed_input_ids, batch.cu_seqlens, int((batch.cu_seqlens.diff()).max())).float()
    if not cfg.greedy:
        logits = logits / cfg.temperature
    if batch.packed_logits_mask is not None:
        logits = logits.masked_fill(~batch.packed_logits_mask, float("-inf"))
    # EOS is forbidden at rows predicting one of the first min_new_tokens answer tokens.
    plens = cu.diff().long().tolist()
    for i, (start, p) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), plens)):
        for j in range(min(cfg.min_new_tokens, int(out.gen_lengths[i]))):
            logits[start + p - 1 + j, eos] = float("-inf")
    lp = gather_packed_shifted_log_probs(logits, batch.cu_seqlens, batch.packed_input_ids)
    answer_pos = ~batch.prompt_mask
    # Entry t of a sequence predicts token t + 1: drop each sequence's first token.
    keep = torch.cat([answer_pos[int(s) + 1:int(e)] for s, e in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])])
    return lp, keep, batch


@pytest.mark.parametrize(
    "kw",
    [
        dict(greedy=True, min_new_tokens=3),
        dict(temperature=0.7, top_k=15, top_p=1.0),
        dict(temperature=1.2, top_k=VOCAB, top_p=0.8, min_new_tokens=2),
        dict(temperature=0.9, top_k=30, top_p=0.9, min_new_tokens=5),
    ],
)
def test_logprobs_match_recomputation(hf_model, backend, prompts, kw):
    ids, cu = prompts
    model = _wrap(hf_model, backend)
    cfg = _gconfig(max_new_tokens=10, **kw)
    eos = 2
    out = generate(model, ids, cu, cfg, eos_token_id=eos, generator=torch.Generator().manual_seed(3))
    lp, keep, batch = _recompute_logprobs(model, out, ids, cu, cfg, eos)
    assert batch.packed_logprobs.shape == lp.shape
    torch.testing.assert_close(lp[keep], out.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.packed_logprobs[keep], out.logprobs)
    assert (batch.packed_logprobs[~keep] == 0).all()
    assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()


# ---------------------------------------------------------------- stopping


def _eos_biased(hf_model, backend, eos: int, bias: float = 30.0) -> torch.nn.Module:
    b = torch.zeros(VOCAB)
    b[eos] = bias
    return LogitBiasLM(_wrap(hf_model, backend), b)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("min_new", [0, 1, 4])
def test_min_new_tokens_honoured(hf_model, backend, prompts, greedy, min_new):
    ids, cu = prompts
    eos = 7
    model = _eos_biased(hf_model, backend, eos)
    cfg = _gconfig(greedy=greedy, max_new_tokens=8, min_new_tokens=min_new, top_k=20, top_p=0.9)
    out = generate(model, ids, cu, cfg, eos_token_id=eos, generator=torch.Generator().manual_seed(0))
    for seq in out.sequences:
        # EOS dominates once allowed, so every row ends right after min_new tokens.
        assert len(seq) == min_new + 1 and int(seq[-1]) == eos
        assert not bool((seq[:min_new] == eos).any())
    assert not out.no_eos.any()


def test_no_eos_flags(hf_model, backend, prompts):
    ids, cu = prompts
    plist = _split(ids, cu)
    greedy = [_hf_greedy(hf_model, p, 10, eos=None).tolist() for p in plist]
    # Choose EOS and max_new_tokens so that some row emits EOS exactly at its last
    # allowed step: it stops at max_new_tokens but saw EOS, so it is not flagged.
    row, max_new = next(
        (i, n) for n in range(4, 11) for i, g in enumerate(greedy) if g[n - 1] not in g[: n - 1]
    )
    eos = greedy[row][max_new - 1]
    model = _wrap(hf_model, backend)
    out = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=max_new), eos_token_id=eos)
    assert int(out.gen_lengths[row]) == max_new and not bool(out.no_eos[row])
    for i, seq in enumerate(out.sequences):
        assert bool(out.no_eos[i]) == (eos not in seq.tolist())
        if out.no_eos[i]:
            assert len(seq) == max_new
    none_eos = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=max_new), eos_token_id=None)
    assert none_eos.no_eos.all() and (none_eos.gen_lengths == max_new).all()


# ---------------------------------------------------------------- logits mask


@pytest.mark.parametrize("top_k", [1, 5, 17])
def test_logits_mask_top_k_counts(hf_model, backend, prompts, top_k):
    ids, cu = prompts
    model = _wrap(hf_model, backend)
    out = generate(model, ids, cu, _gconfig(top_k=top_k, top_p=1.0, max_new_tokens=7), eos_token_id=2,
                   generator=torch.Generator().manual_seed(top_k))
    assert out.logits_mask is not None
    assert out.logits_mask.shape == (int(out.gen_lengths.sum()), VOCAB)
    assert (out.logits_mask.sum(-1) == top_k).all()
    # Every sampled token was allowed by its own mask.
    assert out.logits_mask[torch.arange(len(out.gen_tokens)), out.gen_tokens].all()
    if top_k == 1:  # top-1 sampling is greedy decoding
        greedy = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=7), eos_token_id=2)
        assert torch.equal(out.gen_tokens, greedy.gen_tokens)


def test_logits_mask_absent_when_nothing_removed(hf_model, prompts):
    ids, cu = prompts
    model = ReferenceLM(hf_model)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    full = generate(model, ids, cu, _gconfig(top_k=VOCAB + 5, top_p=1.0), eos_token_id=2, generator=g())
    assert full.logits_mask is None
    forced = generate(model, ids, cu, _gconfig(top_k=5, force_no_logits_mask=True), eos_token_id=2, generator=g())
    assert forced.logits_mask is None
    nucleus = generate(model, ids, cu, _gconfig(top_p=0.5), eos_token_id=2, generator=g())
    assert nucleus.logits_mask is not None and (nucleus.logits_mask.sum(-1) >= 1).all()


# ---------------------------------------------------------------- output layouts


def test_output_layouts(hf_model, prompts):
    ids, cu = prompts
    out = generate(ReferenceLM(hf_model), ids, cu, _gconfig(top_k=10, max_new_tokens=5), eos_token_id=2,
                   generator=torch.Generator().manual_seed(9))
    tokens, lps, attn = out.to_padded(pad_token_id=0)
    assert tokens.shape == (len(PROMPT_LENS), int(out.gen_lengths.max()))
    for i, seq in enumerate(out.sequences):
        n = len(seq)
        assert tokens[i, :n].tolist() == seq.tolist() and (tokens[i, n:] == 0).all()
        assert attn[i].sum() == n and torch.equal(lps[i, :n], out.logprobs_per_row[i])
    batch = out.packed_ppo_inputs(ids, cu)
    plist = _split(ids, cu)
    seqs = _split(batch.packed_input_ids, batch.cu_seqlens)
    for i, s in enumerate(seqs):
        assert s.tolist() == plist[i].tolist() + out.sequences[i].tolist()
    assert int(batch.prompt_mask.sum()) == sum(PROMPT_LENS)
    assert batch.packed_logprobs.shape == (len(batch.packed_input_ids) - len(PROMPT_LENS),)
    assert batch.packed_logits_mask.shape == (len(batch.packed_input_ids), VOCAB)
    assert torch.equal(batch.seq_no_eos_mask, out.no_eos)


def test_single_step_and_single_row(hf_model, backend, prompts):
    """max_new_tokens=1 needs no decoding call; bs=1 equals that row of a batch."""
    ids, cu = prompts
    model = _wrap(hf_model, backend)
    one = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=1), eos_token_id=None)
    assert (one.gen_lengths == 1).all() and one.no_eos.all()
    batch = generate(model, ids, cu, _gconfig(greedy=True, max_new_tokens=6), eos_token_id=None)
    for i, p in enumerate(_split(ids, cu)):
        alone = generate(model, p, torch.tensor([0, len(p)]), _gconfig(greedy=True, max_new_tokens=6),
                         eos_token_id=None)
        assert alone.sequences[0].tolist() == batch.sequences[i].tolist()
        assert int(one.gen_tokens[i]) == int(batch.sequences[i][0])
        torch.testing.assert_close(alone.logprobs, batch.logprobs_per_row[i], atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs(hf_model):
    model = ReferenceLM(hf_model)
    with pytest.raises(ValueError):
        generate(model, torch.tensor([5, 6]), torch.tensor([0, 0, 2]), _gconfig(), eos_token_id=2)
    with pytest.raises(ValueError):
        generate(model, torch.tensor([5, 6]), torch.tensor([0, 2]), _gconfig(), eos_token_id=VOCAB)
    critic = ReferenceLM(hf_model)
    critic.config = dataclasses.replace(critic.config, is_critic=True)
    with pytest.raises(ValueError):
        generate(critic, torch.tensor([5, 6]), torch.tensor([0, 2]), _gconfig(), eos_token_id=2)


# ---------------------------------------------------------------- repeated prompts


@pytest.mark.parametrize("greedy", [True, False])
def test_repeated_prompts_prefilled_once(hf_model, backend, prompts, greedy, monkeypatch):
    """A group of identical prompts is prefilled once and decodes as if each row had its own prefill."""
    from realhf.impl.model.nn import real_llm_generate

    ids, cu = prompts
    plist = _split(ids, cu)
    rows = [0, 0, 0, 1, 2, 2, 3, 0]  # runs of repeats, and a repeat that is not consecutive
    rep = torch.cat([plist[i] for i in rows])
    rep_cu = torch.tensor([0] + [len(plist[i]) for i in rows]).cumsum(0)
    model = _wrap(hf_model, backend)
    cfg = _gconfig(greedy=greedy, max_new_tokens=9, temperature=1.2)

    sizes = []
    allocate = real_llm_generate._allocate_cache

    def run(dedup: bool):
        with monkeypatch.context() as m:
            m.setattr(real_llm_generate, "_allocate_cache", lambda mdl, bs, *a: sizes.append(bs) or allocate(mdl, bs, *a))
            if not dedup:
                m.setattr(real_llm_generate, "repeated_rows", lambda *a: None)
            return generate(model, rep, rep_cu, cfg, eos_token_id=2, generator=torch.Generator().manual_seed(7))

    got = run(True)
    # ReaLModel's cache: one prefill of the 5 runs; the reference model's own cache layout cannot copy rows.
    assert sizes == ([5] if backend == "real" else [5, 8])
    want = run(False)
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in want.sequences]
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.no_eos, want.no_eos)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("min_new", [0, 3])
def test_native_sampler_draws_what_the_torch_sampler_draws(temperature, min_new, monkeypatch):
    """Plain sampling runs in one native pass per row: the same tokens as softmax + inverse-CDF
    draw from the same uniforms (EOS banned before min_new_tokens), log-probs to float rounding."""
    from realhf.impl.model.nn import real_llm_generate as G
    from realhf.impl.ops import native

    if native.load("decode_step") is None:
        pytest.skip(native.import_error("decode_step"))
    g = torch.Generator().manual_seed(11)
    steps = [torch.randn(6, 300, generator=g) * 4 for _ in range(5)]
    steps[0][:, 7] = 50.0  # EOS would win every draw unless banned
    gconfig = GenerationHyperparameters(max_new_tokens=5, min_new_tokens=min_new, temperature=temperature,
                                        top_k=10**6, top_p=1.0)
    runs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(G.DecodeState, "_native_sampler", lambda self: None)
        state = G.DecodeState(6, gconfig, [7], torch.device("cpu"), generator=torch.Generator().manual_seed(3))
        for lg in steps:
            if state.step(lg[state.active]) is None:
                break
        assert (state._sampler is not None) == fused  # the native pass ran
        runs[fused] = state.output()
    a, b = runs[True], runs[False]
    assert torch.equal(a.gen_tokens, b.gen_tokens) and torch.equal(a.gen_lengths, b.gen_lengths)
    assert torch.equal(a.no_eos, b.no_eos)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    if min_new:
        assert not bool((a.gen_tokens.view(6, -1)[:, 0] == 7).any())
    else:
        assert bool((a.gen_lengths == 1).all())  # EOS drawn at once everywhere


@pytest.mark.parametrize("greedy", [True, False])
def test_panel_decoding_equals_the_matmul_decoding(hf_model, prompts, greedy, monkeypatch):
    """With the panel products (AVX2 + FMA) the decoder packs its weights once and makes no
    [in, out] copies; tokens and log-probs equal the decoder that multiplies with at::mm."""
    from realhf.impl.model.nn import fast_decode

    if _real_model_unavailable() or not fast_decode.panel_kernel_supported():
        pytest.skip("needs ReaLModel and the native panel products")
    ids, cu = prompts
    model = _wrap(hf_model, "real")
    cfg = _gconfig(greedy=greedy, max_new_tokens=7, temperature=0.9)
    built = []
    init = fast_decode.FastDecoder.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(fast_decode.FastDecoder, "__init__", spy)
    got = generate(model, ids, cu, cfg, eos_token_id=2, generator=torch.Generator().manual_seed(5))
    dec = built[-1]
    assert dec.head_panels is not None and all(b.panels is not None for b in dec.blocks)
    assert all(b.qkv_w is None and b.gu_w is None for b in dec.blocks)
    monkeypatch.setattr(fast_decode, "panel_kernel_supported", lambda: False)
    want = generate(model, ids, cu, cfg, eos_token_id=2, generator=torch.Generator().manual_seed(5))
    dec = built[-1]
    assert dec.head_panels is None and all(b.panels is None and b.qkv_w is not None for b in dec.blocks)
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in want.sequences]
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
