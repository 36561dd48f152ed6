"""The FLOP counts behind the benchmarks' machine limit (``benchmarks/_roofline.py``) against
PyTorch's own FLOP counter on a transformers llama."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import _roofline  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def _counted(length: int, backward: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="eager"))
    ids = torch.randint(0, SHAPE["vocab_size"], (1, length))
    with FlopCounterMode(display=False) as counter:
        logits = model(ids).logits
        if backward:
            logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    by_name = {str(op).split(".")[-1]: n for op, n in counts.items()}
    return by_name.get("mm", 0), by_name.get("bmm", 0)


@pytest.mark.parametrize("length", [7, 19])
def test_forward_flops_match_the_flop_counter(length):
    mm, bmm = _counted(length, backward=False)
    causal = _roofline._causal_attention_flops(SHAPE, length)
    # eager attention multiplies the whole L x L score matrix; the roofline counts its causal half
    h, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    assert bmm == layers * 4 * length * length * h
    assert causal == layers * 2 * length * (length + 1) * h
    # logits at every position: the linear layers and the head are exactly the counter's matmuls
    assert _roofline.forward_flops(SHAPE, [length], length, SHAPE["vocab_size"]) - causal == mm


def test_training_is_three_forwards():
    fwd_mm, _ = _counted(11, backward=False)
    train_mm, _ = _counted(11, backward=True)
    assert train_mm == 3 * fwd_mm
    flops = _roofline.step_flops(SHAPE, [5], 6, {"t": "train_logprobs", "f": "logprobs"})
    assert flops["t"]["train"] == 3 * flops["f"]["forward"]


def test_generation_counts_one_token_per_decoding_step():
    prefill, decode = _roofline.generate_flops(SHAPE, [4, 6], 3)
    h, vocab, layers = SHAPE["hidden_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    per_token = _roofline._layers_flops(SHAPE, 1) + 2 * h * vocab
    # two decoding steps per prompt (the first new token comes from the prefill), over contexts p+1, p+2
    attention = sum(layers * 4 * (p + t) * h for p in (4, 6) for t in (1, 2))
    assert decode == 4 * per_token + attention
    assert prefill == _roofline.forward_flops(SHAPE, [4, 6], 2, vocab)


def test_shared_prompts_are_counted_once_per_group():
    h, vocab, layers, n = SHAPE["hidden_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"], 3
    prompts = [4, 4, 6, 6]  # two groups of two samples
    flat = _roofline.step_flops(SHAPE, prompts, n, {"g": "generate", "t": "train_logprobs"})
    shared = _roofline.step_flops(SHAPE, prompts, n, {"g": "generate", "t": "train_logprobs"}, group_size=2)
    # Generation: the prompts are prefilled once per group; decoding is the same.
    assert shared["g"]["decode"] == flat["g"]["decode"]
    assert shared["g"]["prefill"] == _roofline.forward_flops(SHAPE, [4, 6], 2, vocab)
    # Training: layers over each prompt once and every answer, attention of each answer over its
    # prompt and itself, the head at each answer-predicting position (the prompt's last one shared).
    layers_part = _roofline._layers_flops(SHAPE, 4 + 6 + 4 * n)
    cells = sum(p * (p + 1) / 2 + 2 * (n * p + n * (n + 1) / 2) for p in (4, 6))
    head = 2 * h * vocab * (2 + 4 * (n - 1))
    assert shared["t"]["train"] == 3 * (layers_part + layers * 4 * h * cells + head)
    # Groups of one are the flat count.
    assert _roofline.step_flops(SHAPE, prompts, n, {"t": "train_logprobs"}, group_size=1) == {"t": flat["t"]}
