"""Sequences sharing a prefix packed as a tree give the flat layout's outputs and gradients.

The reference is the same model with ``share_prefixes = False`` (every
sequence packed whole); the layout itself is checked against its definition.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.model_api import get_hf_family
from realhf.impl.model.nn import prefix_tree
from realhf.impl.model.nn.real_llm_api import ReaLModel

CLOSE = dict(atol=2e-5, rtol=1e-4)


def grouped_batch(vocab: int, prompts: List[int], group: int, answers: Tuple[int, int], seed: int = 0):
    """``group`` answers of random lengths per prompt, each packed after its own copy of the prompt."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in prompts:
        prompt = torch.randint(0, vocab, (n,), generator=g)
        for _ in range(group):
            m = int(torch.randint(answers[0], answers[1] + 1, (1,), generator=g))
            seqs.append(torch.cat([prompt, torch.randint(0, vocab, (m,), generator=g)]))
    lens = [len(s) for s in seqs]
    return torch.cat(seqs), torch.tensor([0] + lens).cumsum(0)


def _model(family: str, critic: bool = False, **overrides) -> ReaLModel:
    config = get_hf_family(family).real_config_maker()
    if critic:
        overrides.update(is_critic=True, tied_embedding=False)
    config = dataclasses.replace(config, **overrides)
    model = ReaLModel(config).instantiate()
    model.init_weights(std=0.2, seed=0)
    return model


def _run(model: ReaLModel, share: bool, ids, cu, w):
    model.share_prefixes = share
    model.zero_grad(set_to_none=True)
    out = model(ids, cu)
    loss = (out * w).sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "qwen3"])
@pytest.mark.parametrize("critic", [False, True])
@pytest.mark.parametrize("kernel", ["native", "math", "sdpa"])
def test_tree_forward_and_backward_equal_flat(family, critic, kernel, monkeypatch):
    from realhf.impl.model.modules import attention
    from realhf.impl.ops import fused_layers

    used = []
    if kernel == "native":
        if not fused_layers.native_attention(torch.device("cpu")):
            pytest.skip("the native attention kernels need a CPU with AVX2 and FMA")
        real = fused_layers.tree_attention
        monkeypatch.setattr(fused_layers, "tree_attention", lambda *a: used.append(1) or real(*a))
    else:
        monkeypatch.setattr(fused_layers, "tree_attention_applies", lambda *a: False)
    if kernel == "sdpa":
        monkeypatch.setattr(attention, "MATH_MAX_SCORES", 0)
    model = _model(family, critic)
    vocab = model.config.vocab_size
    # Three groups of 4 with prompts of 9, 5 and 12 tokens (mistral's window is 8: some answers pass it).
    ids, cu = grouped_batch(vocab, [9, 5, 12], 4, (1, 7))
    tree = prefix_tree.build_prefix_tree(ids, cu)
    assert tree is not None and tree.saved == 3 * (9 + 5 + 12)
    g = torch.Generator().manual_seed(3)
    w = torch.randn((int(cu[-1]),) if critic else (int(cu[-1]), vocab), generator=g)
    out_flat, grads_flat = _run(model, False, ids, cu, w)
    out_tree, grads_tree = _run(model, True, ids, cu, w)
    torch.testing.assert_close(out_tree, out_flat, **CLOSE)
    # Summation order differs: errors relative to each gradient's scale, or to the model's for a
    # gradient that is zero in exact arithmetic (a key bias under softmax).
    model_scale = max(float(g.abs().max()) for g in grads_flat.values())
    for k in grads_flat:
        scale = max(float(grads_flat[k].abs().max()), 1e-2 * model_scale)
        assert float((grads_tree[k] - grads_flat[k]).abs().max()) <= 1e-5 * scale, k
    # Mistral's sliding window keeps the batched products; every other family runs the kernel.
    assert bool(used) == (kernel == "native" and model.config.sliding_window is None)


