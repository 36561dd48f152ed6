"""Gradient checkpointing gives the same loss and gradients as a plain backward.

Single process and tp=2 with sequence parallelism; dropout-free configs only
(checkpoint's RNG handling is torch's concern).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.model_api import ReaLModelConfig, get_hf_family
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.comm import global_comm
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_base import TransformerBlock
from realhf.impl.model.nn.tp_partition import merge_state_dicts

from _tp_helpers import LENGTHS, full_model, packed_batch

TP = 2
EXACT = 1e-6
SCOPE = "ckpt_real_model"


def _config(name: str) -> ReaLModelConfig:
    config = get_hf_family(name).real_config_maker()
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    return config


class _NormCalls:
    """Counts forward calls of every block's MLP norm (run again in recompute)."""

    def __init__(self, model: ReaLModel):
        self.n = 0
        for layer in model.layers:
            if isinstance(layer, TransformerBlock):
                layer.mlp.ln.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _run(model: ReaLModel, ckpt: bool, ids, cu, w) -> Dict[str, Any]:
    model.gradient_checkpointing = ckpt
    model.zero_grad(set_to_none=True)
    calls = _NormCalls(model)
    logits = model(ids, cu, max(LENGTHS), gather_logits=True)
    loss = (logits.log_softmax(-1) * w).sum()
    forward_calls = calls.n
    loss.backward()
    model.reduce_sequence_parallel_grads()
    return {
        "loss": loss.detach(),
        "grads": {k: model.get_param(k).grad.detach().clone() for k in model.param_spec},
        "recomputed": calls.n - forward_calls,
    }


def _assert_same(a: Dict[str, Any], b: Dict[str, Any], atol: float = EXACT) -> None:
    torch.testing.assert_close(a["loss"], b["loss"], atol=atol, rtol=atol)
    assert set(a["grads"]) == set(b["grads"])
    for k in a["grads"]:
        torch.testing.assert_close(a["grads"][k], b["grads"][k], atol=atol, rtol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_checkpointing_single_process(name: str):
    config = _config(name)
    model = full_model(config, train=True)
    ids, cu, w = packed_batch(config.vocab_size)
    plain = _run(model, False, ids, cu, w)
    ckpt = _run(model, True, ids, cu, w)
    assert plain["recomputed"] == 0 and ckpt["recomputed"] == config.n_layers
    _assert_same(ckpt, plain)


def test_checkpointing_off_in_eval_and_no_grad():
    config = _config("llama")
    model = full_model(config, train=True)
    model.gradient_checkpointing = True
    ids, cu, _ = packed_batch(config.vocab_size)
    calls = _NormCalls(model)
    with torch.no_grad():
        model(ids, cu, max(LENGTHS))
    model.eval()
    model(ids, cu, max(LENGTHS)).sum().backward()
    assert calls.n == 2 * config.n_layers  # no recomputation in either case


def _tp_worker(rank: int, world_size: int, name: str) -> Dict[str, Any]:
    config = _config(name)
    full = full_model(config, train=True)
    ids, cu, w = packed_batch(config.vocab_size)
    constants.reset()
    global_comm.clear_group_cache()
    topo = PipeDataModelParallelTopology(1, 1, TP, sequence_parallel=True, gradient_checkpointing=True)
    global_comm.setup_global_comm({SCOPE: ModelParallelLayout(topo, list(range(world_size)))})
    with constants.model_scope(SCOPE):
        model = ReaLModel(config).instantiate(init=False)
        assert model.sequence_parallel and model.gradient_checkpointing
        model.load_state_dict(full.state_dict())
        model.train()
        return {
            "ckpt": _run(model, True, ids, cu, w),
            "plain": _run(model, False, ids, cu, w),
            "ref": _run(full, False, ids, cu, w),
        }


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_checkpointing_tp_sequence_parallel(name: str):
    config = _config(name)
    outs = run_distributed(_tp_worker, TP, timeout=90, args=(name,))
    for out in outs:
        assert out["plain"]["recomputed"] == 0 and out["ckpt"]["recomputed"] == config.n_layers
        _assert_same(out["ckpt"], out["plain"])
    # And the tensor-parallel run matches the single process.
    ref = outs[0]["ref"]
    torch.testing.assert_close(outs[0]["plain"]["loss"], ref["loss"], atol=1e-4, rtol=1e-5)
    merged = merge_state_dicts([o["ckpt"]["grads"] for o in outs], config)
    for k, g in ref["grads"].items():
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(merged[k], g, atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{k}: {m}")
