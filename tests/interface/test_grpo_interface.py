"""The ``grpo_actor`` interface on one process with a tiny llama, and on small meshes."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import List

import pytest
import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec, Model, make_interface
from realhf.impl.model.interface.common import shifted_answer_mask
from realhf.impl.model.interface.grpo_interface import (
    ADV_ESTIMATORS,
    GRPOActorInterface,
    GroupBatch,
    check_groups,
    group_advantages,
    grouped_sample,
    split_greedy,
)
from realhf.impl.model.utils import rl_functional as rl
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths

from tests.interface._sft_utils import full_state, tiny_config, train_model, whole_model

PROMPT_LENS = [3, 5, 2, 4]
G = 3


def _prompts(vocab: int, seed: int = 0) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (sum(PROMPT_LENS),), generator=g)
    return SequenceSample.from_default(PROMPT_LENS, [f"p{i}" for i in range(len(PROMPT_LENS))],
                                       {"packed_prompts": toks})


def _actor(config, lr: float = 3e-3, seed: int = 0) -> Model:
    tok = types.SimpleNamespace(eos_token_id=config.vocab_size - 1, pad_token_id=0)
    return train_model(whole_model(config, full_state(config, seed=seed)), lr=lr, tokenizer=tok)


def _sampling(max_new: int = 6) -> GenerationHyperparameters:
    return GenerationHyperparameters(max_new_tokens=max_new, min_new_tokens=0, top_k=1000, top_p=1.0)


def _with_rewards(out: SequenceSample, rewards: List[float]) -> SequenceSample:
    """``out`` plus one reward per sequence in the group layout (what rew_inf returns)."""
    r = SequenceSample(keys={"rewards"}, trailing_shapes={"rewards": ()}, dtypes={"rewards": torch.float32},
                       ids=list(out.ids), seqlens={"rewards": [[1] * len(s) for s in out.seqlens["packed_input_ids"]]},
                       data={"rewards": torch.tensor(rewards, dtype=torch.float32)})
    return out.update_(r)


def _answer_logp(iface: GRPOActorInterface, model: Model, sample: SequenceSample) -> torch.Tensor:
    """Sum of answer-token log-probs of every sequence under the current weights."""
    lp = iface.inference(model, sample.select(["packed_input_ids"])).data["packed_ref_logprobs"]
    lens = [n for s in sample.seqlens["packed_input_ids"] for n in s]
    pm = sample.data["prompt_mask"]
    mask = shifted_answer_mask(pm, cu_seqlens_from_lengths(lens))
    ids = rl.sequence_ids(cu_seqlens_from_lengths([n - 1 for n in lens]), lp.numel())
    return rl.segment_sum(torch.where(mask, lp, torch.zeros_like(lp)).double(), ids, len(lens))


def test_registered():
    assert isinstance(make_interface("grpo_actor"), GRPOActorInterface)


def test_generate_holds_one_group_per_prompt():
    config = tiny_config()
    model = _actor(config)
    prompts = _prompts(config.vocab_size)
    torch.manual_seed(0)
    out = GRPOActorInterface(generation_config=_sampling(), group_size=G).generate(model, prompts,
                                                                                   MicroBatchSpec(n_mbs=2))
    assert out.ids == prompts.ids and out.bs == len(PROMPT_LENS)
    check_groups(out, G)
    for key, per in (("packed_input_ids", 0), ("prompt_mask", 0), ("packed_logprobs", -1)):
        for item, ids_item in zip(out.seqlens[key], out.seqlens["packed_input_ids"]):
            assert item == [n + per for n in ids_item], key
    assert out.seqlens["seq_no_eos_mask"] == [[1] * G] * len(PROMPT_LENS)
    ids, pm = out.data["packed_input_ids"], out.data["prompt_mask"]
    lens = [n for s in out.seqlens["packed_input_ids"] for n in s]
    prompt_toks = torch.split(prompts.data["packed_prompts"], PROMPT_LENS)
    answers = []
    for j, (seq, m) in enumerate(zip(torch.split(ids, lens), torch.split(pm, lens))):
        p = prompt_toks[j // G]
        assert torch.equal(seq[:len(p)], p) and bool(m[:len(p)].all()) and not bool(m[len(p):].any())
        answers.append(tuple(seq[len(p):].tolist()))
    # sampling draws every copy independently: a group is not G copies of one answer
    assert any(len(set(answers[i * G:(i + 1) * G])) > 1 for i in range(len(PROMPT_LENS)))


def test_reference_inference_keeps_groups_and_matches_generation():
    config = tiny_config()
    model = _actor(config)
    iface = GRPOActorInterface(generation_config=GenerationHyperparameters(max_new_tokens=5, min_new_tokens=0,
                                                                           greedy=True), group_size=2)
    out = iface.generate(model, _prompts(config.vocab_size, seed=2))
    ref = iface.inference(model, out.select(["packed_input_ids"]), MicroBatchSpec(n_mbs=3))
    assert ref.ids == out.ids and ref.seqlens["packed_ref_logprobs"] == out.seqlens["packed_logprobs"]
    got, exp = ref.data["packed_ref_logprobs"], out.data["packed_logprobs"]
    answer = exp != 0
    assert float((got[answer] - exp[answer]).abs().max()) < 1e-4


@pytest.mark.parametrize("estimator", ADV_ESTIMATORS)
def test_train_step_each_estimator_moves_towards_rewarded_answers(estimator):
    config = tiny_config()
    model = _actor(config, lr=2e-3)
    iface = GRPOActorInterface(generation_config=_sampling(), group_size=G, n_minibatches=2,
                               adv_estimator=estimator)
    torch.manual_seed(1)
    out = iface.generate(model, _prompts(config.vocab_size, seed=5))
    rewards = [1.0, 0.0, 0.0] * len(PROMPT_LENS)  # the first answer of every group wins
    if estimator == "remax":  # each item ends with its greedy answer, scored between winner and losers
        rewards = [1.0, 0.0, 0.0, 0.5] * len(PROMPT_LENS)
    batch = _with_rewards(out, rewards)
    sampled = split_greedy(batch, G)[0] if estimator == "remax" else batch
    before = _answer_logp(iface, model, sampled)
    flat0 = model.module.module.flat_param.detach().clone()
    for _ in range(3):
        stats = iface.train_step(model, batch, MicroBatchSpec(n_mbs=2))
    for k in ("actor_loss", "pg_loss", "clip_ratio", "importance_weight", "approx_kl", "task_reward", "advantage",
              "kept_group_frac", "avg_seq_len", "avg_prompt_len", "grad_norm"):
        assert k in stats and math.isfinite(stats[k]), (k, stats)
    assert stats["task_reward"] == pytest.approx(1 / 3) and stats["n_updates"] == 2
    assert stats["avg_prompt_len"] == pytest.approx(sum(PROMPT_LENS) / len(PROMPT_LENS))
    assert stats["grad_norm"] > 0 and not torch.equal(flat0, model.module.module.flat_param)
    gain = (_answer_logp(iface, model, sampled) - before).view(-1, G)
    assert float((gain[:, 0] - gain[:, 1:].mean(1)).mean()) > 0, gain


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    config = tiny_config()
    model = _actor(config)
    iface = GRPOActorInterface(generation_config=_sampling(), group_size=G, dynamic_sampling=True,
                               adv_estimator="reinforce_plus_plus")  # nonzero advantages even for equal rewards
    torch.manual_seed(3)
    out = iface.generate(model, _prompts(config.vocab_size, seed=6))
    batch = _with_rewards(out, [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1.0])
    stats = iface.train_step(model, batch)
    assert stats["kept_group_frac"] == pytest.approx(0.5) and stats["n_updates"] == 1
    answers = [n - p for item, p in zip(batch.seqlens["packed_input_ids"], PROMPT_LENS) for n in item]
    kept = sum(answers[G:2 * G]) + sum(answers[3 * G:])
    assert stats["trained_token_frac"] == pytest.approx(kept / sum(answers))
    # every group equal: nothing to learn, no optimizer step
    flat = model.module.module.flat_param.detach().clone()
    stats = iface.train_step(model, _with_rewards(out, [0.0] * G + [1.0] * G + [0.5] * (2 * G)))
    assert stats["kept_group_frac"] == 0 and stats["n_updates"] == 0 and stats["grad_norm"] == 0
    assert torch.equal(flat, model.module.module.flat_param)


# --------------------------------------------------------------------------- #
# ReMax: one greedy answer per prompt as the baseline
# --------------------------------------------------------------------------- #
def test_remax_generate_appends_the_greedy_answer():
    config = tiny_config()
    model = _actor(config)
    prompts = _prompts(config.vocab_size, seed=4)
    sampling = GenerationHyperparameters(max_new_tokens=6, min_new_tokens=0, top_k=5, top_p=1.0)  # a logits mask
    torch.manual_seed(7)
    plain = GRPOActorInterface(generation_config=sampling, group_size=G).generate(model, prompts,
                                                                                  MicroBatchSpec(n_mbs=2))
    torch.manual_seed(7)
    out = GRPOActorInterface(generation_config=sampling, group_size=G, adv_estimator="remax").generate(
        model, prompts, MicroBatchSpec(n_mbs=2))
    greedy_cfg = dataclasses.replace(sampling, greedy=True)
    greedy = GRPOActorInterface(generation_config=greedy_cfg, group_size=1,
                                adv_estimator="reinforce_plus_plus").generate(model, prompts)
    check_groups(out, G + 1)
    assert out.seqlens["seq_no_eos_mask"] == [[1] * (G + 1)] * len(PROMPT_LENS)
    rest, _ = split_greedy(_with_rewards(out, [0.0] * (G + 1) * len(PROMPT_LENS)), G)
    # the sampled answers draw the random numbers they draw without ReMax
    for key in ("packed_input_ids", "prompt_mask", "packed_logprobs", "packed_logits_mask"):
        assert rest.seqlens[key] == plain.seqlens[key] and torch.equal(rest.data[key], plain.data[key]), key
    lens = [n for s in out.seqlens["packed_input_ids"] for n in s]
    seqs = torch.split(out.data["packed_input_ids"], lens)
    masks = torch.split(out.data["packed_logits_mask"], lens)
    for i, want in enumerate(torch.split(greedy.data["packed_input_ids"], greedy.item_lengths("packed_input_ids"))):
        last = (i + 1) * (G + 1) - 1
        assert torch.equal(seqs[last], want)  # argmax decoding, same budget
        assert bool(masks[last].all())  # argmax removes no token: the mask keeps all
    assert not all(bool(m.all()) for m in masks)  # top-k did cut the sampled answers' vocabulary


def test_remax_train_advantages_are_reward_minus_greedy_reward():
    config = tiny_config()
    model = _actor(config)
    iface = GRPOActorInterface(generation_config=_sampling(), group_size=G, adv_estimator="remax",
                               n_minibatches=1)
    torch.manual_seed(2)
    out = iface.generate(model, _prompts(config.vocab_size, seed=8))
    rewards = [[1.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.0, 1.0], [2.0, 1.0, 0.0, 1.0], [0.3, 0.3, 0.9, 0.0]]
    batch = _with_rewards(out, [r for item in rewards for r in item])
    seen = []
    engine = model.module
    real = engine.train_batch

    def spy(mb, *a, **kw):
        seen.append(mb)
        return real(mb, *a, **kw)

    engine.train_batch = spy
    stats = iface.train_step(model, batch)
    (mb,) = seen
    # only the sampled answers reach the update, with r_i - r_greedy on each of their answer tokens
    assert mb.seqlens["packed_input_ids"] == [s[:G] for s in out.seqlens["packed_input_ids"]]
    lens = [n for s in mb.seqlens["packed_input_ids"] for n in s]
    plens = [p for p in PROMPT_LENS for _ in range(G)]
    expected = [r - item[G] for item in rewards for r in item[:G]]  # by hand: r_i - r_greedy of its prompt
    short1 = cu_seqlens_from_lengths([n - 1 for n in lens])
    mask = mb.data["ppo_loss_mask"]
    adv = mb.data["advantages"]
    for j, (n, p) in enumerate(zip(lens, plens)):
        a, m = adv[short1[j]:short1[j + 1]], mask[short1[j]:short1[j + 1]]
        assert int(m.sum()) == n - p  # every answer token is trained
        assert torch.allclose(a[m], torch.full_like(a[m], expected[j])) and not bool(a[~m].any())
    sampled_r = [r for item in rewards for r in item[:G]]
    assert stats["task_reward"] == pytest.approx(sum(sampled_r) / len(sampled_r))
    assert stats["greedy_task_reward"] == pytest.approx(sum(item[G] for item in rewards) / len(rewards))
    assert stats["n_seqs"] == len(PROMPT_LENS) * G and stats["n_updates"] == 1


def test_remax_baseline_gets_the_same_overlong_penalty_and_clip():
    lens, gens = [6, 7, 5, 8], [3, 5, 2, 5]
    cfg = GRPOActorInterface(generation_config=GenerationHyperparameters(max_new_tokens=5, min_new_tokens=0),
                             group_size=2, adv_estimator="remax", overlong_tokens=2, overlong_penalty_factor=1.0,
                             max_reward_clip=1.5)
    b = _group_batch(lens, gens, [1.0, 3.0, 0.0, 1.0])
    b.greedy_score = torch.tensor([0.5, 2.0], dtype=torch.float64)
    b.greedy_gen_len = torch.tensor([5.0, 1.0], dtype=torch.float64)
    adv, mask, stats = group_advantages(b, cfg)
    # sampled: 1, clip(3 - 1) = 1.5, 0, clip(1 - 1) = 0; greedy: 0.5 - 1 = -0.5, clip(2) = 1.5
    want = torch.tensor([1.0 + 0.5, 1.5 + 0.5, 0.0 - 1.5, 0.0 - 1.5])
    torch.testing.assert_close(adv, rl.broadcast_to_tokens(want, b.short1, mask).float())
    assert stats["greedy_task_reward"] == pytest.approx(1.25)


def test_remax_refuses_options_without_a_greedy_baseline():
    greedy = GenerationHyperparameters(max_new_tokens=4, min_new_tokens=0, greedy=True)
    for kw in (dict(generation_config=greedy), dict(dynamic_sampling=True), dict(reward_norm_mean_level="batch")):
        with pytest.raises(ValueError, match="remax"):
            GRPOActorInterface(group_size=2, adv_estimator="remax", **kw)
    assert GRPOActorInterface(group_size=1, adv_estimator="remax").answers_per_item == 2


def _group_batch(lens, gen_lens, scores, no_eos=None, kl=None) -> GroupBatch:
    short1 = cu_seqlens_from_lengths([n - 1 for n in lens])
    mask = torch.cat([torch.arange(n - 1) >= n - 1 - a for n, a in zip(lens, gen_lens)])
    no_eos = torch.zeros(len(lens), dtype=torch.bool) if no_eos is None else torch.tensor(no_eos)
    return GroupBatch(score=torch.tensor(scores, dtype=torch.float64), gen_len=torch.tensor(gen_lens),
                      no_eos=no_eos, short1=short1, loss_mask=mask, kl=kl)


def test_group_advantages_reward_shaping():
    lens, gens = [6, 7, 5, 8], [3, 4, 2, 5]
    cfg = GRPOActorInterface(generation_config=GenerationHyperparameters(max_new_tokens=5, min_new_tokens=0),
                             group_size=2, overlong_tokens=2, overlong_penalty_factor=1.0, norm_adv_by_std=False,
                             kl_ctl=0.5, mask_no_eos_with_zero=True)
    kl = torch.full((sum(lens) - len(lens),), 0.1, dtype=torch.float64)
    b = _group_batch(lens, gens, [1.0, 0.0, 0.0, 1.0], no_eos=[False, False, True, False], kl=kl)
    adv, mask, stats = group_advantages(b, cfg)
    # overlong: answers of 4 and 5 tokens of budget 5, soft zone 2 -> -0.5 and -1
    pen = torch.tensor([0.0, -0.5, 0.0, -1.0], dtype=torch.float64)
    shaped = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64) + pen - 0.5 * 0.1 * torch.tensor(gens)
    assert stats["overlong_penalty"] == pytest.approx(float(pen.mean()))
    assert stats["reward"] == pytest.approx(float(shaped.mean()))
    expected = rl.grpo_advantages(shaped, b.short1, 2, mask, norm_adv_by_std=False)
    torch.testing.assert_close(adv, expected.float())
    # the truncated third sequence is not trained on
    seq_of = rl.sequence_ids(b.short1, mask.numel())
    assert not bool(mask[seq_of == 2].any()) and bool((mask == b.loss_mask)[seq_of != 2].all())


def test_group_advantages_batch_norms_and_dr_grpo_defaults():
    lens, gens = [6, 7, 5, 8, 6, 6], [3, 4, 2, 5, 3, 1]
    b = _group_batch(lens, gens, [1.0, 0.0, 0.5, 0.5, 2.0, -1.0])
    cfg = GRPOActorInterface(group_size=2, adv_estimator="rloo", reward_norm_mean_level="batch",
                             reward_norm_std_level="batch", adv_norm_mean_level="batch", adv_norm_std_level="batch")
    adv, mask, _ = group_advantages(b, cfg)
    r = rl.normalize(b.score, "batch", "batch", 2)
    expected = rl.normalize(rl.rloo_advantages(r.double(), b.short1, 2, mask), "batch", "batch", 2, mask=mask,
                            short1cu_seqlens=b.short1)
    torch.testing.assert_close(adv, expected.float())
    assert float(adv[mask].mean()) == pytest.approx(0.0, abs=1e-6)
    dr = GRPOActorInterface(group_size=2, adv_estimator="dr_grpo")
    assert dr.agg_mode == "seq-mean-token-sum-norm" and not dr.norm_by_std
    assert GRPOActorInterface(group_size=2).agg_mode == "token-mean"


def test_items_must_hold_whole_groups():
    config = tiny_config()
    model = _actor(config)
    out = GRPOActorInterface(generation_config=_sampling(3), group_size=2).generate(model, _prompts(config.vocab_size))
    batch = _with_rewards(out, [0.0, 1.0] * len(PROMPT_LENS))
    with pytest.raises(ValueError, match="group_size=3"):
        GRPOActorInterface(generation_config=_sampling(3), group_size=3).train_step(model, batch)


# --------------------------------------------------------------------------- #
# dp / pp meshes against one process
# --------------------------------------------------------------------------- #
MESH_KW = dict(group_size=2, n_minibatches=1, adv_estimator="reinforce_plus_plus_baseline", kl_ctl=0.1,
               kl_loss_coef=0.05, adv_norm_mean_level="batch", adv_norm_std_level="batch", use_decoupled_loss=True,
               behav_imp_weight_cap=5.0, importance_sampling_level="sequence")
MESH_KEYS = ("actor_loss", "pg_loss", "kl_loss", "advantage", "reward", "ref_kl", "importance_weight",
             "behav_imp_weight", "grad_norm", "avg_seq_len")


def _mesh_batch(config) -> SequenceSample:
    """Four groups of two with fixed tokens, behaviour/reference log-probs and rewards."""
    g = torch.Generator().manual_seed(11)
    lens, plens = [7, 9, 6, 10, 8, 7, 9, 6], [3, 3, 4, 4, 5, 5, 2, 2]
    pm = torch.cat([torch.arange(n) < p for n, p in zip(lens, plens)])
    amask = shifted_answer_mask(pm, cu_seqlens_from_lengths(lens))
    lp = (-torch.rand(sum(lens) - len(lens), generator=g) * 3 - 0.5) * amask
    data = {"packed_input_ids": torch.randint(0, config.vocab_size, (sum(lens),), generator=g), "prompt_mask": pm,
            "packed_logprobs": lp, "packed_ref_logprobs": lp + 0.05 * torch.randn(lp.shape, generator=g),
            "rewards": torch.tensor([1.0, 0.0, 0.3, 0.9, 0.0, 0.0, 2.0, -1.0]),
            "seq_no_eos_mask": torch.tensor([False, True, False, False, True, False, False, True])}
    shifted = [n - 1 for n in lens]
    per = {"packed_input_ids": lens, "prompt_mask": lens, "packed_logprobs": shifted,
           "packed_ref_logprobs": shifted, "rewards": [1] * 8, "seq_no_eos_mask": [1] * 8}
    return grouped_sample([f"q{i}" for i in range(4)], 2, data, per)


def _mesh_run(net, batch) -> dict:
    from realhf.impl.model.backend.train_engine import TrainModule
    from tests.interface._sft_utils import optimizer

    model = Model("actor", net, tokenizer=None)
    model.module = TrainModule(net, optimizer(3e-3), total_steps=10)
    iface = GRPOActorInterface(generation_config=GenerationHyperparameters(max_new_tokens=8, min_new_tokens=0, greedy=True),
                               **MESH_KW)
    return iface.train_step(model, batch, MicroBatchSpec(n_mbs=2))


def _mesh_worker(rank: int, world: int, dp: int, pp: int):
    from realhf.base import constants
    from tests.parallel._mesh import MODEL, coords, setup_mesh, stage_from_full

    config = tiny_config()
    setup_mesh(dp, 1, pp)
    with constants.model_scope(MODEL):
        d = constants.data_parallel_rank()
        items = _mesh_batch(config).unpack()
        k = len(items) // dp
        local = SequenceSample.gather(items[d * k:(d + 1) * k])
        res = {"stats": _mesh_run(stage_from_full(config, full_state(config)), local), "coords": coords()}
    return res


@pytest.mark.distributed
@pytest.mark.parametrize("dp,pp", [(2, 1), (1, 2)])
def test_mesh_matches_single_process(dp, pp):
    """Batch-level statistics are global: a dp split (or a pipeline) gives the single-process update."""
    from realhf.base.testing import run_distributed

    config = tiny_config()
    ref = _mesh_run(whole_model(config, full_state(config)), _mesh_batch(config))
    for r in run_distributed(_mesh_worker, dp * pp, timeout=180, args=(dp, pp)):
        for k in MESH_KEYS:
            got = r["stats"][k]
            assert got == pytest.approx(ref[k], rel=1e-4, abs=1e-5), (k, r["coords"], got, ref[k])


@pytest.mark.parametrize("n_minibatches,n_mbs", [(1, 1), (1, 3), (2, 2)])
def test_reusing_rollout_products_trains_as_recomputing(n_minibatches, n_mbs, monkeypatch):
    """The first minibatch's forward replays the generation's products (linear_replay); the
    update and statistics equal those of a step that recomputes them."""
    from realhf.impl.model.nn import linear_replay
    from realhf.impl.model.nn.fast_decode import panel_kernel_supported

    if not panel_kernel_supported():
        pytest.skip("the native decoding loop does not run on this machine")
    replays = []
    apply = linear_replay._Replayed.apply
    monkeypatch.setattr(linear_replay._Replayed, "apply", lambda *a: replays.append(1) or apply(*a))
    config = tiny_config()
    runs = {}
    for reuse in (True, False):
        model = _actor(config, lr=2e-3)
        iface = GRPOActorInterface(generation_config=_sampling(), group_size=G, n_minibatches=n_minibatches,
                                   reuse_rollout_products=reuse)
        torch.manual_seed(1)
        out = iface.generate(model, _prompts(config.vocab_size, seed=5))
        assert bool(len(getattr(model.module.module, "_rollout_captures", []))) == reuse
        n = len(replays)
        stats = iface.train_step(model, _with_rewards(out, [1.0, 0.0, 0.5] * len(PROMPT_LENS)),
                                 MicroBatchSpec(n_mbs=n_mbs))
        runs[reuse] = (stats, model.module.module.flat_param.detach().clone(), len(replays) - n)
        assert model.module.module._rollout_captures == []  # released by the update
    (s_r, flat_r, n_r), (s_p, flat_p, n_p) = runs[True], runs[False]
    assert n_p == 0 and n_r == n_mbs * (7 * config.n_layers + 1)  # the first minibatch only
    assert s_r["grad_norm"] == pytest.approx(s_p["grad_norm"], rel=1e-4)
    assert s_r["actor_loss"] == pytest.approx(s_p["actor_loss"], rel=1e-4, abs=1e-7)
    flat0 = _actor(config).module.module.flat_param
    assert float((flat_r - flat_p).norm()) < 1e-4 * float((flat_p - flat0).norm())
