"""The flat AdamW update and the gradient-norm sum against plain torch references."""

from __future__ import annotations

import pytest
import torch

import realhf.impl.model.backend.optim as optim
from realhf.api.quickstart.model import OptimizerConfig
from realhf.impl.model.backend.grad_sync import GradNormRanges

N = 50_000


def _run(fused: bool, cfg: OptimizerConfig, p0: torch.Tensor, mask=None, steps: int = 5, lr: float = 1e-3):
    old = optim._HAS_FUSED_ADAMW
    optim._HAS_FUSED_ADAMW = fused and old
    try:
        opt = optim.FlatAdamW(p0.clone(), cfg, decay_mask=mask)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            opt.step(torch.randn(N, generator=gen), lr)
    finally:
        optim._HAS_FUSED_ADAMW = old
    return opt


@pytest.mark.parametrize("fused", [False, True])
def test_flat_adamw_equals_torch_adamw(fused):
    cfg = OptimizerConfig(weight_decay=0.05, beta1=0.9, beta2=0.95, eps=1e-5)
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.Parameter(p0.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        ref.grad = torch.randn(N, generator=gen)
        torch_opt.step()
    ours = _run(fused, cfg, p0)
    assert ours.step_count == 5
    torch.testing.assert_close(ours.param, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.exp_avg_sq, torch_opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_fused_equals_unfused_with_a_decay_mask():
    cfg = OptimizerConfig(weight_decay=0.1)
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(N) % 3 != 0).float()  # every third entry (a norm or bias) is not decayed
    fused, plain = _run(True, cfg, p0, mask), _run(False, cfg, p0, mask)
    torch.testing.assert_close(fused.param, plain.param, rtol=0, atol=1e-6)
    # Without decay on the masked entries they move exactly as with weight_decay=0.
    no_decay = _run(False, OptimizerConfig(weight_decay=0.0), p0)
    undecayed = mask == 0
    torch.testing.assert_close(fused.param[undecayed], no_decay.param[undecayed], rtol=0, atol=1e-6)
    assert not torch.allclose(fused.param[~undecayed], no_decay.param[~undecayed], rtol=0, atol=1e-6)


def test_grad_norm_square_sum_matches_float64():
    g = torch.randn(300_000, generator=torch.Generator().manual_seed(2)) * 1e-3
    ranges = GradNormRanges.__new__(GradNormRanges)
    ranges.ranges = [(0, 200_001), (250_000, 300_000)]
    exact = sum(torch.dot(g[s:e].double(), g[s:e].double()) for s, e in ranges.ranges)
    got = ranges.square_sum(g)
    assert got.dtype == torch.float64
    assert abs(float(got) - float(exact)) <= 1e-6 * float(exact)
    ranges.ranges = []
    assert float(ranges.square_sum(g)) == 0.0


@pytest.mark.parametrize("period", [3, 5_000])
def test_fused_decay_runs_equal_the_masked_update(period):
    """A mask of long runs takes the two-call path, a fragmented one the masked pass; both equal the reference."""
    cfg = OptimizerConfig(weight_decay=0.1)
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(0))
    mask = ((torch.arange(N) // period) % 2 == 0).float()
    fused, plain = _run(True, cfg, p0, mask), _run(False, cfg, p0, mask)
    assert (fused.decay_runs is None) == (period == 3)
    torch.testing.assert_close(fused.param, plain.param, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.exp_avg_sq, plain.exp_avg_sq, rtol=1e-6, atol=0)
