"""Packed utilities and logits warping, each checked against a plain loop."""

import math

import pytest
import torch

from realhf.impl.model.utils import functional as F
from realhf.impl.model.utils.logits_warper import (
    LogitsWarper,
    mask_tokens,
    top_k_keep_mask,
    top_p_keep_mask,
    warp_logits,
)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


@pytest.mark.parametrize("lens", [[5], [1, 4, 3], [2, 1, 1, 6], [3, 0, 4]])
def test_gather_packed_shifted_log_probs_matches_loop(lens):
    g = torch.Generator().manual_seed(sum(lens))
    total, vocab = sum(lens), 11
    logits = torch.randn(total, vocab, generator=g)
    labels = torch.randint(0, vocab, (total,), generator=g)
    cu = _cu(lens)
    got = F.gather_packed_shifted_log_probs(logits, cu, labels)
    expected = []
    for i in range(len(lens)):
        s, e = int(cu[i]), int(cu[i + 1])
        for t in range(s, e - 1):
            expected.append(torch.log_softmax(logits[t], -1)[labels[t + 1]])
    expected = torch.stack(expected) if expected else torch.zeros(0)
    assert got.shape == (sum(max(n - 1, 0) for n in lens),)
    torch.testing.assert_close(got, expected)


def test_gather_packed_shifted_log_probs_gradient_flows():
    logits = torch.randn(6, 5, requires_grad=True)
    out = F.gather_packed_shifted_log_probs(logits, _cu([2, 4]), torch.randint(0, 5, (6,)))
    out.sum().backward()
    # Last token of each sequence predicts nothing, so its logits get no gradient.
    assert logits.grad[1].abs().sum() == 0 and logits.grad[5].abs().sum() == 0
    assert logits.grad[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[5], [1, 4, 3], [3, 0, 4]])
def test_gather_packed_shifted_log_probs_gradient_matches_plain_torch(lens, dtype):
    """Values and logit gradients equal log_softmax + indexing through autograd (float32 math)."""
    g = torch.Generator().manual_seed(7 + sum(lens))
    total, vocab = sum(lens), 13
    base = (torch.randn(total, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (total,), generator=g)
    cu = _cu(lens)
    pred = [t for i in range(len(lens)) for t in range(int(cu[i]), int(cu[i + 1]) - 1)]
    weights = torch.randn(len(pred), generator=g)

    x = base.clone().requires_grad_()
    got = F.gather_packed_shifted_log_probs(x, cu, labels)
    (got * weights).sum().backward()

    y = base.clone().requires_grad_()
    idx = torch.tensor(pred, dtype=torch.long)
    expected = torch.log_softmax(y.float()[idx], -1).gather(-1, labels[idx + 1].unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()
    assert got.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, y.grad)


def test_gather_rejects_bad_boundaries():
    with pytest.raises(ValueError):
        F.gather_packed_shifted_log_probs(torch.randn(4, 3), torch.tensor([0, 2, 5]), torch.zeros(4, dtype=torch.long))


def test_packed_positions():
    cu = _cu([3, 1, 0, 4])
    assert F.packed_positions(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert F.packed_positions(_cu([])).numel() == 0


def test_masked_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    m = torch.tensor([True, True, True, False])
    assert F.masked_mean(x, m).item() == pytest.approx(2.0)
    assert F.masked_mean(x).item() == pytest.approx(4.0)
    assert F.masked_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    x2 = torch.arange(6.0).reshape(2, 3)
    m2 = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(F.masked_mean(x2, m2, dim=1), torch.tensor([0.5, 4.5]))


@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_normalization_matches_reference(unbiased):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=g) * 3 + 2
    mask = torch.rand(4, 7, generator=g) > 0.3
    got = F.masked_normalization(x, mask, unbiased=unbiased)
    sel = x[mask].double()
    mean, std = sel.mean(), sel.std(unbiased=unbiased)
    expected = ((x.double() - mean) / torch.sqrt(std**2 + 1e-5)) * mask
    torch.testing.assert_close(got, expected.float())
    assert F.masked_normalization(x).mean().abs() < 1e-5
    # Per-row statistics with ``dim``.
    per_row = F.masked_normalization(x, mask, dim=1)
    for r in range(4):
        xs = x[r][mask[r]].double()
        ref = (x[r].double() - xs.mean()) / torch.sqrt(xs.var(unbiased=False) + 1e-5) * mask[r]
        torch.testing.assert_close(per_row[r], ref.float())


def test_entropy_from_logits():
    logits = torch.randn(3, 8)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(F.entropy_from_logits(logits), -(p * p.log()).sum(-1))
    uniform = torch.zeros(2, 4)
    torch.testing.assert_close(F.entropy_from_logits(uniform), torch.full((2,), math.log(4)))
    masked = torch.tensor([[0.0, float("-inf"), 0.0]])
    torch.testing.assert_close(F.entropy_from_logits(masked), torch.tensor([math.log(2)]))


# ---------------------------------------------------------------- logits warping


def _ref_top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(row, dtype=torch.bool)
    for idx in sorted(range(len(row)), key=lambda j: -row[j].item())[:k]:
        keep[idx] = True
    return keep


def _ref_top_p(row: torch.Tensor, p: float) -> torch.Tensor:
    probs = torch.softmax(row.double(), -1)
    keep = torch.zeros_like(row, dtype=torch.bool)
    mass = 0.0
    for idx in sorted(range(len(row)), key=lambda j: -probs[j].item()):
        keep[idx] = True
        mass += probs[idx].item()
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_matches_reference(k):
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(k))
    keep = top_k_keep_mask(logits, k)
    for r in range(5):
        assert torch.equal(keep[r], _ref_top_k(logits[r], min(k, 20)))
    assert (keep.sum(-1) == min(k, 20)).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95, 1.0])
