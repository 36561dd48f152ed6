"""The ``dpo`` interface: sequence log-probs, loss formula, training, micro-batching, dp/tp/pp."""

from __future__ import annotations

import math
from typing import List

import pytest
import torch
import torch.nn.functional as F

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec, Model, make_interface
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.interface.dpo_interface import DPOInterface, answer_logp

from tests.interface._sft_utils import full_state, tiny_config, train_model, whole_model
from tests.parallel._mesh import MODEL, setup_mesh, stage_from_full

# Items: (prompt length, [(chosen length, rejected length), ...]).
ITEMS = [(3, [(7, 5)]), (2, [(6, 9), (4, 5)]), (4, [(8, 6)]), (1, [(3, 4), (5, 2), (6, 6)])]


def dpo_batch(vocab: int, items=ITEMS, seed: int = 1, prefix: str = "d") -> SequenceSample:
    """Random pairs whose sequences of one item share the item's prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs, seqlens = [], []
    for plen, pairs in items:
        prompt = torch.randint(0, vocab, (plen,), generator=g)
        lens = []
        for pair in pairs:
            for n in pair:
                seqs.append(torch.cat([prompt, torch.randint(0, vocab, (n - plen,), generator=g)]))
                lens.append(n)
        seqlens.append(lens)
    return SequenceSample(
        keys={"packed_input_ids", "prompt_lens"},
        trailing_shapes={"packed_input_ids": (), "prompt_lens": ()},
        dtypes={"packed_input_ids": torch.int64, "prompt_lens": torch.int32},
        ids=[f"{prefix}{i}" for i in range(len(items))],
        seqlens={"packed_input_ids": seqlens, "prompt_lens": [[1]] * len(items)},
        data={"packed_input_ids": torch.cat(seqs),
              "prompt_lens": torch.tensor([p for p, _ in items], dtype=torch.int32)},
        metadata={},
    )


def hand_seqlogp(logits: torch.Tensor, sample: SequenceSample) -> List[float]:
    """Sum over answer tokens t >= prompt_len of log p(token t | tokens < t), one token at a time."""
    ids = sample.data["packed_input_ids"]
    logp = torch.log_softmax(logits.double(), -1)
    out, start = [], 0
    for lens, plen in zip(sample.seqlens["packed_input_ids"], sample.data["prompt_lens"].tolist()):
        for L in lens:
            out.append(sum(float(logp[start + t - 1, ids[start + t]]) for t in range(plen, L)))
            start += L
    return out


def hand_dpo(pi: List[float], ref: List[float], beta: float):
    losses, pos, neg = [], [], []
    for i in range(0, len(pi), 2):
        p = beta * (pi[i] - ref[i])
        n = beta * (pi[i + 1] - ref[i + 1])
        losses.append(-math.log(1.0 / (1.0 + math.exp(-(p - n)))))
        pos.append(p)
        neg.append(n)
    m = len(losses)
    kl = sum(r - q for q, r in zip(pi, ref)) / len(pi)
    return sum(losses) / m, sum(pos) / m, sum(neg) / m, kl


def with_ref(sample: SequenceSample, seqlogp: torch.Tensor) -> SequenceSample:
    out = SequenceSample(
        keys={"seqlogp"}, trailing_shapes={"seqlogp": ()}, dtypes={"seqlogp": torch.float32}, ids=list(sample.ids),
        seqlens={"seqlogp": [[len(s)] for s in sample.seqlens["packed_input_ids"]]},
        data={"seqlogp": seqlogp.float()}, metadata={})
    s = SequenceSample.gather(sample.unpack())
    s.update_(out)
    return s


def _logits(net, sample):
    ids, cu, m = packed_inputs(sample)
    with torch.no_grad():
        return net(ids, cu, m)


def test_registered_defaults():
    iface = make_interface("dpo")
    assert isinstance(iface, DPOInterface) and iface.beta == 0.1 and iface.enable_save


def test_seqlogp_equals_hand_computed_answer_logprob_sum():
    config = tiny_config()
    net = whole_model(config, full_state(config, std=0.2))
    sample = dpo_batch(config.vocab_size)
    want = hand_seqlogp(_logits(net, sample), sample)
    out = DPOInterface(enable_save=False).inference(Model("ref", net, tokenizer=None), sample, MicroBatchSpec(n_mbs=3))
    assert out.ids == sample.ids and out.keys == {"seqlogp"} and out.dtypes["seqlogp"] == torch.float32
    assert out.seqlens["seqlogp"] == [[len(s)] for s in sample.seqlens["packed_input_ids"]]
    torch.testing.assert_close(out.data["seqlogp"].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_loss_equals_formula_on_random_logprobs():
    g = torch.Generator().manual_seed(0)
    pi, ref = torch.randn(10, generator=g) * 3, torch.randn(10, generator=g) * 3
    t = DPOInterface.dpo_terms(pi, ref, 0.3)
    want = hand_dpo(pi.tolist(), ref.tolist(), 0.3)
    assert float(t["loss"].mean()) == pytest.approx(want[0], rel=1e-5)
    assert float(t["pos"].mean()) == pytest.approx(want[1], rel=1e-5)
    assert float(t["neg"].mean()) == pytest.approx(want[2], rel=1e-5)
    assert float(t["kl"].mean()) == pytest.approx(want[3], rel=1e-5)
    formula = -F.logsigmoid(0.3 * ((pi[0::2] - pi[1::2]) - (ref[0::2] - ref[1::2]))).mean()
    assert float(t["loss"].mean()) == pytest.approx(float(formula), rel=1e-6)

    # The same through loss_fn, with logits of a real model and random reference log-probs.
    config = tiny_config()
    net = whole_model(config, full_state(config, std=0.2))
    sample = dpo_batch(config.vocab_size)
    ref_lp = torch.randn(14, generator=g) * 5
    logits = _logits(net, sample)
    loss, stats = DPOInterface(beta=0.2).loss_fn(logits, with_ref(sample, ref_lp))
    want = hand_dpo(hand_seqlogp(logits, sample), ref_lp.tolist(), 0.2)
    assert float(loss) == pytest.approx(want[0], rel=1e-5)
    assert stats["pos_score"] == pytest.approx(want[1], rel=1e-4, abs=1e-6)
    assert stats["neg_score"] == pytest.approx(want[2], rel=1e-4, abs=1e-6)
    assert stats["margin"] == pytest.approx(want[1] - want[2], rel=1e-4, abs=1e-6)
    assert stats["kl"] == pytest.approx(want[3], rel=1e-4, abs=1e-6)
    assert DPOInterface.loss_weight_fn(sample) == 7


def test_prompt_tokens_get_no_gradient():
    config = tiny_config()
    sample = dpo_batch(config.vocab_size, items=[(4, [(7, 6)])])
    logits = torch.randn(13, config.vocab_size, requires_grad=True)
    answer_logp(logits, sample).sum().backward()
    rows = set(torch.nonzero(logits.grad.abs().sum(-1)).flatten().tolist())
    # Row t predicts token t+1: answer tokens 4..6 of the first sequence, 4..5 of the second.
    assert rows == {3, 4, 5} | {7 + 3, 7 + 4}


def test_train_step_micro_batches_and_margin_grows():
    config = tiny_config()
    sd = full_state(config, std=0.2)
    base = dpo_batch(config.vocab_size)
    ref_lp = DPOInterface().inference(Model("ref", whole_model(config, sd), tokenizer=None), base)
    sample = with_ref(base, ref_lp.data["seqlogp"])
    params = []
    for n_mbs in (1, 3):
        net = whole_model(config, sd)
        stats = DPOInterface(beta=0.1).train_step(train_model(net, lr=1e-2), sample, MicroBatchSpec(n_mbs=n_mbs))
        assert stats["loss"] == pytest.approx(math.log(2.0), rel=1e-5)  # policy == reference
        assert abs(stats["margin"]) < 1e-5 and abs(stats["kl"]) < 1e-5 and stats["n_pairs"] == 7
        params.append(net.flat_param.clone())
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)

    net = whole_model(config, sd)
    model = train_model(net, lr=1e-2)
    iface = DPOInterface(beta=0.1)
    margins, losses = [], []
    for _ in range(20):
        s = iface.train_step(model, sample, MicroBatchSpec(n_mbs=2))
        margins.append(s["margin"])
        losses.append(s["loss"])
    assert margins[-1] > margins[0] + 1.0, margins
    assert losses[-1] < losses[0] - 0.3, losses
    ev = iface.evaluate(model, [sample])
    assert ev["margin"] > margins[-1] - 1e-3 and ev["acc"] == 1.0 and ev["n_pairs"] == 7


def test_evaluation_against_the_initial_policy_as_reference():
    """A valid set without ``seqlogp``: prepare_evaluation records the starting policy's
    log-probs (the reference's when both load the same weights) and evaluate scores
    against them, so the numbers equal those of batches that carry the reference."""
    config = tiny_config()
    sd = full_state(config, std=0.2)
    valid = dpo_batch(config.vocab_size, seed=5, prefix="v")
    ref_lp = DPOInterface().inference(Model("ref", whole_model(config, sd), tokenizer=None), valid)
    model = train_model(whole_model(config, sd), lr=1e-2)
    iface = DPOInterface(beta=0.1, reference_is_initial_policy=True)
    iface.prepare_evaluation(model, [valid])
    start = iface.evaluate(model, [valid])
    assert start["loss"] == pytest.approx(math.log(2.0), rel=1e-6) and abs(start["margin"]) < 1e-6
    base = dpo_batch(config.vocab_size)
    base_ref = DPOInterface().inference(Model("ref", whole_model(config, sd), tokenizer=None), base)
    for _ in range(5):
        iface.train_step(model, with_ref(base, base_ref.data["seqlogp"]), MicroBatchSpec(n_mbs=2))
    after = iface.evaluate(model, [valid])
    explicit = DPOInterface(beta=0.1).evaluate(model, [with_ref(valid, ref_lp.data["seqlogp"])])
    for k in ("loss", "margin", "acc", "n_pairs"):
        assert after[k] == pytest.approx(explicit[k], rel=1e-5, abs=1e-6), (k, after, explicit)
    assert after["margin"] != pytest.approx(0.0, abs=1e-4)
    # Without the flag the reference is uniform: other numbers.
    uniform = DPOInterface(beta=0.1).evaluate(model, [valid])
    assert uniform["margin"] != pytest.approx(after["margin"], abs=1e-4)


# ----------------------------------------------------------- dp / tp / pp
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]


def _worker(rank: int, world: int, dp: int, tp: int, pp: int):
    config = tiny_config()
    full = full_state(config, std=0.2)
    other_ref = _reference_logp()  # outside the model scope: a whole model on this process
    setup_mesh(dp, tp, pp)
    with constants.model_scope(MODEL):
        d = constants.data_parallel_rank()
        net = stage_from_full(config, full)
        base = dpo_batch(config.vocab_size)
        ref = DPOInterface(enable_save=False).inference(Model("ref", net, tokenizer=None), base, MicroBatchSpec(n_mbs=2))
        seqlogp = None if ref is None else ref.data["seqlogp"].clone()
        items = base.unpack()
        local = SequenceSample.gather(items[d * len(items) // dp:(d + 1) * len(items) // dp])
        local_ref = other_ref[sum(len(s) for s in base.seqlens["packed_input_ids"][:d * len(items) // dp]):]
        local_ref = local_ref[:sum(len(s) for s in local.seqlens["packed_input_ids"])]
        stats = DPOInterface().train_step(train_model(net), with_ref(local, local_ref), MicroBatchSpec(n_mbs=2))
        return {"seqlogp": seqlogp, "stats": stats}


def _reference_logp() -> torch.Tensor:
    """Reference log-probs of a different model, so the first step has a nonzero margin."""
    config = tiny_config()
    net = whole_model(config, full_state(config, seed=5, std=0.2))
    return DPOInterface().inference(Model("ref", net, tokenizer=None), dpo_batch(config.vocab_size)).data["seqlogp"]


@pytest.mark.distributed
@pytest.mark.parametrize("dp,tp,pp", LAYOUTS, ids=[f"dp{d}tp{t}pp{p}" for d, t, p in LAYOUTS])
def test_layout_matches_single_process(dp: int, tp: int, pp: int):
    config = tiny_config()
    sd = full_state(config, std=0.2)
    base = dpo_batch(config.vocab_size)
    want_lp = DPOInterface().inference(Model("ref", whole_model(config, sd), tokenizer=None), base).data["seqlogp"]
    want = DPOInterface().train_step(train_model(whole_model(config, sd)), with_ref(base, _reference_logp()))
    results = run_distributed(_worker, dp * tp * pp, timeout=120, args=(dp, tp, pp))
    n_full = 0
    for r in results:
        if r["seqlogp"] is not None:
            n_full += 1
            torch.testing.assert_close(r["seqlogp"], want_lp, rtol=1e-5, atol=1e-5)
        for k in ("loss", "pos_score", "neg_score", "margin", "kl", "acc", "grad_norm", "n_pairs"):
            assert r["stats"][k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert n_full == dp * tp  # only the last pipeline stage returns outputs
