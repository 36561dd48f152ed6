"""The ``sft`` interface on one process: loss definition, masking, training, evaluation, saving."""

from __future__ import annotations

import math
import os

import pytest
import torch

from realhf.api.core.data_api import DatasetUtility, PackedDataLoader, load_hf_tokenizer, packed_eval_dataloader
from realhf.api.core.model_api import FinetuneSpec, MicroBatchSpec, Model, make_interface
from realhf.assets import dataset_path, tokenizer_path
from realhf.impl.dataset.prompt_answer_dataset import PromptAnswerDataset
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.backend.train_engine import TrainEngine
from realhf.impl.model.conversion import parallel_save
from realhf.impl.model.interface.sft_interface import SFTInterface

from tests.interface._sft_utils import (
    full_state,
    hand_nll,
    optimizer,
    sft_batch,
    tiny_config,
    train_model,
    whole_model,
)

LENGTHS = [6, 9, 4, 12, 7]
PROMPTS = [2, 5, 1, 3, 7]  # the last sequence has no answer token


def _logits(model, sample):
    ids, cu, m = packed_inputs(sample)
    return model(ids, cu, m)


def test_registered():
    assert isinstance(make_interface("sft"), SFTInterface)


def test_loss_equals_hand_computed_answer_nll():
    config = tiny_config()
    model = whole_model(config, full_state(config))
    sample = sft_batch(config.vocab_size, LENGTHS, PROMPTS)
    with torch.no_grad():
        logits = _logits(model, sample)
    loss, _ = SFTInterface.loss_fn(logits, sample, config.vocab_size)
    assert float(loss) == pytest.approx(float(hand_nll(logits, sample)), rel=1e-6)
    n_answer = sum(n - p for n, p in zip(LENGTHS, PROMPTS))
    assert SFTInterface.loss_weight_fn(sample) == n_answer


def test_prompt_tokens_do_not_affect_loss_or_gradient():
    config = tiny_config()
    sample = sft_batch(config.vocab_size, LENGTHS, PROMPTS)
    logits = torch.randn(sum(LENGTHS), config.vocab_size, requires_grad=True)
    loss, _ = SFTInterface.loss_fn(logits, sample)
    loss.backward()
    # Row t gets gradient only if token t+1 is an answer token of the same sequence.
    mask, start = sample.data["prompt_mask"], 0
    for L in LENGTHS:
        for t in range(start, start + L):
            trained = t + 1 < start + L and not bool(mask[t + 1])
            assert (logits.grad[t].abs().sum() > 0) == trained, t
        start += L

    # With the logits fixed, changing prompt tokens (labels that are masked) changes nothing.
    other = sft_batch(config.vocab_size, LENGTHS, PROMPTS)
    ids = other.data["packed_input_ids"]
    ids[mask] = (ids[mask] + 17) % config.vocab_size
    loss2, _ = SFTInterface.loss_fn(logits.detach(), other)
    assert float(loss2) == pytest.approx(float(loss.detach()), rel=1e-7)

    # An all-prompt micro-batch contributes a zero loss and zero gradient.
    all_prompt = sft_batch(config.vocab_size, [5, 3], [5, 3])
    lg = torch.randn(8, config.vocab_size, requires_grad=True)
    l0, _ = SFTInterface.loss_fn(lg, all_prompt)
    l0.backward()
    assert float(l0.detach()) == 0.0 and float(lg.grad.abs().sum()) == 0.0
    assert SFTInterface.loss_weight_fn(all_prompt) == 0


