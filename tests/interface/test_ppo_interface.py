"""The ``ppo_actor`` / ``ppo_critic`` interfaces on one process with a tiny llama."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec, Model, make_interface
from realhf.impl.model.interface.ppo_interface import PPOActorInterface, PPOCriticInterface

from tests.interface._sft_utils import full_state, tiny_config, train_model, whole_model

PROMPT_LENS = [3, 5, 2, 4, 6, 3]


def _prompts(vocab: int, seed: int = 0) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (sum(PROMPT_LENS),), generator=g)
    return SequenceSample.from_default(PROMPT_LENS, [f"p{i}" for i in range(len(PROMPT_LENS))],
                                       {"packed_prompts": toks})


def _tok(eos: int):
    return types.SimpleNamespace(eos_token_id=eos, pad_token_id=0)


def _actor(config, eos: int, lr: float = 3e-3, seed: int = 0) -> Model:
    net = whole_model(config, full_state(config, seed=seed))
    return train_model(net, lr=lr, tokenizer=_tok(eos))


def _greedy(max_new: int = 6) -> GenerationHyperparameters:
    return GenerationHyperparameters(max_new_tokens=max_new, min_new_tokens=0, greedy=True)


def _lens(sample: SequenceSample):
    return [n for (n,) in sample.seqlens["packed_input_ids"]]


def test_registered():
    assert isinstance(make_interface("ppo_actor"), PPOActorInterface)
    assert isinstance(make_interface("ppo_critic"), PPOCriticInterface)


def test_generate_keys_shapes_and_eos():
    config = tiny_config()
    prompts = _prompts(config.vocab_size)
    # First with an EOS the model never emits here: every row is truncated.
    model = _actor(config, eos=config.vocab_size - 1)
    iface = PPOActorInterface(generation_config=_greedy())
    out = iface.generate(model, prompts, MicroBatchSpec(n_mbs=2))
    assert out.ids == prompts.ids
    assert {"packed_input_ids", "packed_logprobs", "prompt_mask", "seq_no_eos_mask"} <= out.keys
    assert "packed_logits_mask" not in out.keys  # greedy decoding truncates nothing
    lens = _lens(out)
    ids = out.data["packed_input_ids"]
    eos0, s0 = config.vocab_size - 1, 0
    for L, flag in zip(lens, out.data["seq_no_eos_mask"].tolist()):
        assert flag == (int(ids[s0 + L - 1]) != eos0)
        s0 += L

    # Then make a token the greedy model emits early in the first row the EOS.
    gen0 = ids[PROMPT_LENS[0]:lens[0]]
    eos = int(gen0[1])
    model = _actor(config, eos=eos)
    out = iface.generate(model, prompts, MicroBatchSpec(n_mbs=1))
    lens = _lens(out)
    ids, pm = out.data["packed_input_ids"], out.data["prompt_mask"]
    lp, no_eos = out.data["packed_logprobs"], out.data["seq_no_eos_mask"]
    assert ids.shape == pm.shape == (sum(lens),)
    assert lp.shape == (sum(lens) - len(lens),) and lp.dtype == torch.float32
    assert no_eos.shape == (len(lens),) and no_eos.dtype == torch.bool
    start, sstart = 0, 0
    for i, (L, P) in enumerate(zip(lens, PROMPT_LENS)):
        assert bool(pm[start:start + P].all()) and not bool(pm[start + P:start + L].any())
        assert torch.equal(ids[start:start + P], prompts.data["packed_prompts"][sum(PROMPT_LENS[:i]):][:P])
        assert 1 <= L - P <= 6
        assert float(lp[sstart:sstart + P - 1].abs().sum()) == 0.0  # zero on prompt labels
        assert bool((lp[sstart + P - 1:sstart + L - 1] < 0).all())
        last = int(ids[start + L - 1])
        assert bool(no_eos[i]) == (last != eos)
        if not bool(no_eos[i]):
            assert eos not in ids[start + P:start + L - 1].tolist()
        else:
            assert L - P == 6
        start, sstart = start + L, sstart + L - 1
    assert not bool(no_eos[0]) and lens[0] - PROMPT_LENS[0] <= 2


def test_ref_inference_equals_greedy_generation_logprobs():
    config = tiny_config()
    model = _actor(config, eos=config.vocab_size - 1)
    iface = PPOActorInterface(generation_config=_greedy(8))
    out = iface.generate(model, _prompts(config.vocab_size, seed=3))
    ref_iface = PPOActorInterface(generation_config=_greedy(8), enable_save=False)
    ref = ref_iface.inference(model, out.select(["packed_input_ids"]), MicroBatchSpec(n_mbs=3))
    assert ref.keys == {"packed_ref_logprobs"} and ref.ids == out.ids
    got, exp = ref.data["packed_ref_logprobs"], out.data["packed_logprobs"]
    assert got.shape == exp.shape
    answer = exp != 0
    assert int(answer.sum()) == sum(_lens(out)) - sum(PROMPT_LENS)
    assert float((got[answer] - exp[answer]).abs().max()) < 1e-4


def test_ref_inference_with_logits_mask_matches_sampler():
    config = tiny_config()
    model = _actor(config, eos=config.vocab_size - 1)
    gcfg = GenerationHyperparameters(max_new_tokens=5, min_new_tokens=0, top_k=10, top_p=1.0, temperature=0.7)
    iface = PPOActorInterface(generation_config=gcfg)
    torch.manual_seed(0)
    out = iface.generate(model, _prompts(config.vocab_size, seed=4))
    mask = out.data["packed_logits_mask"]
    assert mask.shape == (sum(_lens(out)), config.vocab_size) and mask.dtype == torch.bool
    ref = iface.inference(model, out.select(["packed_input_ids", "packed_logits_mask"]))
    got, exp = ref.data["packed_ref_logprobs"], out.data["packed_logprobs"]
    answer = exp != 0
    assert float((got[answer] - exp[answer]).abs().max()) < 1e-4


def _train_batch(out: SequenceSample, rewards, ref_logp=None, values=None) -> SequenceSample:
    lens = _lens(out)
    data = {k: out.data[k] for k in out.keys}
    data["packed_ref_logprobs"] = out.data["packed_logprobs"].clone() if ref_logp is None else ref_logp
    data["rewards"] = torch.as_tensor(rewards, dtype=torch.float32)
    data["values"] = torch.zeros(sum(lens)) if values is None else values
    return SequenceSample.from_default(lens, list(out.ids), data)


def _answer_logp_sums(iface, model, sample):
    lp = iface.inference(model, sample.select(["packed_input_ids"])).data["packed_ref_logprobs"]
    mask = sample.data["packed_logprobs"] != 0
    sums, s = [], 0
    for L in _lens(sample):
        sums.append(float((lp[s:s + L - 1] * mask[s:s + L - 1]).sum()))
        s += L - 1
    return sums


def test_actor_train_step_moves_towards_high_reward_answers():
    config = tiny_config()
    model = _actor(config, eos=config.vocab_size - 1, lr=2e-3)
    gcfg = GenerationHyperparameters(max_new_tokens=6, min_new_tokens=0, top_k=1000, top_p=1.0)
    iface = PPOActorInterface(generation_config=gcfg, n_minibatches=2, kl_ctl=0.0, value_norm=False,
                              adaptive_kl_ctl=True)
    torch.manual_seed(1)
    out = iface.generate(model, _prompts(config.vocab_size, seed=5))
    rewards = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    # Reward only counts for finished sequences: mark all finished.
    out.data["seq_no_eos_mask"] = torch.zeros(out.bs, dtype=torch.bool)
    batch = _train_batch(out, rewards)
    before = _answer_logp_sums(iface, model, batch)
    flat0 = model.module.module.flat_param.detach().clone()
    for _ in range(3):
        stats = iface.train_step(model, batch, MicroBatchSpec(n_mbs=2))
    for k in ("actor_loss", "actor_clip_ratio", "ppo_approx_kl", "importance_weight", "task_reward",
              "kl_reward", "advantage", "avg_seq_len", "avg_prompt_len", "grad_norm", "lr", "kl_ctl"):
        assert k in stats and math.isfinite(stats[k]), (k, stats)
    assert stats["task_reward"] == pytest.approx(0.0)
    assert stats["avg_seq_len"] == pytest.approx(sum(_lens(out)) / out.bs)
    assert stats["avg_prompt_len"] == pytest.approx(sum(PROMPT_LENS) / len(PROMPT_LENS))
    assert not torch.equal(flat0, model.module.module.flat_param)
    assert not model.module.module.training or all(not m.training for m in model.module.module.children())
    after = _answer_logp_sums(iface, model, batch)
    gain = [a - b for a, b in zip(after, before)]
    hi = sum(g for g, r in zip(gain, rewards) if r > 0) / 3
    lo = sum(g for g, r in zip(gain, rewards) if r < 0) / 3
    assert hi > 0 and hi > lo, (gain, rewards)


def test_actor_train_step_with_logits_mask_and_kl():
    config = tiny_config()
    model = _actor(config, eos=config.vocab_size - 1, lr=1e-3)
    gcfg = GenerationHyperparameters(max_new_tokens=5, min_new_tokens=0, top_k=16, top_p=0.95)
    iface = PPOActorInterface(generation_config=gcfg, n_minibatches=3, kl_ctl=0.1)
    torch.manual_seed(2)
    out = iface.generate(model, _prompts(config.vocab_size, seed=6))
    ref = out.data["packed_logprobs"] + 0.1  # prompt labels are masked out by the interface
    batch = _train_batch(out, [0.5] * out.bs, ref_logp=ref)
    stats = iface.train_step(model, batch)
    assert 0 < stats["valid_vocab_ratio"] <= 16 / config.vocab_size + 1e-6
    avg_answer = (sum(_lens(out)) - sum(PROMPT_LENS)) / out.bs
    # kl reward per token: -kl_ctl * (old - ref) = 0.01; reported as a per-sequence sum.
    assert stats["kl_reward"] == pytest.approx(0.01 * avg_answer, rel=1e-4)
    assert stats["ref_kl"] == pytest.approx(-0.1 * avg_answer, rel=1e-4)
    assert stats["task_reward"] == pytest.approx(0.5)
    assert stats["importance_weight"] == pytest.approx(1.0, abs=0.05)  # first minibatch starts on-policy


def test_critic_train_step_reduces_value_loss():
    config = tiny_config()
    actor = _actor(config, eos=config.vocab_size - 1)
    gen = PPOActorInterface(generation_config=_greedy(5))
    out = gen.generate(actor, _prompts(config.vocab_size, seed=7))
    out.data["seq_no_eos_mask"] = torch.tensor([False, True, False, False, True, False])
    ccfg = dataclasses.replace(config, is_critic=True)
    critic = train_model(whole_model(ccfg, full_state(ccfg, seed=1)), lr=3e-3, tokenizer=_tok(0))
    iface = PPOCriticInterface(n_minibatches=2, kl_ctl=0.05, value_norm=True, value_norm_beta=0.9)
    rewards = [2.0, -1.0, 0.5, 3.0, 0.0, -2.0]
    losses = []
    for _ in range(6):
        vals = iface.inference(critic, out.select(["packed_input_ids", "seq_no_eos_mask"]))
        assert vals.keys == {"values"} and vals.data["values"].shape == (sum(_lens(out)),)
        batch = _train_batch(out, rewards, values=vals.data["values"])
        stats = iface.train_step(critic, batch)
        assert math.isfinite(stats["value_loss"]) and "value_clip_ratio" in stats
        losses.append(stats["value_loss"])
    assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------------- #
# (dp, tp, pp) meshes against one process
# --------------------------------------------------------------------------- #
def _fixed_batch(config) -> SequenceSample:
    """A PPO training batch with random tokens, log-probs, rewards and values."""
    g = torch.Generator().manual_seed(11)
    lens, plens = [7, 9, 6, 10, 8, 7, 9, 6], [3, 2, 4, 3, 5, 2, 3, 2]
    total = sum(lens)
    pm = torch.cat([torch.arange(n) < p for n, p in zip(lens, plens)])
    ids = torch.randint(0, config.vocab_size, (total,), generator=g)
    from realhf.impl.model.interface.common import shifted_answer_mask
    from realhf.impl.model.utils.functional import cu_seqlens_from_lengths

    amask = shifted_answer_mask(pm, cu_seqlens_from_lengths(lens))
    lp = (-torch.rand(total - len(lens), generator=g) * 5 - 0.5) * amask
    data = {
        "packed_input_ids": ids, "prompt_mask": pm, "packed_logprobs": lp,
        "packed_ref_logprobs": lp + 0.05 * torch.randn(lp.shape, generator=g),
        "rewards": torch.randn(len(lens), generator=g),
        "values": torch.randn(total, generator=g) * 0.3,
        "seq_no_eos_mask": torch.tensor([False, True, False, False, True, False, False, True]),
    }
    return SequenceSample.from_default(lens, [f"b{i}" for i in range(len(lens))], data)


_MESH_KEYS = ("actor_loss", "actor_clip_ratio", "ppo_approx_kl", "importance_weight", "task_reward", "kl_reward",
              "advantage", "avg_seq_len", "grad_norm")


def _mesh_run(actor_net, critic_net, batch_items, prompt_items, n_minibatches):
    from realhf.impl.model.backend.train_engine import TrainModule
    from tests.interface._sft_utils import optimizer

    actor = Model("actor", actor_net, tokenizer=_tok(1))
    actor.module = TrainModule(actor_net, optimizer(3e-3), total_steps=10)
    critic = Model("critic", critic_net, tokenizer=_tok(1))
    critic.module = TrainModule(critic_net, optimizer(3e-3), total_steps=10)
    a = PPOActorInterface(generation_config=_greedy(5), n_minibatches=n_minibatches)
    c = PPOCriticInterface(n_minibatches=n_minibatches)
    out = {}
    gen = a.generate(actor, prompt_items, MicroBatchSpec(n_mbs=2))
    out["gen"] = None if gen is None else gen.data["packed_input_ids"].clone()
    ref = a.inference(actor, batch_items.select(["packed_input_ids"]), MicroBatchSpec(n_mbs=2))
    out["ref"] = None if ref is None else ref.data["packed_ref_logprobs"].clone()
    out["actor"] = a.train_step(actor, batch_items, MicroBatchSpec(n_mbs=2))
    out["critic"] = c.train_step(critic, batch_items, MicroBatchSpec(n_mbs=2))
    return out


def _minibatches(dp: int) -> int:
    # Minibatches are cut per dp shard, so only one minibatch gives the single-process step under dp.
    return 1 if dp > 1 else 2


def _mesh_worker(rank: int, world: int, dp: int, tp: int, pp: int):
    from realhf.base import constants
    from tests.parallel._mesh import MODEL, coords, setup_mesh, stage_from_full

    torch.manual_seed(0)
    config = tiny_config()
    ccfg = dataclasses.replace(config, is_critic=True)
    full, cfull = full_state(config), full_state(ccfg, seed=1)
    setup_mesh(dp, tp, pp)
    with constants.model_scope(MODEL):
        d = constants.data_parallel_rank()
        batch = _fixed_batch(config)
        k = batch.bs // dp
        items = batch.unpack()
        local = SequenceSample.gather(items[d * k:(d + 1) * k])
        res = _mesh_run(stage_from_full(config, full), stage_from_full(ccfg, cfull), local,
                        _prompts(config.vocab_size), _minibatches(dp))
        res["coords"] = coords()
    return res


@pytest.mark.distributed
@pytest.mark.parametrize("dp,tp,pp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_mesh_matches_single_process(dp, tp, pp):
    from realhf.base.testing import run_distributed

    config = tiny_config()
    ccfg = dataclasses.replace(config, is_critic=True)
    ref = _mesh_run(whole_model(config, full_state(config)), whole_model(ccfg, full_state(ccfg, seed=1)),
                    _fixed_batch(config), _prompts(config.vocab_size), _minibatches(dp))
    results = run_distributed(_mesh_worker, dp * tp * pp, timeout=180, args=(dp, tp, pp))
    for r in results:
        for k in _MESH_KEYS:
            assert r["actor"][k] == pytest.approx(ref["actor"][k], rel=1e-4, abs=1e-5), (k, r["coords"])
        for k in ("value_loss", "value_clip_ratio", "returns", "grad_norm"):
            assert r["critic"][k] == pytest.approx(ref["critic"][k], rel=1e-4, abs=1e-5), (k, r["coords"])
        last = r["coords"]["pp"] == pp - 1
        assert (r["gen"] is not None) == last and (r["ref"] is not None) == last
        if last:
            assert torch.equal(r["gen"], ref["gen"])
            if dp == 1:
                torch.testing.assert_close(r["ref"], ref["ref"], rtol=1e-4, atol=1e-4)
