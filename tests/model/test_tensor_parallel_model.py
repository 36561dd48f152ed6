"""Tensor-parallel ReaLModel (tp=2) against the single-process model."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

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
    KV,
    REP,
    merge_state_dicts,
    param_kind,
    partition_state_dict,
    shard_config,
)
from realhf.impl.model.parallelism.tensor_parallel.cross_entropy import vocab_parallel_packed_shifted_log_probs
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

from _tp_helpers import LENGTHS, cached_decode_logits, full_model, packed_batch

TP = 2
ATOL = RTOL = 1e-5
SCOPE = "tp_real_model"


def _config(name: str) -> ReaLModelConfig:
    if name == "llama":
        return get_hf_family("llama").real_config_maker()
    if name == "qwen2":
        return get_hf_family("qwen2").real_config_maker()
    if name == "llama_mqa":
        return dataclasses.replace(get_hf_family("llama").real_config_maker(), n_kv_heads=1)
    if name == "gpt2":
        return get_hf_family("gpt2").real_config_maker()
    raise KeyError(name)


def _run(model: ReaLModel, ids, cu, w, group=None) -> Dict[str, Any]:
    """Forward + backward of log-probs and a weighted sum of full logits."""
    model.zero_grad(set_to_none=True)
    max_len = max(LENGTHS)
    if model.tp_size == 1:
        logits = model(ids, cu, max_len)
        lp = gather_packed_shifted_log_probs(logits, cu, ids)
        full = logits
    else:
        shard = model(ids, cu, max_len)
        full = model(ids, cu, max_len, gather_logits=True)
        lp = vocab_parallel_packed_shifted_log_probs(shard, cu, ids, group)
    loss = lp.sum() + 0.1 * (full * w).sum()
    loss.backward()
    grads = {k: model.get_param(k).grad.detach().clone() for k in model.param_spec}
    return {"logits": full.detach(), "lp": lp.detach(), "grads": grads}


def _worker(rank: int, world_size: int, name: str, use_scope: bool) -> Dict[str, Any]:
    import torch.distributed as dist

    config = _config(name)
    full = full_model(config)
    full_sd = {k: v.clone() for k, v in full.state_dict().items()}
    if use_scope:
        constants.reset()
        global_comm.clear_group_cache()
        topo = PipeDataModelParallelTopology(1, 1, TP)
        global_comm.setup_global_comm({SCOPE: ModelParallelLayout(topo, list(range(world_size)))})
        with constants.model_scope(SCOPE):
            model = ReaLModel(config).instantiate(init=False)
            group = constants.tensor_parallel_group()
    else:
        model = ReaLModel(config, tp_size=TP, tp_rank=rank).instantiate(init=False)
        group = dist.group.WORLD
    assert model.tp_size == TP and model.tp_rank == rank
    assert model.flat_size < full.flat_size
    model.load_state_dict(full_sd)  # unsplit tensors are partitioned
    model.eval()
    ids, cu, w = packed_batch(config.vocab_size)
    if use_scope:
        with constants.model_scope(SCOPE):
            out = _run(model, ids, cu, w, group)
            shard_logits = model(ids, cu, max(LENGTHS)).detach()
    else:
        out = _run(model, ids, cu, w, group)
        shard_logits = model(ids, cu, max(LENGTHS)).detach()
    out["shard_logits"] = shard_logits
    out["sd"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["ref"] = _run(full, ids, cu, w)
    out["full_sd"] = full_sd
    return out


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    torch.testing.assert_close(
        actual, expected, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{name}: {m}"
    )


@pytest.mark.parametrize(
    "name,use_scope",
    [("llama", True), ("qwen2", False), ("llama_mqa", False), ("gpt2", False)],
)
def test_tp_model_matches_single_process(name: str, use_scope: bool):
    config = _config(name)
    outs: List[Dict[str, Any]] = run_distributed(_worker, TP, timeout=60, args=(name, use_scope))
    ref = outs[0]["ref"]
    vocab_shard = config.vocab_size // TP
    for r, out in enumerate(outs):
        _close(f"rank{r} logits", out["logits"], ref["logits"])
        _close(f"rank{r} shard", out["shard_logits"], ref["logits"][:, r * vocab_shard : (r + 1) * vocab_shard])
        _close(f"rank{r} log-probs", out["lp"], ref["lp"])
    # Replicated parameters get complete, identical gradients on every rank.
    for k, g in ref["grads"].items():
        if param_kind(k, config) == REP or (param_kind(k, config) == KV and config.n_kv_heads % TP):
            _close(f"replicated grad {k}", outs[1]["grads"][k], outs[0]["grads"][k])
    merged = merge_state_dicts([o["grads"] for o in outs], config)
    assert set(merged) == set(ref["grads"])
    for k, g in ref["grads"].items():
        # fp32 sums run in a different order; gradients reach O(10).
        _close(f"grad {k}", merged[k], g, scale=max(1.0, float(g.abs().max())))
    # The loaded shards are exactly the partition, and merge back to the full weights.
    full_sd = outs[0]["full_sd"]
    for r, out in enumerate(outs):
        part = partition_state_dict(full_sd, config, TP, r)
        for k, v in part.items():
            assert torch.equal(out["sd"][k], v), k
    merged_sd = merge_state_dicts([o["sd"] for o in outs], config)
    for k, v in full_sd.items():
        assert torch.equal(merged_sd[k], v), k


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_mqa", "gpt2"])
def test_partition_merge_round_trip(name: str):
    config = _config(name)
    full = full_model(config).state_dict()
    local = shard_config(config, TP)
    shards = [partition_state_dict(full, config, TP, r) for r in range(TP)]
    shapes = dict(ReaLModel(config, tp_size=TP, tp_rank=0).param_spec)
    for k, v in shards[1].items():
        assert tuple(v.shape) == shapes[k].shape, k
    merged = merge_state_dicts(shards, config)
    assert set(merged) == set(full)
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    assert local.n_q_heads == config.n_q_heads // TP


def test_shard_model_single_rank_tp1_unchanged():
    config = _config("llama")
    assert shard_config(config, 1) is config
    model = ReaLModel(config)
    assert model.tp_size == 1 and model.flat_size == ReaLModel(config, tp_size=1, tp_rank=0).flat_size


def test_vocab_not_divisible_fails():
    config = dataclasses.replace(_config("llama"), vocab_size=127)
    with pytest.raises(ValueError, match="vocab_size=127"):
        ReaLModel(config, tp_size=2, tp_rank=0)


def _cache_worker(rank: int, world_size: int, name: str) -> List[torch.Tensor]:
    """Prefill then two decode steps, returning gathered logits of each step."""
    config = _config(name)
    full = full_model(config)
    model = ReaLModel(config, tp_size=TP, tp_rank=rank).instantiate(init=False)
    model.load_state_dict(full.state_dict())
    model.eval()
    ids, cu, _ = packed_batch(config.vocab_size)
    outs = [cached_decode_logits(m, ids, cu, config.vocab_size) for m in (model, full)]
    return outs


@pytest.mark.parametrize("name", ["qwen2", "llama_mqa"])
def test_tp_kv_cache_decoding(name: str):
    for r, (tp_out, ref) in enumerate(run_distributed(_cache_worker, TP, timeout=60, args=(name,))):
        _close(f"rank{r} cached logits", tp_out, ref)
