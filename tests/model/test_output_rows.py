"""``output_rows``: a forward that computes the outputs of some rows only (the last
block's output projection, MLP and the head skip the others) gives those rows of the
full forward, and the same gradients for a loss that reads only them; losses that use
it train exactly like the full-output losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import get_hf_family
from realhf.impl.model.nn.real_llm_api import ReaLModel

from tests.model.test_prefix_tree import grouped_batch


def _model(family: str, critic: bool = False, **overrides) -> ReaLModel:
    config = get_hf_family(family).real_config_maker()
    if critic:
        overrides.update(is_critic=True, tied_embedding=False)
    model = ReaLModel(dataclasses.replace(config, **overrides)).instantiate()
    model.init_weights(std=0.2, seed=0)
    return model.eval()


def _grads(model: ReaLModel, out: torch.Tensor, w: torch.Tensor):
    model.zero_grad(set_to_none=True)
    (out * w).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("critic", [False, True])
@pytest.mark.parametrize("layout", ["flat", "tree", "checkpointed"])
def test_rows_equal_the_full_forward(family, critic, layout):
    model = _model(family, critic)
    vocab = model.config.vocab_size
    ids, cu = grouped_batch(vocab, [9, 5, 12], 3, (2, 7))  # consecutive shared prompts: the tree applies
    model.share_prefixes = layout == "tree"
    if layout == "checkpointed":
        model.train()
        model.gradient_checkpointing = True
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.config = dataclasses.replace(model.config, attn_pdrop=0.0)
        for m in model.modules():
            if hasattr(m, "attn_drop"):
                m.attn_drop = 0.0
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(int(cu[-1]), generator=g)[:17]
    rows = torch.cat([rows, rows[:2]])  # a row asked twice comes back twice
    full = model(ids, cu)
    part = model(ids, cu, output_rows=rows)
    assert part.shape == (rows.numel(),) + full.shape[1:]
    torch.testing.assert_close(part, full[rows], atol=2e-5, rtol=1e-4)
    w = torch.randn(part.shape, generator=g)
    got = _grads(model, model(ids, cu, output_rows=rows), w)
    want = _grads(model, model(ids, cu)[rows], w)
    assert got.keys() == want.keys()
    scale = max(float(v.abs().max()) for v in want.values())
    for k in want:
        assert float((got[k] - want[k]).abs().max()) <= 1e-5 * max(float(want[k].abs().max()), 1e-2 * scale), k


def test_rows_skip_the_last_block_for_other_rows(monkeypatch):
    """The last block's MLP sees only the asked rows; earlier blocks see every row."""
    model = _model("llama")
    ids, cu = grouped_batch(model.config.vocab_size, [6, 4], 2, (3, 5))
    seen = []
    for block in [layer for layer in model.layers if hasattr(layer, "mlp")]:
        block.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    model.share_prefixes = False
    model(ids, cu, output_rows=torch.tensor([0, 3, 5]))
    n_blocks = model.config.n_layers
    assert seen == [int(cu[-1])] * (n_blocks - 1) + [3]


def _train_once(loss_builder, rows_path: bool):
    from realhf.impl.model.backend.optim import OptimizerConfig
    from realhf.impl.model.backend.train_engine import TrainModule
    from realhf.api.core.model_api import MicroBatchSpec

    net = _model("llama").train()
    engine = TrainModule(net, OptimizerConfig(lr=1e-2, warmup_steps_proportion=0.0), total_steps=2)
    sample, loss_fn = loss_builder(net.config.vocab_size, rows_path)
    assert hasattr(loss_fn, "output_rows") == rows_path
    stats = engine.train_batch(sample, MicroBatchSpec(n_mbs=2), loss_fn, lambda m: float(m.data["ppo_loss_mask"].sum()))
    return net.flat_param.detach().clone(), stats


def _ppo_batch(vocab: int, rows_path: bool):
    from realhf.impl.model.interface.common import shifted_answer_mask
    from realhf.impl.model.interface.ppo_interface import masked_logprobs_loss
    from realhf.impl.model.utils import ppo_functional as F
    from realhf.impl.model.utils.functional import shifted_label_indices

    ids, cu = grouped_batch(vocab, [7, 4, 9], 2, (3, 6), seed=4)
    lens = (cu[1:] - cu[:-1]).tolist()
    prompt = torch.zeros(int(cu[-1]), dtype=torch.bool)
    for i, p in enumerate([7, 7, 4, 4, 9, 9]):
        prompt[int(cu[i]):int(cu[i]) + p] = True
    mask = shifted_answer_mask(prompt, cu)
    n = int(shifted_label_indices(cu)[0].numel())
    g = torch.Generator().manual_seed(5)
    sample = SequenceSample.from_default(lens, list(range(len(lens))), {
        "packed_input_ids": ids, "ppo_loss_mask": mask, "old_logp": -torch.rand(n, generator=g) * 5,
        "advantages": torch.randn(n, generator=g)})

    def loss_of_logp(logp, mb):
        return F.actor_loss(logp, mb.data["old_logp"], mb.data["advantages"], 0.2, mb.data["ppo_loss_mask"])

    # tp_size > 1 takes the full-output path (the model here has no tensor parallelism).
    return sample, masked_logprobs_loss(loss_of_logp, "ppo_loss_mask", vocab, 1.0, 0, 1 if rows_path else 2)


def test_actor_loss_on_loss_rows_trains_like_the_full_output():
    flat_rows, stats_rows = _train_once(_ppo_batch, True)
    flat_full, stats_full = _train_once(_ppo_batch, False)
    assert stats_rows["loss"] == pytest.approx(stats_full["loss"], rel=1e-5, abs=1e-7)
    assert stats_rows["grad_norm"] == pytest.approx(stats_full["grad_norm"], rel=1e-4)
    torch.testing.assert_close(flat_rows, flat_full, atol=1e-6, rtol=1e-5)
