"""Decoding on several threads (``cpu_threads``) computes exactly what one thread computes."""

import multiprocessing as mp

import pytest
import torch

from realhf.api.core.model_api import GenerationHyperparameters, ReaLModelConfig
from realhf.base import cpu_threads
from realhf.impl.model.nn.fast_decode import FastDecoder, panel_kernel_supported
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_generate import generate
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
from realhf.impl.ops import native

# Widths that give several panels of 24 columns, one of them padded, so threads split them unevenly.
CFG = ReaLModelConfig(n_layers=3, n_kv_heads=2, n_q_heads=4, hidden_dim=64, intermediate_dim=100, vocab_size=131,
                      head_dim=16, layer_norm_type="rms", mlp_type="llama", apply_rotary=True,
                      activation_function="silu", use_attention_bias=True, use_attn_proj_bias=False,
                      scale_attn_by_inverse_layer_idx=False, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
                      layer_norm_epsilon=1e-6)


def _ext():
    ext = native.load("decode_step")
    if ext is None:
        pytest.skip(native.import_error("decode_step"))
    if not panel_kernel_supported():
        pytest.skip("no AVX2 + FMA on this CPU: decoding steps use at::mm on one thread")
    return ext


def _model(seed: int = 0) -> ReaLModel:
    model = ReaLModel(CFG).instantiate(init=False)
    model.init_weights(std=0.2, seed=seed)
    return model.eval()


@pytest.mark.parametrize("threads", [2, 3, 7])
@pytest.mark.parametrize("rows, n_out", [(1, 24), (5, 25), (16, 100), (33, 7)])
def test_panel_products_identical_on_any_thread_count(threads, rows, n_out):
    """Threads take ranges of panels (output columns): every output is the same sum, bit for bit,
    including more threads than panels and the padded last panel."""
    ext = _ext()
    g = torch.Generator().manual_seed(rows + n_out)
    x, w, b = torch.randn(rows, 40, generator=g), torch.randn(n_out, 40, generator=g), torch.randn(n_out, generator=g)
    one = ext.pack_panels([w])
    assert torch.equal(ext.pack_panels([w], threads), one)
    want = ext.packed_linear(x, one, n_out, b)
    assert torch.equal(ext.packed_linear(x, one, n_out, b, threads), want)


@pytest.mark.parametrize("threads", [2, 3])
def test_generate_identical_with_threads(threads):
    """A whole sampled generation (prefill, steps in which rows end at EOS, the head) gives the
    same tokens and log-probabilities with the running call's cpu_threads."""
    _ext()
    model = _model(seed=1)
    lens = torch.tensor([4, 2, 7, 1, 5, 9, 3])
    ids = torch.randint(0, CFG.vocab_size, (int(lens.sum()),), generator=torch.Generator().manual_seed(0))
    cu = cu_seqlens_from_lengths(lens)
    gcfg = GenerationHyperparameters(max_new_tokens=12, min_new_tokens=0, greedy=False, top_k=CFG.vocab_size,
                                     top_p=1.0, temperature=0.9)

    def run(n, eos):
        with cpu_threads.using(n):
            return generate(model, ids, cu, gcfg, eos_token_id=eos, generator=torch.Generator().manual_seed(42))

    free = run(1, None).sequences
    eos = sorted({int(free[0][3]), int(free[2][5])})
    one, many = run(1, eos), run(threads, eos)
    assert len(set(one.gen_lengths.tolist())) > 1, "the case must end rows at different steps"
    assert torch.equal(one.gen_lengths, many.gen_lengths) and torch.equal(one.gen_tokens, many.gen_tokens)
    assert torch.equal(one.logprobs, many.logprobs)


def test_decoder_takes_the_calls_threads():
    _ext()
    model = _model()
    cache = model.allocate_kv_cache(2, 8)
    assert FastDecoder(model, cache).threads == 1
    with cpu_threads.using(3):
        assert FastDecoder(model, cache).threads == 3
        assert FastDecoder(model, cache, threads=2).threads == 2
    with pytest.raises(ValueError, match=r"FastDecoder threads must be None or an integer in \[1, 256\], got 0"):
        FastDecoder(model, cache, threads=0)


def test_native_calls_refuse_a_bad_thread_count():
    ext = _ext()
    w = ext.pack_panels([torch.randn(30, 16)])
    with pytest.raises(RuntimeError, match=r"threads must be in \[1, 256\], got 0"):
        ext.packed_linear(torch.randn(4, 16), w, 30, torch.empty(0), 0)
    with pytest.raises(RuntimeError, match=r"threads must be in \[1, 256\], got 300"):
        ext.pack_panels([torch.randn(30, 16)], 300)


def _child(queue, x, w, n_out):
    ext = native.load("decode_step")
    queue.put(ext.packed_linear(x, ext.pack_panels([w], 2), n_out, torch.empty(0), 2).tolist())


def test_thread_team_works_in_a_forked_child():
    """Workers are forked: a child of a process whose team is running builds its own instead of
    waiting forever on helper threads that do not exist in it."""
    ext = _ext()
    x, w = torch.randn(8, 32), torch.randn(50, 32)
    want = ext.packed_linear(x, ext.pack_panels([w]), 50, torch.empty(0), 2)  # this process's team exists
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, x, w, 50))
    proc.start()
    try:
        got = queue.get(timeout=60)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    assert torch.equal(torch.tensor(got), want)


def test_cpu_threads_context():
    assert cpu_threads.current() == 1
    with cpu_threads.using(4):
        assert cpu_threads.current() == 4
        with cpu_threads.using(None):
            assert cpu_threads.current() == 4
        with cpu_threads.using(2):
            assert cpu_threads.current() == 2
        assert cpu_threads.current() == 4
    assert cpu_threads.current() == 1
    for bad in (0, -1, 257, 2.0, True, "2"):
        with pytest.raises(ValueError, match="cpu_threads must be None or an integer"):
            cpu_threads.check(bad)

