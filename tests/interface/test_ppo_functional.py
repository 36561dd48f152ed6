"""PPO functional pieces against plain loop-based references."""

from __future__ import annotations

import math

import pytest
import torch

from realhf.impl.model.utils import ppo_functional as F

LENS = [5, 2, 7, 4, 9]  # full lengths L_i


def _short1(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n - 1)
    return torch.tensor(out)


def _rand(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ actor loss
def _actor_ref(lp, old, adv, eps, mask):
    num, cnt, clipped, imp, kl = 0.0, 0, 0, 0.0, 0.0
    for i in range(len(lp)):
        if not mask[i]:
            continue
        r = math.exp(lp[i] - old[i])
        a = -adv[i] * r
        b = -adv[i] * min(max(r, 1 - eps), 1 + eps)
        num += max(a, b)
        clipped += int(b > a)
        imp += r
        kl += old[i] - lp[i]
        cnt += 1
    return num / cnt, clipped / cnt, imp / cnt, kl / cnt


def test_actor_loss_matches_loop_and_gradient_is_masked():
    n = 40
    lp = (_rand(n, 0) * 0.3 - 1.0).float().requires_grad_(True)
    old = (lp.detach().double() + _rand(n, 1) * 0.4).float()
    adv = _rand(n, 2).float()
    mask = _rand(n, 3) > -0.5
    loss, st = F.actor_loss(lp, old, adv, 0.2, mask)
    ref = _actor_ref(lp.tolist(), old.tolist(), adv.tolist(), 0.2, mask.tolist())
    assert float(loss.detach()) == pytest.approx(ref[0], rel=1e-5, abs=1e-6)
    assert float(st["clip_ratio"]) == pytest.approx(ref[1], rel=1e-6)
    assert float(st["importance_weight"]) == pytest.approx(ref[2], rel=1e-5)
    assert float(st["approx_kl"]) == pytest.approx(ref[3], rel=1e-5, abs=1e-6)
    assert float(st["early_stop"]) == 0.0
    loss.backward()
    assert float(lp.grad[~mask].abs().sum()) == 0.0
    assert float(lp.grad[mask].abs().sum()) > 0.0


def test_actor_loss_early_stop_zeroes_loss():
    n = 20
    lp = torch.zeros(n, requires_grad=True)
    old = torch.full((n,), -2.0)  # ratio e^2 ~ 7.4
    adv = torch.ones(n)
    mask = torch.ones(n, dtype=torch.bool)
    loss, st = F.actor_loss(lp, old, adv, 0.2, mask, early_stop_imp_ratio=5.0)
    assert float(loss.detach()) == 0.0 and float(st["early_stop"]) == 1.0
    assert float(st["importance_weight"]) == pytest.approx(math.exp(2.0), rel=1e-5)
    loss.backward()
    assert float(lp.grad.abs().sum()) == 0.0
    loss2, st2 = F.actor_loss(lp, old, adv, 0.2, mask, early_stop_imp_ratio=10.0)
    assert float(loss2.detach()) != 0.0 and float(st2["early_stop"]) == 0.0
    loss3, st3 = F.actor_loss(lp, old, adv, 0.2, mask, early_stop_kl=1.0)  # approx_kl = -2 < 1
    assert float(st3["early_stop"]) == 0.0


# ----------------------------------------------------------------- critic loss
def _huber(x, y, d):
    e = abs(x - y)
    return 0.5 * e * e if e <= d else d * (e - 0.5 * d)


@pytest.mark.parametrize("loss_type", ["mse", "huber"])
def test_critic_loss_matches_loop(loss_type):
    n, eps, delta = 50, 0.2, 0.5
    v = _rand(n, 4).float()
    old = (v.double() + _rand(n, 5) * 0.5).float()
    ret = (_rand(n, 6) * 2).float()
    mask = _rand(n, 7) > -0.3
    loss, st = F.critic_loss(v, old, ret, eps, mask, loss_type, huber_delta=delta)
    f = (lambda x, y: 0.5 * (x - y) ** 2) if loss_type == "mse" else (lambda x, y: _huber(x, y, delta))
    tot, cnt, clip = 0.0, 0, 0
    for i in range(n):
        if not mask[i]:
            continue
        vc = float(old[i]) + min(max(float(v[i]) - float(old[i]), -eps), eps)
        a, b = f(float(v[i]), float(ret[i])), f(vc, float(ret[i]))
        tot += max(a, b)
        clip += int(b > a and abs(float(v[i]) - float(old[i])) > eps)
        cnt += 1
    assert float(loss) == pytest.approx(tot / cnt, rel=1e-5)
    assert float(st["value_clip_ratio"]) == pytest.approx(clip / cnt)
    with pytest.raises(ValueError):
        F.critic_loss(v, old, ret, eps, mask, "l1")


# -------------------------------------------------------------- KL controllers
def test_kl_controllers():
    fixed = F.FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ada = F.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    expected = 0.1
    for kl, n in [(3.0, 64), (6.6, 32), (30.0, 128), (0.0, 16), (6.0, 8)]:
        ada.update(kl, n)
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + err * n / 10000
        assert ada.value == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------- reward shaping
def test_shaped_rewards_matches_loop():
    short1 = _short1(LENS)
    n = int(short1[-1])
    old, ref = _rand(n, 8).float(), _rand(n, 9).float()
    mask = _rand(n, 10) > -0.5
    score = torch.tensor([3.0, -50.0, 0.5, 40.0, 1.0])
    no_eos = torch.tensor([False, False, True, False, True])
    kl_ctl, clip, scale, bias = 0.05, 5.0, 2.0, 0.5
    klr, rew = F.shaped_rewards(kl_ctl, old, ref, score, short1, no_eos, clip, loss_mask=mask,
                                reward_scaling=scale, reward_bias=bias)
    for i in range(len(LENS)):
        for t in range(int(short1[i]), int(short1[i + 1])):
            k = -kl_ctl * (float(old[t]) - float(ref[t])) if mask[t] else 0.0
            assert float(klr[t]) == pytest.approx(k, abs=1e-6)
            r = k
            if t == int(short1[i + 1]) - 1 and not no_eos[i]:
                r += min(max((float(score[i]) - bias) * scale, -clip), clip)
            assert float(rew[t]) == pytest.approx(r, abs=1e-6)


# ------------------------------------------------------------------------ GAE
def _gae_loop(gamma, lam, values, rewards, lens, no_eos):
    adv, ret = [], []
    v_off, r_off = 0, 0
    for i, L in enumerate(lens):
        T = L - 1
        v = values[v_off:v_off + L]
        r = rewards[r_off:r_off + T]
        out = [0.0] * T
        last = 0.0
        for t in reversed(range(T)):
            if t + 1 < T:
                nv = v[t + 1]
            else:
                nv = v[T] if no_eos[i] else 0.0
            delta = r[t] + gamma * nv - v[t]
            last = delta + gamma * lam * last
            out[t] = last
        adv += out
        ret += [a + v[t] for t, a in enumerate(out)]
        v_off += L
        r_off += T
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8)])
def test_gae_matches_loop_with_truncation(gamma, lam):
    short1 = _short1(LENS)
    values = _rand(sum(LENS), 11).float()
    rewards = _rand(int(short1[-1]), 12).float()
    no_eos = torch.tensor([True, False, True, False, False])
    adv, ret = F.get_packed_advantages_and_returns(gamma, lam, values, rewards, short1, no_eos)
    ref_adv, ref_ret = _gae_loop(gamma, lam, values.tolist(), rewards.tolist(), LENS, no_eos.tolist())
    torch.testing.assert_close(adv, torch.tensor(ref_adv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, torch.tensor(ref_ret), rtol=1e-5, atol=1e-5)
    # The bootstrap value matters only for truncated sequences.
    cu = [0]
    for L in LENS:
        cu.append(cu[-1] + L)
    v2 = values.clone()
    for i in range(len(LENS)):
        v2[cu[i + 1] - 1] += 10.0
    adv2, _ = F.get_packed_advantages_and_returns(gamma, lam, v2, rewards, short1, no_eos)
    for i in range(len(LENS)):
        seg = slice(int(short1[i]), int(short1[i + 1]))
        same = torch.allclose(adv2[seg], adv[seg])
        assert same != bool(no_eos[i])


# ----------------------------------------------------------- value normalizer
def test_value_normalizer_exp_debiased():
    beta, eps = 0.9, 1e-5
    rms = F.ValueNormalizer("exp", beta=beta, eps=eps, all_reduce=False)
    x0 = torch.linspace(-1, 1, 5)
    assert torch.allclose(rms.normalize(x0), x0)  # identity before any data
    m = msq = w = 0.0
    for k in range(4):
        x = _rand(30, 20 + k) * 3 + 2
        mask = _rand(30, 40 + k) > 0
        rms.update(x, mask)
        sel = [float(a) for a, b in zip(x, mask) if b]
        bm = sum(sel) / len(sel)
        bsq = sum(a * a for a in sel) / len(sel)
        m = beta * m + (1 - beta) * bm
        msq = beta * msq + (1 - beta) * bsq
        w = beta * w + (1 - beta)
    mean, var = m / w, max(msq / w - (m / w) ** 2, 1e-2)
    got_mean, got_var = rms.mean_var()
    assert got_mean == pytest.approx(mean, rel=1e-9)
    assert got_var == pytest.approx(var, rel=1e-9)
    y = _rand(7, 99).float()
    torch.testing.assert_close(rms.normalize(y), ((y.double() - mean) / math.sqrt(var)).float())
    torch.testing.assert_close(rms.denormalize(rms.normalize(y)), y, rtol=1e-5, atol=1e-5)
    # After one update the debiased estimate is exactly the batch's statistics.
    one = F.ValueNormalizer("exp", beta=0.99995, all_reduce=False)
    x = _rand(100, 5) * 4 + 7
    one.update(x)
    assert one.mean_var()[0] == pytest.approx(float(x.mean()), rel=1e-6)
    assert one.mean_var()[1] == pytest.approx(float(x.var(unbiased=False)), rel=1e-4)


def test_value_normalizer_ma_running_over_all_seen():
    rms = F.ValueNormalizer("ma", all_reduce=False)
    seen = []
    for k in range(3):
        x = _rand(20 + k, 60 + k) * 2 - 1
        mask = _rand(20 + k, 70 + k) > -0.2
        rms.update(x, mask)
        seen += [float(a) for a, b in zip(x, mask) if b]
    mean = sum(seen) / len(seen)
    var = sum((a - mean) ** 2 for a in seen) / len(seen)
    got_mean, got_var = rms.mean_var()
    assert got_mean == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert got_var == pytest.approx(max(var, 1e-2), rel=1e-9)
    state = rms.state_dict()
    other = F.ValueNormalizer("ma", all_reduce=False)
    other.load_state_dict(state)
    assert other.mean_var() == rms.mean_var()
    with pytest.raises(ValueError):
        F.ValueNormalizer("median")


# ------------------------------------------------------ advantage normalization
def test_masked_advantage_normalization():
    adv = _rand(40, 80).float() * 3 + 1
    mask = _rand(40, 81) > 0
    out = F.masked_advantage_normalization(adv, mask)
    sel = [float(a) for a, b in zip(adv, mask) if b]
    mean = sum(sel) / len(sel)
    std = math.sqrt(sum((a - mean) ** 2 for a in sel) / len(sel) + 1e-5)
    for i in range(40):
        exp = (float(adv[i]) - mean) / std if mask[i] else 0.0
        assert float(out[i]) == pytest.approx(exp, abs=1e-5)