def test_top_p_matches_reference(p):
    logits = 2 * torch.randn(6, 30, generator=torch.Generator().manual_seed(int(p * 100)))
    keep = top_p_keep_mask(logits, p)
    for r in range(6):
        if p >= 1.0:
            assert keep[r].all()
        else:
            assert torch.equal(keep[r], _ref_top_p(logits[r], p))
    assert (keep.sum(-1) >= 1).all()


def test_top_p_keeps_at_least_one_token():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert top_p_keep_mask(logits, 1e-6).tolist() == [[True, False, False, False]]


def test_warper_order_temperature_topk_topp():
    logits = torch.randn(4, 25, generator=torch.Generator().manual_seed(7))
    t, k, p = 0.7, 8, 0.6
    warped, keep = LogitsWarper(temperature=t, top_k=k, top_p=p)(logits)
    for r in range(4):
        scaled = logits[r] / t
        kk = _ref_top_k(scaled, k)
        after_k = scaled.masked_fill(~kk, float("-inf"))
        kp = _ref_top_p(after_k, p)
        ref = after_k.masked_fill(~kp, float("-inf"))
        torch.testing.assert_close(warped[r], ref)
        assert torch.equal(keep[r], torch.isfinite(ref))
    torch.testing.assert_close(warp_logits(logits, t, k, p), warped)


def test_warper_identity_and_truncates():
    logits = torch.randn(2, 10)
    w = LogitsWarper()
    out, keep = w(logits)
    torch.testing.assert_close(out, logits)
    assert keep.all() and not w.truncates(10)
    assert LogitsWarper(top_k=5).truncates(10) and not LogitsWarper(top_k=10).truncates(10)
    assert LogitsWarper(top_p=0.9).truncates(10)
    with pytest.raises(ValueError):
        LogitsWarper(temperature=0.0)
    with pytest.raises(ValueError):
        LogitsWarper(top_p=0.0)


def test_mask_tokens_rows():
    logits = torch.zeros(3, 5)
    out = mask_tokens(logits, [1, 4], rows=torch.tensor([0, 2]))
    assert torch.isinf(out[0, [1, 4]]).all() and torch.isinf(out[2, [1, 4]]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(logits).all()
    assert torch.isinf(mask_tokens(logits, 3)[:, 3]).all()


# ---------------------------------------------------------------- distributed statistics


def _normalize_worker(rank: int, world: int, init_file: str, x: torch.Tensor, mask: torch.Tensor, out_file: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = slice(rank * 3, (rank + 1) * 3)
        got = F.masked_normalization(x[shard], mask[shard], group=dist.group.WORLD)
        local = F.masked_normalization(x[shard], mask[shard], all_reduce=False)
        torch.save({"got": got, "local": local}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_masked_normalization_all_reduce_over_ranks(tmp_path):
    """Each rank holds a shard; statistics must be those of the whole batch."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, generator=g) * 2 + 1
    mask = torch.rand(6, 5, generator=g) > 0.4
    out = str(tmp_path / "res")
    mp.spawn(_normalize_worker, args=(2, str(tmp_path / "init"), x, mask, out), nprocs=2, join=True)
    got = torch.cat([torch.load(f"{out}.{r}")["got"] for r in range(2)])
    torch.testing.assert_close(got, F.masked_normalization(x, mask, all_reduce=False))
    local0 = torch.load(f"{out}.0")["local"]
    assert not torch.allclose(local0, got[:3])


def test_cu_seqlens_from_lengths_inverts_seqlens_from_cu():
    lens = [3, 0, 5, 1]
    cu = F.cu_seqlens_from_lengths(lens)
    assert cu.tolist() == [0, 3, 3, 8, 9] and cu.dtype == torch.int64
    assert F.seqlens_from_cu(cu).tolist() == lens
    assert F.cu_seqlens_from_lengths(torch.tensor(lens), dtype=torch.int32).dtype == torch.int32
    assert F.cu_seqlens_from_lengths([]).tolist() == [0]
