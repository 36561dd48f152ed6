"""Training engine: fp16 loss scaling, exact resume from saved state, checkpointing flag."""

from __future__ import annotations

import os

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.model_api import MicroBatchSpec, Model
from realhf.base.testing import run_distributed
from realhf.impl.model.backend import OptimizerConfig, TrainEngine
from realhf.impl.model.backend.loss_scaler import DynamicLossScaler

from tests.engine.test_train_engine import SPEC, _halves, _lm_loss, _model, _predicted_tokens, _sample


def _engine(model, **kw) -> Model:
    opt = OptimizerConfig(type="adam", lr=1e-2, lr_scheduler_type="cosine", warmup_steps_proportion=0.2,
                          weight_decay=0.1)
    return TrainEngine(optimizer=opt, **kw).initialize(Model("actor@0", model, tokenizer=None), SPEC)


def _step(m: Model, seed: int, data=None):
    data = data if data is not None else _sample(seed=seed)
    return m.module.train_batch(data, MicroBatchSpec(n_mbs=2), _lm_loss, _predicted_tokens)


# ------------------------------------------------------------ loss scaling
def test_loss_scaler_backoff_and_growth():
    s = DynamicLossScaler(scale=1024.0, growth_interval=2, min_scale=256.0)
    s.update(True)
    assert s.scale == 512.0
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0
    for _ in range(5):
        s.update(True)
    assert s.scale == 256.0
    with pytest.raises(ValueError, match="initial loss scale"):
        DynamicLossScaler(scale=0.0)


def test_fp16_overflow_skips_step_then_trains_like_fp32():
    fp16 = _engine(_model(dtype=torch.float16), initial_loss_scale=2.0 ** 24, loss_scale_window=1000)
    eng = fp16.module
    before = eng.module.flat_param.clone()
    first = _step(fp16, seed=10)
    # 2^24 times a loss of ~5 overflows fp16 gradients: nothing moves, the scale halves.
    assert first["skipped_step"] == 1.0 and first["loss_scale"] == 2.0 ** 24
    assert torch.equal(eng.module.flat_param, before) and eng.step_count == 0
    assert eng.scaler.scale == 2.0 ** 23

    ref = _engine(_model())
    ref_losses, losses, norms, ref_norms = [], [], [], []
    for seed in range(10, 22):
        stats = _step(fp16, seed)
        if stats["skipped_step"] == 0.0:
            ref_stats = _step(ref, seed)
            losses.append(stats["loss"])
            ref_losses.append(ref_stats["loss"])
            norms.append(stats["grad_norm"])
            ref_norms.append(ref_stats["grad_norm"])
    assert len(losses) >= 4, "the scale should come down to a usable value within a few steps"
    assert eng.master.dtype == torch.float32
    # Same trajectory as fp32 up to fp16 rounding.
    for a, b in zip(losses, ref_losses):
        assert a == pytest.approx(b, rel=2e-2)
    # Gradients are unscaled before the norm (Adam alone would hide a scale error).
    for a, b in zip(norms, ref_norms):
        assert a == pytest.approx(b, rel=5e-2)
    assert losses[-1] < losses[0]


def test_loss_scale_options_validated():
    with pytest.raises(ValueError, match="initial_loss_scale"):
        TrainEngine(initial_loss_scale=-1.0)
    with pytest.raises(ValueError, match="loss_scale_window"):
        TrainEngine(loss_scale_window=0)


# ------------------------------------------------------------------ resume
def test_resume_from_saved_state_is_exact(tmp_path):
    straight = _engine(_model())
    for seed in range(4):
        _step(straight, seed)

    first = _engine(_model())
    for seed in range(2):
        _step(first, seed)
    TrainEngine().save(first, str(tmp_path))
    weights = first.module.module.flat_param.clone()

    model = _model(seed=5)  # different init: everything must come from the saved state
    with torch.no_grad():
        model.flat_param.copy_(weights)
    resumed = _engine(model)
    TrainEngine().load(resumed, str(tmp_path))
    assert resumed.module.step_count == 2
    for seed in range(2, 4):
        _step(resumed, seed)
    assert torch.equal(resumed.module.module.flat_param, straight.module.module.flat_param)
    assert not any(n.endswith(".tmp") or ".tmp." in n for n in os.listdir(tmp_path))


def _zero_resume_worker(rank: int, world: int, path: str):
    def run(steps, m):
        for seed in steps:
            _step(m, seed, data=_halves(_sample(seed=seed))[rank])

    straight = _engine(_model(), use_zero_optimization=True)
    run(range(3), straight)
    first = _engine(_model(), use_zero_optimization=True)
    run(range(1), first)
    engine = TrainEngine(use_zero_optimization=True)
    engine.save(first, path)
    model = _model(seed=7)
    with torch.no_grad():
        model.flat_param.copy_(first.module.module.flat_param)
    resumed = _engine(model, use_zero_optimization=True)
    engine.load(resumed, path)
    run(range(1, 3), resumed)
    # Loading a ZeRO shard into an engine without ZeRO must fail loudly.
    plain = _engine(_model())
    try:
        engine.load(plain, path)
        mismatch = None
    except (ValueError, FileNotFoundError) as e:
        mismatch = str(e)
    return (torch.equal(resumed.module.module.flat_param, straight.module.module.flat_param),
            sorted(os.listdir(path)), mismatch)


@pytest.mark.distributed
def test_zero_resume_is_exact_per_shard(tmp_path):
    results = run_distributed(_zero_resume_worker, 2, timeout=60, args=(str(tmp_path),))
    for equal, files, mismatch in results:
        assert equal
        assert files == ["engine_state_pp0_tp0_dp0.pt", "engine_state_pp0_tp0_dp1.pt"]
        assert mismatch is not None and "layout" in mismatch


def test_load_with_other_layout_names_it(tmp_path):
    m = _engine(_model())
    TrainEngine().save(m, str(tmp_path))
    state = torch.load(tmp_path / "engine_state_pp0_tp0_dp0.pt")
    state["layout"]["numel"] += 1
    torch.save(state, tmp_path / "engine_state_pp0_tp0_dp0.pt")
    with pytest.raises(ValueError, match="saved with layout"):
        TrainEngine().load(_engine(_model()), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="same parallel layout"):
        TrainEngine().load(_engine(_model()), str(tmp_path / "missing"))


# ------------------------------------------------------ checkpointing flag
def test_gradient_checkpointing_option_recomputes_and_matches():
    plain = _engine(_model())
    ckpt = _engine(_model(), gradient_checkpointing=True)
    assert ckpt.module.module.gradient_checkpointing and not plain.module.module.gradient_checkpointing
    for seed in range(2):
        a, b = _step(plain, seed), _step(ckpt, seed)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert torch.allclose(plain.module.module.flat_param, ckpt.module.module.flat_param, rtol=1e-5, atol=1e-6)
