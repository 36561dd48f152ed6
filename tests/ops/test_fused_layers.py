"""Fused RMS norm, rotary, gated-MLP product and packed causal attention: the native
kernels against the torch formulas.

Values and gradients of the ``cpp`` backend must equal the ``python`` one
(plain torch autograd) to float32 rounding, for the shapes the model uses,
non-contiguous inputs included; dtypes the kernels do not serve fall back to
the torch formula exactly.
"""

from __future__ import annotations

import pytest
import torch

from realhf.impl.ops import fused_layers as fl


def _angles(n: int, half: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 500, (n,), generator=g).float()
    f = pos[:, None] * (1.0 / 10000 ** (torch.arange(half).float() / half))[None, :]
    return f.cos(), f.sin()


def _run(fn, inputs, grad_seed: int = 1):
    """Output and input gradients of ``fn(*inputs)`` under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _compare(op, fn, inputs, require_backend, rtol=1e-5, atol=1e-5):
    require_backend(op, "cpp")
    ref_out, ref_grads = _run(lambda *a: fn("python", *a), inputs)
    out, grads = _run(lambda *a: fn("cpp", *a), inputs)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(418, 256), (3, 7, 64), (5, 13)])
def test_rms_norm_matches_torch(shape, require_backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3
    w = torch.rand(shape[-1], generator=gen) + 0.5
    _compare("rms_norm", lambda b, x, w: fl.rms_norm(x, w, 1e-6, backend=b), [x, w], require_backend)


def test_rms_norm_of_a_non_contiguous_input(require_backend):
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0)).t()  # [40, 64], strided
    w = torch.rand(64) + 0.5
    assert not x.is_contiguous()
    _compare("rms_norm", lambda b, x, w: fl.rms_norm(x, w, 1e-5, backend=b), [x, w], require_backend)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,head_dim", [(4, 64), (2, 6)])
def test_rotary_matches_torch(interleaved, heads, head_dim, require_backend):
    n = 37
    cos, sin = _angles(n, head_dim // 2)
    x = torch.randn(n, heads, head_dim, generator=torch.Generator().manual_seed(3))
    _compare("rotary", lambda b, x: fl.rotary(x, cos, sin, interleaved, backend=b), [x], require_backend)


def test_rotary_of_a_slice_of_a_fused_projection(require_backend):
    """Decoding rotates the q and k heads of one q/k/v product: a non-contiguous view."""
    cos, sin = _angles(8, 16)
    qkv = torch.randn(8, 8, 32, generator=torch.Generator().manual_seed(4))
    _compare("rotary", lambda b, x: fl.rotary(x[:, :6], cos, sin, False, backend=b), [qkv], require_backend)


def test_swiglu_matches_torch(require_backend):
    gen = torch.Generator().manual_seed(5)
    gate, up = torch.randn(418, 688, generator=gen) * 4, torch.randn(418, 688, generator=gen)
    _compare("swiglu", lambda b, g, u: fl.swiglu(g, u, backend=b), [gate, up], require_backend)


def test_other_dtypes_fall_back_to_the_torch_formula(require_backend):
    require_backend("rms_norm", "cpp")
    x, w = torch.randn(6, 16, dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    assert torch.equal(fl.rms_norm(x, w, 1e-6, backend="cpp"), fl.rms_norm(x, w, 1e-6, backend="python"))
    cos, sin = _angles(6, 4)
    xb = torch.randn(6, 2, 8).bfloat16()
    assert torch.equal(fl.rotary(xb, cos, sin, False, backend="cpp"), fl.rotary(xb, cos, sin, False, backend="python"))
    g, u = torch.randn(4, 9).bfloat16(), torch.randn(4, 9).bfloat16()
    assert torch.equal(fl.swiglu(g, u, backend="cpp"), fl.swiglu(g, u, backend="python"))


def test_the_torch_formulas_are_the_textbook_ones():
    """The reference itself: RMS norm, a rotation of each pair, silu(g) * u, written out per element."""
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    rms = torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(fl.rms_norm(x, w, 1e-6, backend="python"), w * x / rms)
    theta = torch.tensor([[0.3, 1.1], [2.0, -0.7]])
    v = torch.randn(2, 1, 4)
    out = fl.rotary(v, theta.cos(), theta.sin(), False, backend="python")
    for t in range(2):
        for j in range(2):
            a, b = v[t, 0, j], v[t, 0, j + 2]
            c, s = theta[t, j].cos(), theta[t, j].sin()
            torch.testing.assert_close(out[t, 0, j], a * c - b * s)
            torch.testing.assert_close(out[t, 0, j + 2], b * c + a * s)
    g, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(fl.swiglu(g, u, backend="python"), g / (1 + torch.exp(-g)) * u)


def test_inference_without_autograd_gives_the_same_values(require_backend):
    """Under no_grad (generation, inference) the kernels run without an autograd node."""
    require_backend("rms_norm", "cpp")
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(9, 32, generator=gen), torch.rand(32, generator=gen)
    cos, sin = _angles(9, 8)
    q = torch.randn(9, 3, 16, generator=gen)
    g, u = torch.randn(9, 20, generator=gen), torch.randn(9, 20, generator=gen)
    with torch.no_grad():
        outs = [fl.rms_norm(x, w, 1e-6, backend=b) for b in ("cpp", "python")]
        outs += [fl.rotary(q, cos, sin, True, backend=b) for b in ("cpp", "python")]
        outs += [fl.swiglu(g, u, backend=b) for b in ("cpp", "python")]
    for fused, ref in zip(outs[::2], outs[1::2]):
        assert fused.grad_fn is None
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def _packed_qkv(lengths, n_q, n_kv, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + list(lengths)).cumsum(0)
    return [torch.randn(total, h, head_dim, generator=g) for h in (n_q, n_kv, n_kv)], cu


@pytest.mark.parametrize("lengths,n_q,n_kv,head_dim", [
    ([51, 42, 60, 47], 4, 2, 64),      # the PPO benchmark's shape (GQA)
    ([3, 0, 17, 9, 1], 4, 4, 16),      # an empty sequence, one token, MHA
    ([200, 7], 2, 1, 128),             # more than 64 keys a row (several key blocks), MQA
    ([33, 8], 6, 3, 80),               # head_dim not a multiple of 64
])
def test_varlen_attention_matches_per_sequence_sdpa(lengths, n_q, n_kv, head_dim, require_backend):
    """Output and dq/dk/dv of the native kernel equal one causal SDPA call per sequence."""
    (q, k, v), cu = _packed_qkv(lengths, n_q, n_kv, head_dim)
    scale = head_dim ** -0.5
    _compare("varlen_attention", lambda b, q, k, v: fl.varlen_attention(q, k, v, cu, scale, backend=b),
             [q, k, v], require_backend, rtol=1e-5, atol=2e-5)


def test_varlen_attention_python_is_masked_softmax():
    """The reference itself: softmax(q k^T * scale) over earlier tokens of the same sequence, written out."""
    (q, k, v), cu = _packed_qkv([4, 0, 3], 2, 1, 8, seed=3)
    out = fl.varlen_attention(q, k, v, cu, 0.5, backend="python")
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        for i in range(a, b):
            for h in range(2):
                w = torch.softmax((k[a:i + 1, 0] @ q[i, h]) * 0.5, dim=0)
                torch.testing.assert_close(out[i, h], w @ v[a:i + 1, 0])


def test_varlen_attention_without_autograd_and_other_dtypes(require_backend):
    require_backend("varlen_attention", "cpp")
    (q, k, v), cu = _packed_qkv([5, 12], 4, 2, 32, seed=1)
    with torch.no_grad():
        out = fl.varlen_attention(q, k, v, cu, 0.2, backend="cpp")
    assert out.grad_fn is None
    torch.testing.assert_close(out, fl.varlen_attention(q, k, v, cu, 0.2, backend="python"), rtol=1e-5, atol=1e-5)
    qd, kd, vd = (x.double() for x in (q, k, v))
    assert torch.equal(fl.varlen_attention(qd, kd, vd, cu, 0.2, backend="cpp"),
                       fl.varlen_attention(qd, kd, vd, cu, 0.2, backend="python"))


def test_varlen_attention_rejects_bad_boundaries(require_backend):
    require_backend("varlen_attention", "cpp")
    from realhf.impl.ops import native
    ext = native.load("fused_layers")
    (q, k, v), _ = _packed_qkv([5, 4], 2, 1, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        ext.varlen_attention_fwd(q, k, v, torch.tensor([0, 5, 8]), 1.0)
    with pytest.raises(RuntimeError, match="head_dim"):
        ext.varlen_attention_fwd(q[..., :6].contiguous(), k[..., :6].contiguous(), v[..., :6].contiguous(),
                                 torch.tensor([0, 5, 9]), 1.0)


def _tree_reference(q, k, v, segments, scale):
    """Attention over prefix-tree segments written out: segment (q0, n, k0, p)'s query i sees
    rows k0 .. k0 + p - 1 and q0 .. q0 + i."""
    out = torch.zeros_like(q)
    rep = q.shape[1] // k.shape[1]
    for q0, n, k0, p in segments.tolist():
        keys = torch.cat([torch.arange(k0, k0 + p), torch.arange(q0, q0 + n)])
        for i in range(n):
            seen = keys[:p + i + 1]
            for h in range(q.shape[1]):
                w = torch.softmax((k[seen, h // rep] @ q[q0 + i, h]) * scale, dim=0)
                out[q0 + i, h] = w @ v[seen, h // rep]
    return out


def _tree_segments(groups):
    """Segments and run boundaries of groups given as (prefix, [branch lengths]), laid out in order."""
    from realhf.impl.model.nn.prefix_tree import _segment_list

    segs = _segment_list(groups)
    starts = [s for s, (_, _, _, p) in enumerate(segs) if p == 0]  # a run starts at a segment without a prefix
    return torch.tensor(segs).view(-1, 4), torch.tensor(starts + [len(segs)]), sum(n for _, n, _, _ in segs)


@pytest.mark.parametrize("groups,n_q,n_kv,head_dim", [
    ([(19, [32, 32, 32, 32]), (11, [32, 32, 32, 32])], 4, 2, 64),  # GRPO's shape: 2 prompts x 4 answers
    ([(5, [3, 1, 7]), (0, [6]), (2, [4, 0, 9])], 4, 4, 16),        # a plain sequence, an empty branch, MHA
    ([(70, [3, 2])], 2, 1, 80),                                     # a prefix longer than 64 keys, MQA
])
def test_tree_attention_matches_its_definition(groups, n_q, n_kv, head_dim, require_backend):
    """Output and dq/dk/dv of the native prefix-tree kernel equal the written-out attention's
    (shared prefix rows get the sum of what every branch sends them)."""
    require_backend("varlen_attention", "cpp")
    segments, runs, total = _tree_segments(groups)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(total, h, head_dim, generator=g) for h in (n_q, n_kv, n_kv))
    scale = head_dim ** -0.5
    out, grads = _run(lambda q, k, v: fl.tree_attention(q, k, v, segments, runs, scale), [q, k, v])
    ref_out, ref_grads = _run(lambda q, k, v: _tree_reference(q, k, v, segments, scale), [q, k, v])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=2e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    with torch.no_grad():
        assert torch.equal(fl.tree_attention(q, k, v, segments, runs, scale), out)


def test_tree_attention_refuses_bad_segments(require_backend):
    require_backend("varlen_attention", "cpp")
    segments, runs, total = _tree_segments([(3, [2, 2]), (0, [4])])
    q, k, v = torch.randn(total, 2, 8), torch.randn(total, 1, 8), torch.randn(total, 1, 8)
    with pytest.raises(RuntimeError, match="segments cover 11 rows of 12"):
        fl.tree_attention(torch.cat([q, q[:1]]), torch.cat([k, k[:1]]), torch.cat([v, v[:1]]), segments, runs, 1.0)
    gap = segments.clone()
    gap[1, 0] += 1
    with pytest.raises(RuntimeError, match="segment 1 must start at row 3"):
        fl.tree_attention(q, k, v, gap, runs, 1.0)
    foreign = segments.clone()
    foreign[3, 2:] = torch.tensor([0, 3])  # the plain sequence claims the other group's prefix
    with pytest.raises(RuntimeError, match="segment 3: its prefix must lie in its group"):
        fl.tree_attention(q, k, v, foreign, runs, 1.0)
    with pytest.raises(RuntimeError, match="groups must run from 0"):
        fl.tree_attention(q, k, v, segments, torch.tensor([0, 3]), 1.0)


@pytest.mark.parametrize("rows", [
    list(range(37)),                       # every row (log-probs of the rows a loss reads)
    [0, 1, 2, 5, 6, 7, 8, 20, 35],        # a shifted layout: some rows skipped, the last ones unread
    [4, 4, 30, 2],                         # rows read twice, out of order: their gradients add up
])
def test_token_logprobs_matches_torch(rows, require_backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(37, 1000, generator=g) * 3
    logits[3, 100:] = torch.finfo(torch.float32).min  # a masked row, as the sampler's vocabulary mask leaves it
    rows = torch.tensor(rows)
    labels = torch.randint(0, 100, (rows.numel(),), generator=g)
    _compare("token_logprobs", lambda b, x: fl.token_logprobs(x, rows, labels, backend=b), [logits],
             require_backend, rtol=1e-5, atol=1e-6)
    want = torch.log_softmax(logits.double(), -1)[rows, labels].float()
    torch.testing.assert_close(fl.token_logprobs(logits, rows, labels, backend="cpp"), want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_refuses_indices_outside_the_logits(require_backend):
    require_backend("token_logprobs", "cpp")
    logits = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="entry 1: row 4 / label 0 outside logits of 4 x 10"):
        fl.token_logprobs(logits, torch.tensor([0, 4]), torch.tensor([1, 0]), backend="cpp")
    with pytest.raises(RuntimeError, match="label 10"):
        fl.token_logprobs(logits, torch.tensor([0]), torch.tensor([10]), backend="cpp")