def test_train_step_equals_one_loss_over_the_batch():
    """Micro-batches weighted by answer tokens: the same step as one micro-batch."""
    config = tiny_config()
    sd = full_state(config)
    sample = sft_batch(config.vocab_size, LENGTHS, PROMPTS)
    results = []
    for n_mbs in (1, 3):
        model = whole_model(config, sd)
        with torch.no_grad():
            ref_loss = float(hand_nll(_logits(model, sample), sample))
        m = train_model(model)
        stats = SFTInterface().train_step(m, sample, MicroBatchSpec(n_mbs=n_mbs))
        assert stats["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert stats["ppl"] == pytest.approx(math.exp(ref_loss), rel=1e-5)
        assert stats["n_tokens"] == sum(n - p for n, p in zip(LENGTHS, PROMPTS))
        assert stats["n_seqs"] == len(LENGTHS)
        assert stats["grad_norm"] > 0 and stats["lr"] == pytest.approx(1e-2)
        assert m.version.global_step == 0  # the model worker advances versions
        results.append(model.flat_param.clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    return load_hf_tokenizer(tokenizer_path())


def test_loss_falls_on_embedded_sft_data_and_evaluate(tokenizer):
    util = DatasetUtility(seed=1, dp_rank=0, world_size=1, tokenizer=tokenizer)
    train = PromptAnswerDataset(util, max_length=96, dataset_path=dataset_path("sft-train"))
    valid = PromptAnswerDataset(util, max_length=96, dataset_path=dataset_path("sft-valid"))
    config = tiny_config(vocab_size=len(tokenizer), n_layers=2)
    model = Model("default", whole_model(config, full_state(config, std=0.02)), tokenizer=tokenizer)
    engine = TrainEngine(optimizer=optimizer(lr=1e-2), gradient_clipping=1.0)
    model = engine.initialize(model, FinetuneSpec(total_train_epochs=1, dataset_size=160, train_batch_size=8))
    iface = SFTInterface()

    small_valid = torch.utils.data.Subset(valid, range(24))
    before = iface.evaluate(model, packed_eval_dataloader(small_valid, batch_size=8))
    losses = []
    loader = PackedDataLoader(train, batch_size=8, seed=3)
    for step, batch in zip(range(20), loader):
        stats = iface.train_step(model, batch, MicroBatchSpec(n_mbs=2))
        assert all(math.isfinite(stats[k]) for k in ("loss", "ppl", "grad_norm", "lr", "n_tokens", "n_seqs"))
        losses.append(stats["loss"])
    after = iface.evaluate(model, packed_eval_dataloader(small_valid, batch_size=8))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    for ev in (before, after):
        assert math.isfinite(ev["loss"]) and ev["ppl"] == pytest.approx(math.exp(ev["loss"]))
        assert ev["n_seqs"] == 24 and ev["n_tokens"] > 0
    assert after["loss"] < before["loss"]
    assert iface.evaluate(model, None) == {}


def test_evaluate_is_token_weighted_over_batches():
    config = tiny_config()
    net = whole_model(config, full_state(config))
    sample = sft_batch(config.vocab_size, LENGTHS, PROMPTS)
    with torch.no_grad():
        expected = float(hand_nll(_logits(net, sample), sample))
    model = Model("default", net, tokenizer=None)
    got = SFTInterface().evaluate(model, packed_eval_dataloader(sample.unpack(), batch_size=2))
    assert got["loss"] == pytest.approx(expected, rel=1e-6)


def test_save_loads_in_transformers_and_is_atomic(tmp_path, monkeypatch, tokenizer):
    import transformers

    config = tiny_config()
    sd = full_state(config)
    net = whole_model(config, sd)
    target = tmp_path / "ckpt"
    SFTInterface(hf_family="llama").save(Model("default", net, tokenizer=tokenizer), str(target))
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(target)).eval()
    sample = sft_batch(config.vocab_size, [7], [2])
    with torch.no_grad():
        ref = _logits(net, sample)
        got = hf(sample.data["packed_input_ids"][None]).logits[0]
    assert float((got - ref).abs().max()) < 1e-4

    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(parallel_save, "save_hf_state_dict", broken)
    for dst in (target, tmp_path / "fresh"):
        with pytest.raises(OSError, match="injected"):
            parallel_save.save_hf_checkpoint(net, "llama", tokenizer, str(dst))
    assert not (tmp_path / "fresh").exists()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary leftovers