def test_tree_layout_matches_its_definition():
    ids, cu = grouped_batch(50, [6, 3], 3, (1, 4), seed=5)
    # A distinct sequence between the groups and one at the end: groups of one.
    ids = torch.cat([ids[: int(cu[3])], torch.tensor([7, 7, 7]), ids[int(cu[3]):], torch.tensor([1, 2])])
    lens = (cu[1:] - cu[:-1]).tolist()
    lens = lens[:3] + [3] + lens[3:] + [2]
    cu = torch.tensor([0] + lens).cumsum(0)
    tree = prefix_tree.build_prefix_tree(ids, cu, min_saved_fraction=0.0)
    assert tree is not None
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    flat_pos = torch.arange(int(cu[-1])) - cu[seq]
    # Every flat token is its tree row's token at the same position.
    assert torch.equal(tree.input_ids[tree.expand], ids)
    assert torch.equal(tree.positions[tree.expand], flat_pos)
    assert tree.n_tokens == int(cu[-1]) - tree.saved == int(cu[-1]) - 2 * 6 - 2 * 3
    # Visibility: tree row a sees row b iff flat token "a" of some sequence sees flat token "b" of the same one.
    want = torch.zeros(tree.n_tokens, tree.n_tokens, dtype=torch.bool)
    for s in range(len(lens)):
        r = tree.expand[int(cu[s]): int(cu[s + 1])]
        want[r[:, None], r[None, :]] |= torch.ones(len(r), len(r), dtype=torch.bool).tril()
    assert torch.equal(tree.visibility(), want)
    # Segments: 2 prefixes + 6 branches + 2 plain sequences; every tree row is one query.
    att = tree.attention
    assert att.q_index.shape[0] == 10
    assert sorted(att.out_index.tolist()) == att.out_index.tolist() or len(set(att.out_index.tolist())) == tree.n_tokens


def test_no_tree_without_enough_sharing():
    ids, cu = grouped_batch(1000, [4, 6, 5], 1, (3, 8))  # distinct prompts: nothing shared
    assert prefix_tree.build_prefix_tree(ids, cu) is None
    ids, cu = grouped_batch(1000, [2], 2, (60, 60))  # 2 of 124 tokens shared: under 5%
    assert prefix_tree.build_prefix_tree(ids, cu) is None
    assert prefix_tree.build_prefix_tree(ids, cu, min_saved_fraction=0.0).saved == 2


@pytest.mark.parametrize("prefixes, want", [
    ([], [(0, 1, 0)]),
    ([5, 5, 0, 3], [(0, 3, 5), (3, 5, 3)]),
    ([1, 0], [(0, 1, 0), (1, 2, 0), (2, 3, 0)]),  # a 1-token prefix is not shared
    ([10, 4, 4], [(0, 2, 10), (2, 4, 4)]),  # joining the third would drop the saving from 10 to 8
    ([10, 6, 6], [(0, 4, 6)]),  # 3 * 6 >= 10
])
def test_plan_groups(prefixes, want):
    assert prefix_tree.plan_groups(prefixes) == want


def test_consecutive_prefixes_keep_a_token_per_branch():
    ids = torch.tensor([1, 2, 3, 1, 2, 3, 4, 1, 2, 9, 5])
    cu = torch.tensor([0, 3, 7, 10, 11])
    # [1,2,3] vs [1,2,3,4]: capped at 2; [1,2,3,4] vs [1,2,9]: 2; [1,2,9] vs [5]: 0.
    assert prefix_tree.consecutive_prefixes(ids, cu) == [2, 2, 0]


def test_repeated_rows():
    ids = torch.tensor([1, 2, 1, 2, 1, 2, 3, 1, 2, 1, 2, 3])
    cu = torch.tensor([0, 2, 4, 6, 7, 9, 12])
    assert prefix_tree.repeated_rows(ids, cu).tolist() == [0, 0, 0, 3, 4, 5]
    assert prefix_tree.repeated_rows(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 3])) is None


def test_moe_and_cached_forwards_stay_flat():
    model = _model("mixtral")
    ids, cu = grouped_batch(model.config.vocab_size, [8], 4, (2, 3))
    assert model._prefix_tree(ids, cu, None, None) is None
    llama = _model("llama")
    assert llama._prefix_tree(ids, cu, None, None) is not None
    assert llama._prefix_tree(ids, cu, llama.allocate_kv_cache(4, 16), None) is None


def test_no_tree_when_its_padded_attention_would_cost_more(monkeypatch):
    # A shared 20-token prefix, then answers of 2 and 300 tokens: the tree saves 20 of 342 tokens but
    # its grid pads the short answer to 300 queries over 320 keys, more than twice the flat attention.
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 100, (20,), generator=g)
    seqs = [torch.cat([prompt, torch.randint(0, 100, (n,), generator=g)]) for n in (2, 300)]
    ids, cu = torch.cat(seqs), torch.tensor([0, 22, 342])
    assert prefix_tree.build_prefix_tree(ids, cu) is None
    # Equal answers: the same saving with a grid of no padding.
    seqs = [torch.cat([prompt, torch.randint(0, 100, (150,), generator=g)]) for _ in range(2)]
    ids, cu = torch.cat(seqs), torch.tensor([0, 170, 340])
    assert prefix_tree.build_prefix_tree(ids, cu) is not None
    monkeypatch.setattr(prefix_tree, "MAX_GRID", 1000)  # and a bound on the grid's size
    assert prefix_tree.build_prefix_tree(ids, cu) is None
