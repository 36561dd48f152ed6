"""Hooks of model function calls on one world: pull from the train replica,
drop the copy, train, pull again, EMA into a frozen reference, offload it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.config import ModelName
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.dfg import OffloadHook, ParamReallocHook
from realhf.api.core.model_api import MicroBatchSpec, get_hf_family
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.backend.optim import OptimizerConfig
from realhf.impl.model.backend.train_engine import TrainModule
from realhf.impl.model.comm import global_comm
from realhf.impl.model.comm.realloc_hooks import Replica, empty_stage, run_hook
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.tp_partition import merge_state_dicts, partition_tensor
from realhf.impl.model.parallelism.tensor_parallel.cross_entropy import vocab_parallel_packed_shifted_log_probs

pytestmark = pytest.mark.distributed

ACTOR_TRAIN, ACTOR_GEN, REF = ModelName("actor", 0), ModelName("actor", 1), ModelName("ref", 0)
LENGTHS = [6, 4, 9, 5]


def _config():
    return dataclasses.replace(get_hf_family("qwen2").real_config_maker(), n_layers=3)


def _layouts():
    return {
        ACTOR_TRAIN: ModelParallelLayout(PipeDataModelParallelTopology(1, 2, 2), [0, 1, 2, 3]),  # dp2 x tp2
        ACTOR_GEN: ModelParallelLayout(PipeDataModelParallelTopology(1, 4, 1), [0, 1, 2, 3]),  # dp4
        REF: ModelParallelLayout(PipeDataModelParallelTopology(2, 1, 1), [2, 3]),  # pp2 on half the ranks
    }


def _full(seed: int):
    m = ReaLModel(_config()).instantiate(init=False)
    m.init_weights(std=0.2, seed=seed)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _load(replica: Replica, sd) -> None:
    m = replica.model
    m.instantiate(init=False)
    m.load_state_dict({k: partition_tensor(k, v, m.config, m.tp_size, m.tp_rank)
                       for k, v in sd.items() if k in m.param_spec})


def _sample():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (sum(LENGTHS),), generator=g)
    return SequenceSample.from_default(LENGTHS, list(range(len(LENGTHS))), {"packed_input_ids": ids})


def _loss(logits, mb):
    ids, cu, _ = packed_inputs(mb)
    lp = vocab_parallel_packed_shifted_log_probs(logits, cu, ids, constants.tensor_parallel_group())
    return -lp.mean(), {}


def _worker(rank, world):
    constants.reset()
    global_comm.clear_group_cache()
    layouts = _layouts()
    global_comm.setup_global_comm(layouts)
    config = _config()
    reps = {n: Replica(n, config, l, empty_stage(config, l, rank), trainable=(n == ACTOR_TRAIN))
            for n, l in layouts.items()}
    _load(reps[ACTOR_TRAIN], _full(0))
    if reps[REF].model is not None:
        _load(reps[REF], _full(1))
    out = {}
    gen = reps[ACTOR_GEN].model

    run_hook(ParamReallocHook(source=ACTOR_TRAIN), ACTOR_GEN, reps)
    out["gen_1"] = gen.flat_param.clone()
    out["train_kept"] = reps[ACTOR_TRAIN].model.instantiated
    run_hook(ParamReallocHook(target=ACTOR_TRAIN), ACTOR_GEN, reps)
    out["gen_dropped"] = not gen.instantiated

    # A real optimizer step on the train replica, then pull again.
    with constants.model_scope(ACTOR_TRAIN):
        trainer = TrainModule(reps[ACTOR_TRAIN].model, OptimizerConfig(lr=1e-2, warmup_steps_proportion=0.0),
                              total_steps=4)
        d = constants.data_parallel_rank()
        items = _sample().unpack()
        trainer.train_batch(SequenceSample.gather(items[2 * d:2 * d + 2]), MicroBatchSpec(n_mbs=1), _loss)
        out["train_after"] = {k: v.clone() for k, v in reps[ACTOR_TRAIN].model.state_dict().items()}
        out["coord"] = (constants.tensor_parallel_rank(), constants.data_parallel_rank())
    run_hook(ParamReallocHook(source=ACTOR_TRAIN), ACTOR_GEN, reps)
    out["gen_2"] = {k: v.clone() for k, v in gen.state_dict().items()}

    # Reference EMA after the train call, then offload the reference.
    out["ref_before"] = None if reps[REF].model is None else reps[REF].model.flat_param.clone()
    run_hook(ParamReallocHook(target=REF, eta=0.1), ACTOR_TRAIN, reps)
    if reps[REF].model is not None:
        ref = reps[REF].model
        out["ref_after"] = {k: v.clone() for k, v in ref.state_dict().items()}
        run_hook(OffloadHook(), REF, reps)
        out["ref_offloaded"] = not ref.instantiated
        ref.reload()
        out["ref_reload_equal"] = all(torch.equal(ref.get_param(k), v) for k, v in out["ref_after"].items())
    out["train_still"] = reps[ACTOR_TRAIN].model.instantiated
    return out


def test_hooks_pull_drop_train_pull_ema_offload():
    res = run_distributed(_worker, 4, timeout=120)
    config = _config()
    full0 = _full(0)
    # Pull: each dp4 rank holds the whole model, equal to the initial weights.
    flat0 = ReaLModel(config).instantiate(init=False)
    flat0.load_state_dict(full0)
    for r in res:
        assert torch.equal(r["gen_1"], flat0.flat_param)
        assert r["train_kept"] and r["gen_dropped"] and r["train_still"]
    # After training, merge the tp shards of dp rank 0 and compare with every gen rank.
    shards = {r["coord"][0]: r["train_after"] for r in res if r["coord"][1] == 0}
    trained = merge_state_dicts([shards[0], shards[1]], config)
    assert not torch.equal(trained["1.mlp.up_proj.weight"], full0["1.mlp.up_proj.weight"])
    for r in res:
        for k, v in r["gen_2"].items():
            assert torch.equal(v, trained[k]), k
    # EMA: ref = 0.1 * trained + 0.9 * old ref, on both pp stages.
    full1 = _full(1)
    for r in res[2:]:
        for k, v in r["ref_after"].items():
            torch.testing.assert_close(v, 0.1 * trained[k] + 0.9 * full1[k], rtol=0, atol=1e-7)
        assert r["ref_offloaded"] and r["ref_reload_equal"]


# --------------------------------------------------------------------------- #
# A replica lent the train buffer: the rank holding the same stage in both
# layouts shares the buffer (no copy), the others still receive their copy.
# --------------------------------------------------------------------------- #
def _lend_worker(rank, world):
    constants.reset()
    global_comm.clear_group_cache()
    layouts = {ACTOR_TRAIN: ModelParallelLayout(PipeDataModelParallelTopology(1, 1, 1), [0]),
               ACTOR_GEN: ModelParallelLayout(PipeDataModelParallelTopology(1, 2, 1), [0, 1]),
               REF: ModelParallelLayout(PipeDataModelParallelTopology(1, 1, 1), [0])}
    global_comm.setup_global_comm(layouts)
    config = _config()
    reps = {n: Replica(n, config, l, empty_stage(config, l, rank), trainable=(n == ACTOR_TRAIN))
            for n, l in layouts.items()}
    if rank == 0:
        _load(reps[ACTOR_TRAIN], _full(0))
        _load(reps[REF], _full(1))
    from realhf.impl.model.comm.local_links import LocalLinks

    links = LocalLinks.connect()
    out = {"linked": links is not None}
    gen = reps[ACTOR_GEN].model
    for share, use_links in ((True, False), (False, False), (True, True), (False, True)):
        stats = run_hook(ParamReallocHook(source=ACTOR_TRAIN), ACTOR_GEN, reps, share=share,
                         links=links if use_links else None)
        share = (share, use_links)
        out[share] = {"gen": gen.flat_param.clone(), "bytes_shared": stats["bytes_shared"],
                      "bytes_local": stats["bytes_local"], "bytes_sent": stats["bytes_sent"],
                      "same_buffer": rank == 0 and gen.flat_param.data_ptr() == reps[ACTOR_TRAIN].model.flat_param.data_ptr()}
        run_hook(ParamReallocHook(target=ACTOR_TRAIN), ACTOR_GEN, reps)
        out[share]["gen_dropped"] = not gen.instantiated
        if rank == 0:
            out[share]["train"] = reps[ACTOR_TRAIN].model.flat_param.clone()
    # A frozen source lent and freed: the destination keeps the weights.
    if rank == 0:
        ref_before = reps[REF].model.flat_param.clone()
    from realhf.impl.model.comm.param_realloc import reallocate
    stats = reallocate(config, layouts[REF], layouts[ACTOR_GEN], reps[REF].model, gen, free_source=True, share=True)
    out["frozen"] = {"gen": gen.flat_param.clone(), "ref_freed": rank != 0 or not reps[REF].model.instantiated,
                     "shared": stats["bytes_shared"] > 0,
                     "equal": rank != 0 or torch.equal(gen.flat_param, ref_before)}
    return out


def test_lent_replica_shares_the_train_buffer_on_the_same_stage():
    res = run_distributed(_lend_worker, 2, timeout=120)
    flat0 = ReaLModel(_config()).instantiate(init=False)
    flat0.load_state_dict(_full(0))
    flat1 = ReaLModel(_config()).instantiate(init=False)
    flat1.load_state_dict(_full(1))
    n_bytes = flat0.flat_param.numel() * 4
    cases = [(share, use_links) for share in (True, False) for use_links in (True, False)]
    for rank, r in enumerate(res):
        assert r["linked"]  # the copies to rank 1 went over the local socket in half the cases
        for case in cases:
            assert torch.equal(r[case]["gen"], flat0.flat_param) and r[case]["gen_dropped"]
        assert torch.equal(r["frozen"]["gen"], flat1.flat_param) and r["frozen"]["ref_freed"]
    r0, r1 = res
    # Rank 0 holds the stage in both layouts: shared when allowed, copied otherwise; it sends rank 1 a copy.
    for use_links in (True, False):
        shared, copied = r0[True, use_links], r0[False, use_links]
        assert shared["same_buffer"] and shared["bytes_shared"] == n_bytes and shared["bytes_local"] == 0
        assert not copied["same_buffer"] and copied["bytes_shared"] == 0 and copied["bytes_local"] == n_bytes
        assert shared["bytes_sent"] == copied["bytes_sent"] == n_bytes
        assert r1[True, use_links]["bytes_shared"] == 0
        # Handing the lent buffer back leaves the train replica untouched.
        assert torch.equal(shared["train"], flat0.flat_param) and torch.equal(copied["train"], flat0.flat_param)
    assert r0["frozen"]["shared"] and r0["frozen"]["equal"] and not r1["frozen"]["shared"]


def test_worker_lends_only_replicas_handed_back_after_every_call():
    from types import SimpleNamespace

    from realhf.system.model_worker import ModelWorkerCore

    def rpc(model, pre=(), post=()):
        return SimpleNamespace(model_name=model, pre_hooks=list(pre), post_hooks=list(post))

    pull, give_back = ParamReallocHook(source=ACTOR_TRAIN), ParamReallocHook(target=ACTOR_TRAIN)
    ema = ParamReallocHook(target=ACTOR_TRAIN, eta=0.5)

    def lent(*rpcs):
        return ModelWorkerCore._lent(SimpleNamespace(cfg=SimpleNamespace(model_rpcs=list(rpcs))), ACTOR_GEN, ACTOR_TRAIN)

    assert lent(rpc(ACTOR_GEN, [pull], [give_back]), rpc(ACTOR_TRAIN))
    assert not lent(rpc(ACTOR_GEN, [pull]))  # kept after the call: a snapshot, must be a copy
    assert not lent(rpc(ACTOR_GEN, [pull], [ema]))
    assert not lent(rpc(ACTOR_GEN, [pull], [give_back]), rpc(ACTOR_GEN))  # another call uses it without a pull
    assert not lent(rpc(ACTOR_TRAIN))
