"""GRPO-family building blocks against plain per-sequence / per-token loop references."""

from __future__ import annotations

import math
import random
from typing import List, Optional

import pytest
import torch

from realhf.impl.model.utils import rl_functional as F

SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------- helpers
def _batch(seed: int, bs: int = 6, min_len: int = 1, max_len: int = 9, p_mask: float = 0.3,
           all_masked: Optional[int] = 1):
    """Random shifted lengths, bool mask with one fully masked sequence."""
    rng = random.Random(seed)
    lens = [rng.randint(min_len, max_len) - 1 for _ in range(bs)]  # shifted lengths (may be 0)
    mask: List[bool] = []
    for i, n in enumerate(lens):
        mask += [False] * n if i == all_masked else [rng.random() > p_mask for _ in range(n)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return lens, mask, torch.tensor(cu)


def _rand(n: int, seed: int, scale: float = 1.0) -> List[float]:
    rng = random.Random(1000 + seed)
    return [rng.gauss(0.0, scale) for _ in range(n)]


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def _segments(lens):
    off = 0
    for n in lens:
        yield list(range(off, off + n))
        off += n


# --------------------------------------------------------------------------- KL
def test_kl_estimate_kinds_aliases_and_clamp():
    lp, ref = _rand(30, 0), _rand(30, 1)
    expect = {
        "k1": [a - b for a, b in zip(lp, ref)],
        "k2": [0.5 * (a - b) ** 2 for a, b in zip(lp, ref)],
        "k3": [min(math.exp(b - a) - (b - a) - 1, 10.0) for a, b in zip(lp, ref)],  # clamped by default
        "abs": [abs(a - b) for a, b in zip(lp, ref)],
    }
    for kind, alias in [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"), ("abs", "abs")]:
        for name in (kind, alias):
            got = F.kl_estimate(_t(lp), _t(ref), name).tolist()
            assert got == pytest.approx(expect[kind], rel=1e-12, abs=1e-12), name
    k3 = F.kl_estimate(_t(lp), _t(ref), "k3").tolist()
    assert min(k3) >= 0.0 and max(k3) == 10.0  # the data reach the clamp
    # Far from the reference, k3 is clamped to 10 unless disabled.
    assert F.kl_estimate(_t([0.0]), _t([20.0]), "k3").item() == 10.0
    assert F.kl_estimate(_t([0.0]), _t([20.0]), "k3", k3_clamp=None).item() == pytest.approx(math.exp(20) - 21)
    with pytest.raises(ValueError, match="k4.*low_var_kl"):
        F.kl_estimate(_t(lp), _t(ref), "k4")


def test_kl_penalty_loss_gradient_only_to_policy():
    lens, mask, cu = _batch(3)
    n = len(mask)
    lp = _t(_rand(n, 2)).requires_grad_(True)
    ref = _t(_rand(n, 3)).requires_grad_(True)
    loss, st = F.kl_penalty_loss(lp, ref, _t(mask, torch.bool), cu, "k2", "seq-mean-token-mean")
    seq_vals = [sum(0.5 * (lp[t].item() - ref[t].item()) ** 2 for t in seg if mask[t]) / sum(mask[t] for t in seg)
                for seg in _segments(lens) if any(mask[t] for t in seg)]
    assert loss.item() == pytest.approx(sum(seq_vals) / len(seq_vals), rel=1e-10)
    cnt = sum(mask)
    assert st["kl"].item() == pytest.approx(
        sum(0.5 * (lp[t].item() - ref[t].item()) ** 2 for t in range(n) if mask[t]) / cnt, rel=1e-10)
    loss.backward()
    assert ref.grad is None
    assert lp.grad[~_t(mask, torch.bool)].abs().sum().item() == 0.0


# --------------------------------------------------------------------------- aggregation
def _agg_ref(x, mask, lens, mode, C=None):
    if mode == "token-mean":
        cnt = sum(mask)
        return sum(v for v, m in zip(x, mask) if m) / max(cnt, 1)
    per_seq = []
    for seg in _segments(lens):
        toks = [x[t] for t in seg if mask[t]]
        if not toks:
            continue
        if mode == "seq-mean-token-sum":
            per_seq.append(sum(toks))
        elif mode == "seq-mean-token-mean":
            per_seq.append(sum(toks) / len(toks))
        else:
            per_seq.append(sum(toks) / C)
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", F.LOSS_AGG_MODES)
def test_aggregate_loss_matches_loops(seed, mode):
    lens, mask, cu = _batch(seed, bs=7)
    x = _rand(len(mask), seed)
    got = F.aggregate_loss(_t(x), _t(mask, torch.bool), cu, mode, max_len_norm=16.0)
    assert got.item() == pytest.approx(_agg_ref(x, mask, lens, mode, 16.0), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("mode", F.LOSS_AGG_MODES)
def test_aggregate_loss_all_masked_and_nonfinite_masked_entries(mode):
    lens, _, cu = _batch(4)
    n = int(cu[-1])
    x = torch.full((n,), float("inf"), dtype=torch.float64, requires_grad=True)
    loss = F.aggregate_loss(x, torch.zeros(n, dtype=torch.bool), cu, mode, max_len_norm=8.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(n, dtype=torch.float64))


def test_aggregate_loss_bad_options():
    _, mask, cu = _batch(0)
    x, m = _t(_rand(len(mask), 0)), _t(mask, torch.bool)
    with pytest.raises(ValueError, match="loss_agg_mode 'seq-mean'"):
        F.aggregate_loss(x, m, cu, "seq-mean")
    with pytest.raises(ValueError, match="max_len_norm"):
        F.aggregate_loss(x, m, cu, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="short1cu_seqlens"):
        F.aggregate_loss(x, m, None, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="cu_seqlens"):
        F.aggregate_loss(x, m, cu[:-1], "seq-mean-token-mean")


# --------------------------------------------------------------------------- policy loss
def _ppo_ref(lp, old, adv, mask, lens, eps=0.2, eh=None, c=None, level="token", prox=None, cap=None,
             mode="token-mean", C=None):
    eh = eps if eh is None else eh
    base = old if prox is None else prox
    n = len(lp)
    ratio = [1.0] * n
    for seg in _segments(lens):
        trained = [t for t in seg if mask[t]]
        if level == "sequence":
            s = sum(lp[t] - base[t] for t in trained) / max(len(trained), 1)
        for t in trained:
            ratio[t] = math.exp(s) if level == "sequence" else math.exp(lp[t] - base[t])
    per_tok = [0.0] * n
    cnt = sum(mask)
    low = high = dual = dropped = 0
    w_kept, kl_kept = [], []
    for t in range(n):
        if not mask[t]:
            continue
        r, a = ratio[t], adv[t]
        u = -a * r
        v = -a * min(max(r, 1 - eps), 1 + eh)
        loss = max(u, v)
        if v > u:
            low += r < 1
            high += r > 1
        if c is not None and a < 0:
            if loss > -a * c:
                dual += 1
                loss = -a * c
        if prox is not None:
            w = math.exp(prox[t] - old[t])
            if cap is not None and w > cap:
                w = 0.0
                dropped += 1
            else:
                w_kept.append(w)
                kl_kept.append(prox[t] - old[t])
            loss *= w
        per_tok[t] = loss
    st = {
        "clip_ratio_low": low / max(cnt, 1),
        "clip_ratio_high": high / max(cnt, 1),
        "clip_ratio": (low + high) / max(cnt, 1),
        "dual_clip_ratio": dual / max(cnt, 1),
        "importance_weight": sum(ratio[t] for t in range(n) if mask[t]) / max(cnt, 1),
        "approx_kl": sum(base[t] - lp[t] for t in range(n) if mask[t]) / max(cnt, 1),
    }
    if prox is not None:
        st["behav_imp_weight"] = sum(w_kept) / max(len(w_kept), 1)
        st["behav_approx_kl"] = sum(kl_kept) / max(len(kl_kept), 1)
        st["behav_mask_ratio"] = dropped / max(cnt, 1)
    return _agg_ref(per_tok, mask, lens, mode, C), st


def _ppo_data(seed, n, drift=0.3):
    lp = _rand(n, seed, 0.5)
    old = [a + d for a, d in zip(lp, _rand(n, seed + 50, drift))]
    adv = _rand(n, seed + 100)
    prox = [a + d for a, d in zip(old, _rand(n, seed + 150, drift))]
    return lp, old, adv, prox


CASES = [
    dict(),
    dict(eh=0.28),
    dict(c=1.5),
    dict(level="sequence"),
    dict(level="sequence", eh=0.28, c=1.2, mode="seq-mean-token-mean"),
    dict(prox=True),
    dict(prox=True, cap=1.3, c=1.5, eh=0.3),
    dict(prox=True, cap=1.2, level="sequence", mode="seq-mean-token-sum-norm", C=12.0),
    dict(mode="seq-mean-token-sum"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_ppo_policy_loss_matches_loops(seed, case):
    lens, mask, cu = _batch(seed, bs=8)
    n = len(mask)
    lp, old, adv, prox = _ppo_data(seed, n)
    case = dict(case)
    use_prox = case.pop("prox", False)
    ref_loss, ref_st = _ppo_ref(lp, old, adv, mask, lens, prox=prox if use_prox else None, **case)
    loss, st = F.ppo_policy_loss(
        _t(lp), _t(old), _t(adv), _t(mask, torch.bool), cu,
        eps_clip=0.2, eps_clip_higher=case.get("eh"), c_clip=case.get("c"),
        importance_sampling_level=case.get("level", "token"),
        prox_logprobs=_t(prox) if use_prox else None, behav_imp_weight_cap=case.get("cap"),
        loss_agg_mode=case.get("mode", "token-mean"), max_len_norm=case.get("C"))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    assert set(st) == set(ref_st)
    for k, v in ref_st.items():
        assert st[k].dim() == 0
        assert st[k].item() == pytest.approx(v, rel=1e-10, abs=1e-12), k


def test_ppo_token_mean_gradient_matches_reference():
    lens, mask, cu = _batch(7, bs=8)
    n = len(mask)
    lp, old, adv, _ = _ppo_data(7, n, drift=0.4)
    eps, eh, c = 0.2, 0.3, 1.5
    x = _t(lp).requires_grad_(True)
    loss, st = F.ppo_policy_loss(x, _t(old), _t(adv), _t(mask, torch.bool), cu, eps, eh, c)
    loss.backward()
    cnt = sum(mask)
    expect = []
    for t in range(n):
        r, a = math.exp(lp[t] - old[t]), adv[t]
        active = mask[t] and (1 - eps <= r <= 1 + eh or -a * r >= -a * min(max(r, 1 - eps), 1 + eh))
        if a < 0 and max(-a * r, -a * min(max(r, 1 - eps), 1 + eh)) > -a * c:
            active = False  # dual clip binds: constant term
        expect.append(-a * r / cnt if active else 0.0)
    assert x.grad.tolist() == pytest.approx(expect, rel=1e-9, abs=1e-12)
    assert st["clip_ratio"].item() > 0 and st["dual_clip_ratio"].item() > 0  # both kinds of clipping bind
    assert sum(g == 0.0 for g, m in zip(expect, mask) if m) > 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_ppo_sequence_level_gradient_matches_finite_differences(mode):
    lens, mask, cu = _batch(11, bs=5)
    n = len(mask)
    lp, old, adv, prox = _ppo_data(11, n, drift=0.2)
    x = _t(lp).requires_grad_(True)
    loss, _ = F.ppo_policy_loss(x, _t(old), _t(adv), _t(mask, torch.bool), cu, 0.2, 0.28,
                                importance_sampling_level="sequence", prox_logprobs=_t(prox),
                                loss_agg_mode=mode)
    loss.backward()
    h = 1e-6
    for t in range(n):
        up, dn = list(lp), list(lp)
        up[t] += h
        dn[t] -= h
        fd = (_ppo_ref(up, old, adv, mask, lens, eh=0.28, level="sequence", prox=prox, mode=mode)[0]
              - _ppo_ref(dn, old, adv, mask, lens, eh=0.28, level="sequence", prox=prox, mode=mode)[0]) / (2 * h)
        assert x.grad[t].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), t


def test_ppo_sequence_ratio_differs_from_token_ratio():
    # One sequence of 3 trained tokens: token ratios e^0.3, e^-0.3, 1 -> sequence ratio 1.
    lp = _t([0.3, -0.3, 0.0])
    old = torch.zeros(3, dtype=torch.float64)
    adv = _t([1.0, 1.0, 1.0])
    m = torch.ones(3, dtype=torch.bool)
    cu = torch.tensor([0, 3])
    tok, st_tok = F.ppo_policy_loss(lp, old, adv, m, cu, 0.2)
    seq, st_seq = F.ppo_policy_loss(lp, old, adv, m, cu, 0.2, importance_sampling_level="sequence")
    assert seq.item() == pytest.approx(-1.0)
    assert tok.item() == pytest.approx(-(1.2 + math.exp(-0.3) + 1.0) / 3)
    assert st_seq["importance_weight"].item() == pytest.approx(1.0)
    assert st_seq["clip_ratio"].item() == 0.0 and st_tok["clip_ratio_high"].item() == pytest.approx(1 / 3)


def test_ppo_clip_higher_binds_only_on_upper_side():
    r = [1.25, 1.3, 0.85, 0.7]
    a = [1.0, 1.0, -1.0, -1.0]
    lp = _t([math.log(v) for v in r])
    old = torch.zeros(4, dtype=torch.float64)
    m = torch.ones(4, dtype=torch.bool)
    sym_loss, sym = F.ppo_policy_loss(lp, old, _t(a), m, eps_clip=0.2)
    dec_loss, dec = F.ppo_policy_loss(lp, old, _t(a), m, eps_clip=0.2, eps_clip_higher=0.28)
    assert sym["clip_ratio_high"].item() == pytest.approx(2 / 4)  # 1.25 and 1.3 clipped at 1.2
    assert dec["clip_ratio_high"].item() == pytest.approx(1 / 4)  # only 1.3 exceeds 1.28
    assert sym["clip_ratio_low"].item() == dec["clip_ratio_low"].item() == pytest.approx(1 / 4)  # only 0.7 < 0.8
    assert sym_loss.item() == pytest.approx((-1.2 - 1.2 + 0.85 + 0.8) / 4)
    assert dec_loss.item() == pytest.approx((-1.25 - 1.28 + 0.85 + 0.8) / 4)


def test_ppo_dual_clip_binds_for_negative_advantages():
    lp = _t([math.log(5.0), math.log(5.0), math.log(1.1)]).requires_grad_(True)
    old = torch.zeros(3, dtype=torch.float64)
    adv = _t([-2.0, 2.0, -2.0])
    m = torch.ones(3, dtype=torch.bool)
    loss, st = F.ppo_policy_loss(lp, old, adv, m, eps_clip=0.2, c_clip=3.0)
    # token 0: -A*r = 10 bounded by -A*c = 6; token 1: A>0 clipped at 1.2 -> -2.4; token 2: 2.2 untouched.
    assert loss.item() == pytest.approx((6.0 - 2.4 + 2.2) / 3)
    assert st["dual_clip_ratio"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert lp.grad[0].item() == 0.0 and lp.grad[1].item() == 0.0
    assert lp.grad[2].item() == pytest.approx(2.0 * 1.1 / 3)
    no_dual, _ = F.ppo_policy_loss(lp.detach(), old, adv, m, eps_clip=0.2)
    assert no_dual.item() == pytest.approx((10.0 - 2.4 + 2.2) / 3)


def test_ppo_behaviour_cap_masks_tokens_keeps_denominator():
    n = 6
    lp = _t([0.0] * n).requires_grad_(True)
    prox = torch.zeros(n, dtype=torch.float64)
    old = _t([0.0, -0.1, -1.0, 0.0, -2.0, 0.05])  # weights 1, 1.105, 2.718, 1, 7.39, 0.95
    adv = _t([1.0, 2.0, 3.0, -1.0, 5.0, 1.0])
    m = torch.tensor([True, True, True, True, True, False])
    loss, st = F.ppo_policy_loss(lp, old, adv, m, None, 0.2, prox_logprobs=prox, behav_imp_weight_cap=2.0)
    w = [1.0, math.exp(0.1), 0.0, 1.0, 0.0]
    assert loss.item() == pytest.approx(sum(-a * wi for a, wi in zip([1.0, 2.0, 3.0, -1.0, 5.0], w)) / 5)
    assert st["behav_mask_ratio"].item() == pytest.approx(2 / 5)
    assert st["behav_imp_weight"].item() == pytest.approx((1 + math.exp(0.1) + 1) / 3)
    loss.backward()
    assert lp.grad[2].item() == 0.0 and lp.grad[4].item() == 0.0 and lp.grad[5].item() == 0.0
    assert lp.grad[1].item() == pytest.approx(-2.0 * math.exp(0.1) / 5)
    uncapped, st2 = F.ppo_policy_loss(lp.detach(), old, adv, m, None, 0.2, prox_logprobs=prox)
    assert st2["behav_mask_ratio"].item() == 0.0 and uncapped.item() < loss.item()


@pytest.mark.parametrize("kwargs,match", [
    (dict(c_clip=1.0), "c_clip"),
    (dict(c_clip=0.5), "c_clip"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(behav_imp_weight_cap=2.0), "behav_imp_weight_cap.*prox_logprobs"),
    (dict(behav_imp_weight_cap=0.9, prox_logprobs=torch.zeros(4)), "behav_imp_weight_cap"),
    (dict(eps_clip=1.5), "eps_clip"),
    (dict(eps_clip_higher=-0.1), "eps_clip_higher"),
])
def test_ppo_policy_loss_bad_options(kwargs, match):
    z = torch.zeros(4)
    with pytest.raises(ValueError, match=match):
        F.ppo_policy_loss(z, z, z, torch.ones(4, dtype=torch.bool), torch.tensor([0, 4]), **kwargs)


def test_ppo_sequence_level_needs_boundaries():
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="short1cu_seqlens"):
        F.ppo_policy_loss(z, z, z, torch.ones(4, dtype=torch.bool), importance_sampling_level="sequence")


# --------------------------------------------------------------------------- normalisation
def _norm_ref(x, mask, owner, mean_level, std_level, G, eps, loo, unbiased):
    """owner[j]: sequence index of element j."""
    def members(j, level):
        if level == "batch":
            return [k for k in range(len(x)) if mask[k]]
        return [k for k in range(len(x)) if mask[k] and owner[k] // G == owner[j] // G]

    def mean_of(j):
        if mean_level is None:
            return 0.0
        mem = members(j, mean_level)
        if loo:
            if len(mem) <= 1:
                return 0.0
            others = [k for k in mem if k != j]
            return sum(x[k] for k in others) / len(others)
        return sum(x[k] for k in mem) / len(mem) if mem else 0.0

    out = []
    for j in range(len(x)):
        if not mask[j]:
            out.append(0.0)
            continue
        c = x[j] - mean_of(j)
        if std_level is None:
            out.append(c)
            continue
        mem = members(j, std_level)
        ss = sum((x[k] - mean_of(k)) ** 2 for k in mem)
        div = len(mem) - 1 if unbiased else len(mem)
        sd = math.sqrt(ss / div) if div > 0 else 1.0
        out.append(c / (sd + eps))
    return out


LEVELS = [("batch", "batch"), ("group", "group"), ("group", None), (None, "batch"), ("batch", "group"),
          (None, None)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("loo", [False, True])
@pytest.mark.parametrize("unbiased", [False, True])
def test_normalize_per_sequence_and_per_token(seed, levels, loo, unbiased):
    mean_level, std_level = levels
    G, eps = 3, 1e-5
    rng = random.Random(seed)
    x = _rand(9, seed)
    smask = [rng.random() > 0.2 for _ in range(9)]
    got = F.normalize(_t(x), mean_level, std_level, G, eps, _t(smask, torch.bool), mean_leave1out=loo,
                      std_unbiased=unbiased)
    assert got.tolist() == pytest.approx(
        _norm_ref(x, smask, list(range(9)), mean_level, std_level, G, eps, loo, unbiased), rel=1e-9, abs=1e-12)
    lens, mask, cu = _batch(seed, bs=9)
    xt = _rand(len(mask), seed + 7)
    owner = [i for i, seg in enumerate(_segments(lens)) for _ in seg]
    got = F.normalize(_t(xt), mean_level, std_level, G, eps, _t(mask, torch.bool), cu, loo, unbiased)
    assert got.tolist() == pytest.approx(
        _norm_ref(xt, mask, owner, mean_level, std_level, G, eps, loo, unbiased), rel=1e-9, abs=1e-12)


def test_normalize_identical_group_is_finite_and_zero():
    x = _t([0.1, 0.1, 0.1, 1.0, 0.0, 1.0])
    out = F.normalize(x, "group", "group", 3, eps=1e-6)
    assert torch.isfinite(out).all()
    assert out[:3].abs().max().item() < 1e-6
    assert out[3:].tolist() == pytest.approx([1 / math.sqrt(3), -2 / math.sqrt(3), 1 / math.sqrt(3)], rel=1e-5)


def test_normalize_bad_options():
    x = torch.zeros(6)
    with pytest.raises(ValueError, match="mean_level"):
        F.normalize(x, "prompt", "batch")
    with pytest.raises(ValueError, match="std_level"):
        F.normalize(x, "batch", "none")
    with pytest.raises(ValueError, match="group_size=4"):
        F.normalize(x, "group", "group", 4)


# --------------------------------------------------------------------------- advantages
def _broadcast_ref(seq_vals, lens, mask):
    out = []
    for v, seg in zip(seq_vals, _segments(lens)):
        out += [v if mask[t] else 0.0 for t in seg]
    return out


def _grpo_seq_ref(r, G, use_std, eps=1e-6):
    out = []
    for g in range(0, len(r), G):
        grp = r[g:g + G]
        mu = sum(grp) / G
        sd = math.sqrt(sum((v - mu) ** 2 for v in grp) / (G - 1)) if G > 1 else 1.0
        out += [(v - mu) / (sd + eps) if use_std else v - mu for v in grp]
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("use_std", [True, False])
def test_grpo_advantages(seed, use_std):
    lens, mask, cu = _batch(seed, bs=8)
    rng = random.Random(seed)
    r = [float(rng.randint(0, 1)) for _ in range(8)]
    r[:4] = [1.0] * 4  # first group: identical rewards
    adv = F.grpo_advantages(_t(r), cu, 4, _t(mask, torch.bool), norm_adv_by_std=use_std)
    assert torch.isfinite(adv).all()
    assert adv.tolist() == pytest.approx(_broadcast_ref(_grpo_seq_ref(r, 4, use_std), lens, mask), abs=1e-9)
    with pytest.raises(ValueError, match="group_size=3"):
        F.grpo_advantages(_t(r), cu, 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_advantages(seed):
    lens, mask, cu = _batch(seed, bs=6)
    r = _rand(6, seed)
    expect = []
    for i in range(6):
        g = i // 3
        others = [r[j] for j in range(3 * g, 3 * g + 3) if j != i]
        expect.append(r[i] - sum(others) / 2)
    adv = F.rloo_advantages(_t(r), cu, 3, _t(mask, torch.bool))
    assert adv.tolist() == pytest.approx(_broadcast_ref(expect, lens, mask), rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError, match="group_size"):
        F.rloo_advantages(_t(r), cu, 1)
    with pytest.raises(ValueError, match="group_size=4"):
        F.rloo_advantages(_t(r), cu, 4)


def test_remax_advantages_per_prompt_and_per_sequence():
    lens, mask, cu = _batch(5, bs=6)
    r = _rand(6, 5)
    greedy = [0.5, -0.25]
    expect = [r[i] - greedy[i // 3] for i in range(6)]
    got = F.remax_advantages(_t(r), _t(greedy), cu, 3, _t(mask, torch.bool))
    assert got.tolist() == pytest.approx(_broadcast_ref(expect, lens, mask), rel=1e-12)
    per_seq = [greedy[i // 3] for i in range(6)]
    got2 = F.remax_advantages(_t(r), _t(per_seq), cu, loss_mask=_t(mask, torch.bool))
    assert torch.equal(got, got2)
    with pytest.raises(ValueError, match="greedy_rewards"):
        F.remax_advantages(_t(r), _t([0.0] * 4), cu, 2)


def _rpp_ref(r, kl, mask, lens, kl_ctl, gamma, G, eps):
    if G is not None:
        r = [v - sum(r[(i // G) * G:(i // G) * G + G]) / G for i, v in enumerate(r)]
    ret = [0.0] * len(mask)
    for i, seg in enumerate(_segments(lens)):
        running = 0.0
        for t in reversed(seg):
            rew = (-kl_ctl * kl[t] if mask[t] else 0.0) + (r[i] if t == seg[-1] else 0.0)
            running = rew + gamma * running
            ret[t] = running
    vals = [ret[t] for t in range(len(mask)) if mask[t]]
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return [(ret[t] - mu) / (sd + eps) if mask[t] else 0.0 for t in range(len(mask))]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("G", [None, 2])
def test_reinforce_plus_plus(seed, gamma, G):
    lens, mask, cu = _batch(seed, bs=6, min_len=2)
    kl = _rand(len(mask), seed + 3, 0.1)
    r = _rand(6, seed + 4)
    got = F.reinforce_plus_plus_advantages(_t(r), cu, _t(mask, torch.bool), _t(kl), 0.05, gamma, G)
    assert got.tolist() == pytest.approx(_rpp_ref(r, kl, mask, lens, 0.05, gamma, G, 1e-8), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="two tokens"):
        F.reinforce_plus_plus_advantages(_t([1.0, 2.0]), torch.tensor([0, 0, 3]), torch.ones(3, dtype=torch.bool))


def test_discounted_returns_loop():
    lens, _, cu = _batch(9, bs=5)
    x = _rand(int(cu[-1]), 9)
    expect = []
    for seg in _segments(lens):
        expect += [sum(0.8 ** (k - t) * x[k] for k in seg if k >= t) for t in seg]
    assert F.discounted_returns(_t(x), cu, 0.8).tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- DAPO helpers
def test_overlong_penalty():
    lengths = [10, 80, 96, 100, 112, 128]
    got = F.overlong_penalty(torch.tensor(lengths), max_new_tokens=128, overlong_tokens=32,
                             overlong_penalty_factor=1.5).tolist()
    expect = [0.0 if L <= 96 else -(L - 96) / 32 * 1.5 for L in lengths]
    assert got == pytest.approx(expect)
    assert got[-1] == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="overlong_tokens"):
        F.overlong_penalty(torch.tensor(lengths), 128, 0, 1.0)
    with pytest.raises(ValueError, match="overlong_penalty_factor"):
        F.overlong_penalty(torch.tensor(lengths), 128, 16, -1.0)


def test_dynamic_sampling_keep():
    r = _t([1, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5000001])
    assert F.dynamic_sampling_keep(r, 3).tolist() == [False, True, False, True]
    assert F.dynamic_sampling_keep(r, 3, atol=1e-3).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="group_size=5"):
        F.dynamic_sampling_keep(r, 5)


def test_mask_no_eos_with_zero():
    lens, mask, cu = _batch(2, bs=4)
    no_eos = [False, True, False, True]
    r = _t([1.0, 2.0, 3.0, 4.0])
    assert F.mask_no_eos_with_zero(r, _t(no_eos, torch.bool)).tolist() == [1.0, 0.0, 3.0, 0.0]
    m = F.mask_no_eos_with_zero(_t(mask, torch.bool), _t(no_eos, torch.bool), cu)
    expect = []
    for i, seg in enumerate(_segments(lens)):
        expect += [mask[t] and not no_eos[i] for t in seg]
    assert m.dtype == torch.bool and m.tolist() == expect
    with pytest.raises(ValueError, match="short1cu_seqlens"):
        F.mask_no_eos_with_zero(_t(mask, torch.bool), _t(no_eos, torch.bool))
