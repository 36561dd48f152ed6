"""A training forward that replays a rollout's matrix products (linear_replay) gives the
logits and gradients of the forward that recomputes them, and replays only what it may."""

import pytest
import torch

from realhf.api.core.model_api import GenerationHyperparameters, ReaLModelConfig
from realhf.impl.model.nn import linear_replay
from realhf.impl.model.nn.fast_decode import panel_kernel_supported
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_generate import generate
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
from realhf.impl.ops import native
from tests.model.test_fast_decode import LLAMA, VARIANTS

EOS = list(range(6))  # about one draw in eight ends a row: answers of many lengths
PROMPT_LENS = [4, 7, 2]

pytestmark = pytest.mark.skipif(native.load("decode_step") is None or not panel_kernel_supported(),
                                reason="the native decoding loop does not run on this machine")


def _model(cfg: ReaLModelConfig, seed: int = 0) -> ReaLModel:
    model = ReaLModel(cfg).instantiate(init=False)
    model.init_weights(std=0.2, seed=seed)
    return model.train()


def _rollout(model: ReaLModel, group: int = 3, capture: bool = True, seed: int = 5):
    """``group`` answers to each prompt; the packed (prompt + answer) sequences."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(6, model.config.vocab_size, (n,), generator=g) for n in PROMPT_LENS]
    rows = [p for p in prompts for _ in range(group)]
    ids = torch.cat(rows)
    cu = cu_seqlens_from_lengths(torch.tensor([len(p) for p in rows]))
    gconfig = GenerationHyperparameters(max_new_tokens=9, min_new_tokens=1, top_k=10**6, top_p=1.0)
    with torch.no_grad(), linear_replay.capturing(model, capture):
        out = generate(model, ids, cu, gconfig, eos_token_id=EOS, generator=torch.Generator().manual_seed(seed))
    seqs = [torch.cat([p, a]) for p, a in zip(rows, out.sequences)]
    return seqs, out


def _loss_and_grads(model: ReaLModel, seqs, output_rows: bool):
    """A policy-gradient-like loss over the answer tokens' log-probs; its value, the logits, the gradients."""
    ids = torch.cat(seqs)
    lens = torch.tensor([len(s) for s in seqs])
    cu = cu_seqlens_from_lengths(lens)
    model.zero_grad(set_to_none=True)
    rows = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1]) - 1) for i in range(len(seqs))])
    logits = model(ids, cu, int(lens.max()), output_rows=rows if output_rows else None)
    if not output_rows:
        logits = logits[rows]
    targets = ids[rows + 1]
    weights = torch.linspace(-1.0, 2.0, rows.numel())
    loss = -(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1) * weights).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach(), grads


def _count_replays(monkeypatch):
    calls = []
    apply = linear_replay._Replayed.apply
    monkeypatch.setattr(linear_replay._Replayed, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("output_rows", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_replayed_forward_equals_recomputed(variant, output_rows, monkeypatch):
    """Groups of answers to a shared prompt (prefilled once, packed as a prefix tree), rows
    ended by EOS at different steps, the head on answer rows only or on every row."""
    model = _model(VARIANTS[variant])
    seqs, out = _rollout(model)
    assert len(set(out.gen_lengths.tolist())) > 2 and bool(out.no_eos.any()) and not bool(out.no_eos.all())
    calls = _count_replays(monkeypatch)
    loss_r, logits_r, grads_r = _loss_and_grads(model, seqs, output_rows)
    n_linear = 7 * model.config.n_layers + 1
    assert len(calls) == n_linear  # every product of the forward was replayed
    linear_replay.drop(model)
    loss_p, logits_p, grads_p = _loss_and_grads(model, seqs, output_rows)
    assert len(calls) == n_linear  # and none of the recomputing one
    assert logits_r.shape == logits_p.shape
    assert _rel(logits_r, logits_p) < 1e-5
    assert float(loss_r) == pytest.approx(float(loss_p), rel=1e-5)
    assert grads_r.keys() == grads_p.keys() and len(grads_r) > 0
    for name in grads_p:
        assert _rel(grads_r[name], grads_p[name]) < 1e-4, name


def test_replay_needs_the_same_weights_and_sequences(monkeypatch):
    model = _model(LLAMA)
    seqs, _ = _rollout(model)
    calls = _count_replays(monkeypatch)
    # No sequence of the batch was generated: the batch is recomputed.
    changed = [s.clone() for s in seqs]
    for s in changed:
        s[-1] = (s[-1] + 1) % LLAMA.vocab_size
    _loss_and_grads(model, changed, True)
    assert calls == []
    # One sequence was not (a token changed): the others are replayed, it is computed.
    changed = [s.clone() for s in seqs]
    changed[2][-2] = (changed[2][-2] + 1) % LLAMA.vocab_size
    loss_r, logits_r, grads_r = _loss_and_grads(model, changed, True)
    assert len(calls) > 0
    held = model._rollout_captures
    model._rollout_captures = []
    loss_p, logits_p, grads_p = _loss_and_grads(model, changed, True)
    model._rollout_captures = held
    assert _rel(logits_r, logits_p) < 1e-5
    assert all(_rel(grads_r[k], grads_p[k]) < 1e-4 for k in grads_p)
    calls.clear()
    # A subset of the rollout, in another order, is replayed.
    _loss_and_grads(model, seqs[::-2], True)
    assert len(calls) > 0
    # No gradient: nothing to replay for (inference recomputes).
    n = len(calls)
    with torch.no_grad():
        ids = torch.cat(seqs)
        model(ids, cu_seqlens_from_lengths(torch.tensor([len(s) for s in seqs])), max(len(s) for s in seqs))
    assert len(calls) == n
    # Weights written in place: the capture no longer applies.
    with torch.no_grad():
        model.flat_param.mul_(1.0)
    _loss_and_grads(model, seqs, True)
    assert len(calls) == n
    # A declared optimizer update releases the captures.
    seqs, _ = _rollout(model, seed=9)
    assert len(model._rollout_captures) == 1
    linear_replay.weights_updated(model)
    assert model._rollout_captures == []
    _loss_and_grads(model, seqs, True)
    assert len(calls) == n


def test_generation_without_capture_keeps_nothing_and_samples_alike():
    a, b = _model(LLAMA), _model(LLAMA)
    seqs_a, out_a = _rollout(a, capture=True)
    seqs_b, out_b = _rollout(b, capture=False)
    assert getattr(b, "_rollout_captures", []) == [] and len(a._rollout_captures) == 1
    assert all(torch.equal(x, y) for x, y in zip(seqs_a, seqs_b))
    assert torch.equal(out_a.logprobs, out_b.logprobs)


def test_a_capture_over_the_size_limit_is_not_kept(monkeypatch):
    model = _model(LLAMA)
    seqs, _ = _rollout(model)
    size = linear_replay.RolloutCapture.nbytes(model, model._rollout_captures[0].head.shape[0])
    assert size == sum(t.numel() * 4 for t in model._rollout_captures[0].flat()) + model._rollout_captures[0].head.numel() * 4
    linear_replay.drop(model)
    monkeypatch.setattr(linear_replay, "MAX_CAPTURE_BYTES", size - 1)
    seqs_small, out = _rollout(model)
    assert getattr(model, "_rollout_captures", []) == []
    assert all(torch.equal(a, b) for a, b in zip(seqs, seqs_small))  # sampling is unchanged
