"""Sequence parallelism (tp=2) against tp=2 without it and the single-process model.

The packed batch has an odd number of tokens, so the padding to a multiple
of the tensor-parallel size is exercised everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.model_api import ReaLModelConfig, get_hf_family
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.comm import global_comm
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.tp_partition import (
    REP,
    merge_state_dicts,
    param_kind,
    sequence_parallel_grad_keys,
)
from realhf.impl.model.parallelism.tensor_parallel.cross_entropy import vocab_parallel_packed_shifted_log_probs
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

from _tp_helpers import LENGTHS, cached_decode_logits, full_model, packed_batch

pytestmark = pytest.mark.distributed

TP = 2
ATOL = RTOL = 1e-5
SCOPE = "sp_real_model"


def _config(name: str) -> ReaLModelConfig:
    if name == "llama_critic":
        return dataclasses.replace(get_hf_family("llama").real_config_maker(), is_critic=True)
    if name == "gpt2_critic":
        return dataclasses.replace(get_hf_family("gpt2").real_config_maker(), is_critic=True, tied_embedding=False)
    return get_hf_family(name).real_config_maker()


def _loss(outs: Sequence[torch.Tensor], model: ReaLModel, ids, cu, w, group) -> torch.Tensor:
    """Log-probs plus a weighted sum of full logits (actor), or weighted values (critic)."""
    if model.config.is_critic:
        return (outs[0] * w[:, 0]).sum()
    shard, full = outs
    if model.tp_size == 1:
        lp = gather_packed_shifted_log_probs(full, cu, ids)
    else:
        lp = vocab_parallel_packed_shifted_log_probs(shard, cu, ids, group)
    return lp.sum() + 0.1 * (full * w).sum()


def _grads(models: Sequence[ReaLModel]) -> Dict[str, torch.Tensor]:
    grads = {}
    for m in models:
        m.reduce_sequence_parallel_grads()
        grads.update({k: m.get_param(k).grad.detach().clone() for k in m.param_spec})
    return grads


def _run(model: ReaLModel, ids, cu, w, group=None) -> Dict[str, Any]:
    model.zero_grad(set_to_none=True)
    outs = [model(ids, cu, max(LENGTHS))]
    if not model.config.is_critic:
        outs.append(model(ids, cu, max(LENGTHS), gather_logits=True))
    loss = _loss(outs, model, ids, cu, w, group)
    loss.backward()
    keys = [k for k in sequence_parallel_grad_keys(model.config) if k in model.param_spec]
    partial = {k: model.get_param(k).grad.detach().clone() for k in keys}
    return {"out": outs[-1].detach(), "loss": loss.detach(), "grads": _grads([model]), "partial": partial}


def _worker(rank: int, world_size: int, name: str, use_scope: bool) -> Dict[str, Any]:
    import torch.distributed as dist

    config = _config(name)
    full = full_model(config)
    ids, cu, w = packed_batch(config.vocab_size)
    if use_scope:
        constants.reset()
        global_comm.clear_group_cache()
        topo = PipeDataModelParallelTopology(1, 1, TP, sequence_parallel=True)
        global_comm.setup_global_comm({SCOPE: ModelParallelLayout(topo, list(range(world_size)))})
        with constants.model_scope(SCOPE):
            model = ReaLModel(config).instantiate(init=False)
            assert model.sequence_parallel
            model.load_state_dict(full.state_dict())
            model.eval()
            group = constants.tensor_parallel_group()
            sp = _run(model, ids, cu, w, group)
            model.sequence_parallel = False
            no_sp = _run(model, ids, cu, w, group)
    else:
        model = ReaLModel(config, tp_size=TP, tp_rank=rank).instantiate(init=False)
        assert not model.sequence_parallel
        model.load_state_dict(full.state_dict())
        model.eval()
        group = dist.group.WORLD
        no_sp = _run(model, ids, cu, w, group)
        model.sequence_parallel = True
        sp = _run(model, ids, cu, w, group)
    return {"sp": sp, "no_sp": no_sp, "ref": _run(full, ids, cu, w)}


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _check_grads(label: str, shards: List[Dict[str, torch.Tensor]], ref: Dict[str, torch.Tensor], config) -> None:
    for k in ref:
        if param_kind(k, config) == REP:
            _close(f"{label} replicated grad {k}", shards[1][k], shards[0][k])
    merged = merge_state_dicts(shards, config)
    assert set(merged) == set(ref)
    for k, g in ref.items():
        # fp32 sums run in a different order; gradients reach O(10).
        _close(f"{label} grad {k}", merged[k], g, scale=max(1.0, float(g.abs().max())))


@pytest.mark.parametrize(
    "name,use_scope",
    [("llama", True), ("qwen2", False), ("gpt2", False), ("llama_critic", False), ("gpt2_critic", True)],
)
def test_sequence_parallel_matches(name: str, use_scope: bool):
    config = _config(name)
    outs = run_distributed(_worker, TP, timeout=90, args=(name, use_scope))
    ref = outs[0]["ref"]
    for mode in ("sp", "no_sp"):
        for r, out in enumerate(outs):
            res = out[mode]
            assert res["out"].shape == ref["out"].shape
            _close(f"rank{r} {mode} output", res["out"], ref["out"])
            _close(f"rank{r} {mode} loss", res["loss"], ref["loss"], scale=max(1.0, float(ref["loss"].abs())))
        _check_grads(mode, [o[mode]["grads"] for o in outs], ref["grads"], config)
    for r, out in enumerate(outs):
        _close(f"rank{r} sp vs no-sp", out["sp"]["out"], out["no_sp"]["out"])
    # SP really ran: before the reduction each rank held only its tokens' share.
    partial = [o["sp"]["partial"] for o in outs]
    assert partial[0]
    for k, g in partial[0].items():
        assert not torch.allclose(g, outs[0]["sp"]["grads"][k]), k
        _close(f"partial {k}", g + partial[1][k], outs[0]["sp"]["grads"][k], scale=10.0)


def test_sequence_parallel_grad_keys():
    llama = _config("llama")
    assert sequence_parallel_grad_keys(llama) == [
        "1.attn.c_attn.ln.weight",
        "1.mlp.ln.weight",
        "2.attn.c_attn.ln.weight",
        "2.mlp.ln.weight",
        "2.ln_f.weight",
    ]
    gpt2 = _config("gpt2")
    keys = sequence_parallel_grad_keys(gpt2)
    assert "0.wpe.weight" in keys and "1.attn.c_proj.bias" in keys and "2.mlp.c_proj.bias" in keys
    assert "2.ln_f.bias" in keys and "0.wte.weight" not in keys
    critic = _config("gpt2_critic")
    assert f"{critic.n_layers + 1}.weight" not in sequence_parallel_grad_keys(critic)


def test_sequence_parallel_defaults_without_scope():
    model = ReaLModel(_config("llama"))
    assert model.sequence_parallel is False and model.gradient_checkpointing is False
    model = ReaLModel(_config("llama"), sequence_parallel=True, gradient_checkpointing=True)
    assert model.sequence_parallel and model.gradient_checkpointing
    model.reduce_sequence_parallel_grads()  # tp_size == 1: no-op


def _stages_worker(rank: int, world_size: int, name: str, splits: List[List[int]]) -> Dict[str, Any]:
    """The model split into stages, run one after another, SP on and off."""
    config = _config(name)
    full = full_model(config)
    ids, cu, w = packed_batch(config.vocab_size)
    res = {"ref": _run(full, ids, cu, w)}
    for sp in (False, True):
        stages = []
        for layers in splits:
            m = ReaLModel(config, layer_indices=layers, tp_size=TP, tp_rank=rank, sequence_parallel=sp)
            m.instantiate(init=False).load_state_dict(full.state_dict(), strict=False)
            stages.append(m.eval())
        x, hidden = None, []
        for i, m in enumerate(stages):
            kw = {"gather_logits": True} if m.has_head else {}
            x = m(ids if i == 0 else None, cu, max(LENGTHS), hidden_states=x, **kw)
            if not m.has_head:
                assert x.shape == (sum(LENGTHS), config.hidden_dim)
                hidden.append(x.detach())
        x.backward(w if not config.is_critic else w[:, 0])
        res[sp] = {"out": x.detach(), "hidden": hidden, "grads": _grads(stages)}
    full.zero_grad(set_to_none=True)
    (full(ids, cu, max(LENGTHS)) * (w if not config.is_critic else w[:, 0])).sum().backward()
    res["ref_grads"] = {k: full.get_param(k).grad.detach().clone() for k in full.param_spec}
    return res


@pytest.mark.parametrize(
    "name,splits",
    [("llama", [[0, 1], [2, 3]]), ("gpt2", [[0], [1, 2], [3]]), ("llama_critic", [[0, 1, 2], [3]])],
)
def test_sequence_parallel_pipeline_stages(name: str, splits: List[List[int]]):
    config = _config(name)
    outs = run_distributed(_stages_worker, TP, timeout=90, args=(name, splits))
    ref = outs[0]["ref"]
    for r, out in enumerate(outs):
        _close(f"rank{r} stages no-sp", out[False]["out"], ref["out"])
        _close(f"rank{r} stages sp", out[True]["out"], ref["out"])
        for i, (a, b) in enumerate(zip(out[True]["hidden"], out[False]["hidden"])):
            _close(f"rank{r} stage {i} hidden", a, b)
    for sp in (False, True):
        shards = [dict(o[sp]["grads"]) for o in outs]
        ref_grads = outs[0]["ref_grads"]
        if config.tied_embedding:
            # Split over stages, the tied embedding and head are separate copies
            # whose gradients sum to the tied one (pipeline code syncs them).
            head = f"{config.n_layers + 1}.weight"
            for s in shards:
                s["0.wte.weight"] = s["0.wte.weight"] + s.pop(head)
            ref_grads = {k: g for k, g in ref_grads.items() if k != head}
        _check_grads(f"stages sp={sp}", shards, ref_grads, config)


def _cache_worker(rank: int, world_size: int, name: str) -> List[torch.Tensor]:
    """Prefill then two decode steps with SP requested: it must be ignored."""
    config = _config(name)
    full = full_model(config)
    model = ReaLModel(config, tp_size=TP, tp_rank=rank, sequence_parallel=True).instantiate(init=False)
    model.load_state_dict(full.state_dict())
    model.eval()
    ids, cu, _ = packed_batch(config.vocab_size)
    outs = [cached_decode_logits(m, ids, cu, config.vocab_size) for m in (model, full)]
    with torch.no_grad():
        # Without a cache the same model does use SP, with the same prefill logits.
        outs.append(model(ids, cu, max(LENGTHS), gather_logits=True))
    return outs


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_sequence_parallel_ignored_with_kv_cache(name: str):
    for r, (tp_out, ref, no_cache) in enumerate(run_distributed(_cache_worker, TP, timeout=90, args=(name,))):
        _close(f"rank{r} cached logits", tp_out, ref)
        _close(f"rank{r} sp prefill", no_cache, ref[: sum(LENGTHS)])
