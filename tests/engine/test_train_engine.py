"""Training/inference engines: LR schedules, dp and ZeRO-1 equivalence,
gradient accumulation, and micro-batched inference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import FinetuneSpec, MicroBatchSpec, Model, get_hf_family, make_backend
from realhf.base.testing import run_distributed
from realhf.impl.model.backend import OptimizerConfig, TrainEngine, make_lr_lambda
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

LENGTHS = [7, 3, 12, 5, 9, 4]
SPEC = FinetuneSpec(total_train_epochs=1, dataset_size=100, train_batch_size=10)


# --------------------------------------------------------------- schedules
def _cfg(**kw) -> OptimizerConfig:
    return OptimizerConfig(type="adam", **kw)


def test_constant_schedule_with_warmup():
    f = make_lr_lambda(100, _cfg(lr_scheduler_type="constant", warmup_steps_proportion=0.1))
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == f(50) == f(200) == 1.0


def test_linear_schedule():
    f = make_lr_lambda(110, _cfg(lr_scheduler_type="linear", warmup_steps_proportion=10 / 110, min_lr_ratio=0.2))
    assert f(0) == pytest.approx(0.1)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.2 + 0.8 * 0.5)
    assert f(110) == pytest.approx(0.2) and f(500) == pytest.approx(0.2)


def test_cosine_schedule():
    f = make_lr_lambda(100, _cfg(lr_scheduler_type="cosine", warmup_steps_proportion=0.0, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(1.0)
    assert f(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)


@pytest.mark.parametrize("field,value", [("lr_scheduler_type", "step"), ("beta1", 1.0), ("eps", 0.0),
                                         ("min_lr_ratio", 1.5), ("warmup_steps_proportion", -0.1),
                                         ("type", "sgd"), ("lr", -1.0)])
def test_optimizer_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        OptimizerConfig(**{field: value})


# ------------------------------------------------------------------ helpers
def _model(seed: int = 0, dtype=torch.float32) -> ReaLModel:
    cfg = dataclasses.replace(get_hf_family("llama").real_config_maker(), n_layers=1)
    torch.manual_seed(seed)
    m = ReaLModel(cfg, dtype=dtype).instantiate()
    m.init_weights(std=0.2, seed=seed)
    return m


def _sample(lengths=LENGTHS, seed: int = 1, ids_from: int = 0) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 128, (sum(lengths),), generator=g)
    return SequenceSample.from_default(lengths, list(range(ids_from, ids_from + len(lengths))),
                                       {"packed_input_ids": toks})


def _halves(sample: SequenceSample):
    items = sample.unpack()
    k = len(items) // 2
    return SequenceSample.gather(items[:k]), SequenceSample.gather(items[k:])


def _lm_loss(logits: torch.Tensor, mb: SequenceSample):
    ids, cu, _ = packed_inputs(mb)
    lp = gather_packed_shifted_log_probs(logits, cu, ids)
    return -lp.mean(), {"n_tokens": float(lp.numel())}


def _predicted_tokens(mb: SequenceSample) -> float:
    return float(sum(n - 1 for item in mb.seqlens["packed_input_ids"] for n in item))


def _engine(model: ReaLModel, **kw) -> Model:
    opt = OptimizerConfig(type="adam", lr=1e-2, lr_scheduler_type="constant", warmup_steps_proportion=0.0,
                          weight_decay=0.1)
    backend = TrainEngine(optimizer=opt, **kw)
    return backend.initialize(Model("actor@0", model, tokenizer=None), SPEC)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ----------------------------------------------------------- training runs
def _dp_worker(rank: int, world_size: int):
    local = _halves(_sample())[rank]
    m = _engine(_model(), bucket_size=1000)
    stats = m.module.train_batch(local, MicroBatchSpec(n_mbs=2), _lm_loss, _predicted_tokens)
    # ZeRO-1 vs plain dp over 3 steps, same data.
    runs = {}
    for zero in (False, True):
        e = _engine(_model(seed=3), use_zero_optimization=zero)
        for step in range(3):
            data = _halves(_sample(seed=10 + step))[rank]
            e.module.train_batch(data, MicroBatchSpec(n_mbs=1), _lm_loss, _predicted_tokens)
        runs[zero] = e.module.module.flat_param.clone()
    return m.module.module.flat_param.clone(), stats, runs[False], runs[True]


def test_dp_and_zero_match_single_process():
    ref = _engine(_model(), bucket_size=1000)
    ref_stats = ref.module.train_batch(_sample(), MicroBatchSpec(n_mbs=1), _lm_loss, _predicted_tokens)
    results = run_distributed(_dp_worker, 2, timeout=60)
    ref_flat = ref.module.module.flat_param
    for flat, stats, plain, zero in results:
        assert _rel(flat, ref_flat) < 1e-5
        assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
        assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-4)
        assert stats["lr"] == pytest.approx(1e-2)
        assert _rel(zero, plain) < 1e-6
    # Ranks agree exactly after the all-gather.
    assert torch.equal(results[0][3], results[1][3])
    assert not torch.equal(results[0][2], _model(seed=3).flat_param)


def _dp_links_worker(rank: int, world_size: int):
    from realhf.impl.model.comm import global_comm
    from realhf.impl.model.comm.local_links import LocalLinks

    links = LocalLinks.connect()
    flats, big_all_reduces, gloo_gathers = {}, {}, {}
    plain_all_reduce, plain_all_gather = torch.distributed.all_reduce, torch.distributed.all_gather

    def counting_all_reduce(t, *args, **kw):
        big_all_reduces[key] += int(t.numel() > 1000)  # gradient buckets, not statistics
        return plain_all_reduce(t, *args, **kw)

    def counting_all_gather(parts, t, *args, **kw):
        gloo_gathers[key] += 1
        return plain_all_gather(parts, t, *args, **kw)

    torch.distributed.all_reduce, torch.distributed.all_gather = counting_all_reduce, counting_all_gather
    shards = {}  # (numel, shard size, whether the last gradient sum was a reduce-scatter)
    for key in [(zero, use_links) for zero in (False, True) for use_links in (False, True)]:
        big_all_reduces[key] = gloo_gathers[key] = 0
        global_comm.set_local_links(links if key[1] else None)
        e = _engine(_model(seed=3), use_zero_optimization=key[0])
        for step in range(3):
            e.module.train_batch(_halves(_sample(seed=10 + step))[rank], MicroBatchSpec(n_mbs=1), _lm_loss,
                                 _predicted_tokens)
        flats[key] = e.module.module.flat_param.clone()
        shards[key] = (e.module.numel, e.module.shard, e.module._sharded_grads)
    torch.distributed.all_reduce, torch.distributed.all_gather = plain_all_reduce, plain_all_gather
    global_comm.set_local_links(None)
    return links is not None, flats, big_all_reduces, gloo_gathers, shards


def test_dp_gradient_sum_over_local_links_equals_torch_distributed():
    """Workers of one host average gradients (and, with ZeRO, gather the updated shards) over
    their sockets: bit for bit the gloo result."""
    results = run_distributed(_dp_links_worker, 2, timeout=60)
    for linked, flats, big_all_reduces, gloo_gathers, shards in results:
        assert linked
        for zero in (False, True):
            assert torch.equal(flats[(zero, True)], flats[(zero, False)]), zero
            assert big_all_reduces[(zero, False)] >= 3 and big_all_reduces[(zero, True)] == 0
        assert gloo_gathers[(True, False)] == 3 and gloo_gathers[(True, True)] == 0
        assert shards[(True, True)][0] == 2 * shards[(True, True)][1]  # equal shards: the in-place gather
        # ZeRO over the links sums each rank's shard only (a reduce-scatter); gloo all-reduces.
        assert shards[(True, True)][2] and not shards[(True, False)][2] and not shards[(False, True)][2]
    assert torch.equal(results[0][1][(True, True)], results[1][1][(True, True)])
    assert not torch.equal(results[0][1][(False, True)], _model(seed=3).flat_param)


def test_grad_accumulation_matches_one_micro_batch():
    flats = []
    for n_mbs in (1, 3):
        m = _engine(_model())
        m.module.train_batch(_sample(), MicroBatchSpec(n_mbs=n_mbs), _lm_loss, _predicted_tokens)
        flats.append(m.module.module.flat_param.clone())
    assert _rel(flats[1], flats[0]) < 1e-5


def test_grads_live_in_flat_buffer_and_loss_falls():
    m = _engine(_model())
    eng = m.module
    data = _sample()
    losses = [eng.train_batch(data, MicroBatchSpec(n_mbs=2), _lm_loss)["loss"] for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0]
    fg = eng.flat_grad
    for p in eng.module.parameters():
        assert p.grad.untyped_storage().data_ptr() == fg.untyped_storage().data_ptr()
    assert eng.step_count == 10


def test_bf16_params_keep_fp32_master():
    m = _engine(_model(dtype=torch.bfloat16))
    eng = m.module
    before = eng.module.flat_param.clone()
    stats = eng.train_batch(_sample(), MicroBatchSpec(n_mbs=2), _lm_loss)
    assert eng.master.dtype == torch.float32 and eng.module.flat_param.dtype == torch.bfloat16
    assert torch.equal(eng.module.flat_param, eng.master.to(torch.bfloat16))
    assert not torch.equal(before, eng.module.flat_param) and math.isfinite(stats["grad_norm"])


# ---------------------------------------------------------------- inference
@pytest.mark.parametrize("mb_spec", [MicroBatchSpec(n_mbs=3), MicroBatchSpec(n_mbs=2, max_tokens_per_mb=16)])
def test_inference_micro_batches_match_one(mb_spec):
    backend = make_backend("inference")
    m = backend.initialize(Model("ref@0", _model(), tokenizer=None), SPEC)
    data = _sample()
    full = m.module.forward(data, MicroBatchSpec())
    split = m.module.forward(data, mb_spec)
    assert full.shape == (sum(LENGTHS), 128)
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)

    def hook(logits, mb):
        ids, cu, _ = packed_inputs(mb)
        return gather_packed_shifted_log_probs(logits, cu, ids)

    lp_full = m.module.forward(data, MicroBatchSpec(), post_hook=hook)
    lp_split = m.module.forward(data, mb_spec, post_hook=hook)
    assert lp_full.shape == (sum(LENGTHS) - len(LENGTHS),)
    torch.testing.assert_close(lp_split, lp_full, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in m.module.module.parameters())
