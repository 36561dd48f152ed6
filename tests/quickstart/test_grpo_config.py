"""``grpo`` quickstart config: defaults, estimator-dependent choices, and refusals naming the key."""

from __future__ import annotations

import os

import pytest

from realhf.api.quickstart import ConfigError
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.assets import ASSETS_DIR, dataset_path

TINY = os.path.join(ASSETS_DIR, "models", "tiny-llama")


def _grpo(*extra: str, workers: int = 2):
    import realhf.experiments  # noqa: F401  (registers grpo)

    args = ["experiment_name=grpo", "trial_name=t", f"n_gpus_per_node={workers}", "allocation_mode=heuristic",
            f"dataset.path={dataset_path('prompt-train')}", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            f"actor.path={TINY}", "actor.init_from_scratch=True", "grpo.gen.max_new_tokens=16",
            "grpo.gen.min_new_tokens=1", "grpo.group_size=4"]
    return parse_quickstart("grpo", args + list(extra))


def _calls(cfg):
    return {r.name: r for r in cfg.initial_setup().model_rpcs}


def test_defaults_build_three_calls_without_reference():
    cfg = _grpo()
    g = cfg.grpo
    assert (g.adv_estimator, g.loss_agg_mode, g.kl_ctl, g.kl_loss_coef, g.eps_clip_higher) == ("grpo", None, 0, 0, None)
    calls = _calls(cfg)
    assert set(calls) == {"actor_gen", "rew_inf", "actor_train"}  # no KL term: no reference model
    assert calls["rew_inf"].interface_impl.type_ == "rule_reward"
    assert calls["rew_inf"].input_keys == ("packed_input_ids", "prompt_mask")
    assert "packed_ref_logprobs" not in calls["actor_train"].input_keys
    args = calls["actor_train"].interface_impl.args
    assert args["group_size"] == 4 and args["generation_config"].max_new_tokens == 16
    assert calls["actor_gen"].interface_impl.args["reuse_rollout_products"] is True


def test_reusing_rollout_products_can_be_turned_off():
    import realhf.impl.model.interface  # noqa: F401  (registers grpo_actor)
    from realhf.api.core.model_api import make_interface

    calls = _calls(_grpo("grpo.reuse_rollout_products=False"))
    assert make_interface(calls["actor_gen"].interface_impl).reuse_rollout_products is False


@pytest.mark.parametrize("kl", ["grpo.kl_ctl=0.05", "grpo.kl_loss_coef=0.01"])
def test_a_kl_term_adds_the_reference(kl):
    calls = _calls(_grpo(kl))
    assert calls["ref_inf"].model_name.role == "ref"
    assert "packed_ref_logprobs" in calls["actor_train"].input_keys


def test_dr_grpo_resolves_its_defaults_and_shortcuts_reach_gen():
    import realhf.impl.model.interface  # noqa: F401  (registers grpo_actor)
    from realhf.api.core.model_api import make_interface

    calls = _calls(_grpo("grpo.adv_estimator=dr_grpo", "grpo.top_p=0.9", "grpo.temperature=0.7",
                         "grpo.adv_norm.mean_level=batch"))
    iface = make_interface(calls["actor_train"].interface_impl)
    assert iface.agg_mode == "seq-mean-token-sum-norm" and iface.norm_by_std is False
    assert (iface.adv_norm_mean_level, iface.adv_norm_std_level) == ("batch", None)
    gen = calls["actor_gen"].interface_impl.args["generation_config"]
    assert gen.top_p == 0.9 and gen.temperature == 0.7
    explicit = make_interface(_calls(_grpo("grpo.adv_estimator=dr_grpo", "grpo.loss_agg_mode=token-mean",
                                           "grpo.norm_adv_by_std=True"))["actor_train"].interface_impl)
    assert explicit.agg_mode == "token-mean" and explicit.norm_by_std is True


def test_reward_model_variant_uses_a_critic():
    calls = _calls(_grpo("rew_interface=paired_rw", f"rew.path={TINY}", "rew.init_from_scratch=True"))
    assert calls["rew_inf"].interface_impl.type_ == "paired_rw"
    assert calls["rew_inf"].input_keys == ("packed_input_ids",)


@pytest.mark.parametrize("override,key", [
    ("grpo.group_size=1", "grpo.group_size"),
    ("grpo.group_size=0", "grpo.group_size"),
    ("grpo.n_minibatches=0", "grpo.n_minibatches"),
    ("grpo.adv_estimator=ppo", "grpo.adv_estimator"),
    ("grpo.adv_estimator=remax grpo.greedy=True", "grpo.gen.greedy"),
    ("grpo.adv_estimator=remax grpo.gen.temperature=0", "grpo.gen.greedy"),
    ("grpo.adv_estimator=remax grpo.dynamic_sampling=True", "grpo.dynamic_sampling"),
    ("grpo.adv_estimator=remax grpo.reward_norm.mean_level=batch", "grpo.reward_norm.mean_level"),
    ("grpo.adv_estimator=remax grpo.reward_norm.std_level=group", "grpo.reward_norm.std_level"),
    ("grpo.dynamic_sampling=True grpo.dynamic_sampling_max_batches=-1", "grpo.dynamic_sampling_max_batches"),
    ("grpo.dynamic_sampling_max_batches=3", "grpo.dynamic_sampling_max_batches"),  # without dynamic_sampling
    ("grpo.norm_adv_by_std=True", "grpo.norm_adv_by_std"),  # with rloo below
    ("grpo.eps_clip=0", "grpo.eps_clip"),
    ("grpo.eps_clip=1.0", "grpo.eps_clip"),
    ("grpo.eps_clip_higher=-0.1", "grpo.eps_clip_higher"),
    ("grpo.c_clip=1.0", "grpo.c_clip"),
    ("grpo.temperature=0", "grpo.gen.greedy"),  # identical answers in every group
    ("grpo.greedy=True grpo.adv_estimator=rloo", "grpo.gen.greedy"),
    ("grpo.greedy=True grpo.adv_estimator=reinforce_plus_plus grpo.dynamic_sampling=True",
     "grpo.dynamic_sampling=True would drop every group"),
    ("grpo.importance_sampling_level=group", "grpo.importance_sampling_level"),
    ("grpo.loss_agg_mode=sum", "grpo.loss_agg_mode"),
    ("grpo.kl_ctl=-0.1", "grpo.kl_ctl"),
    ("grpo.kl_loss_coef=-1", "grpo.kl_loss_coef"),
    ("grpo.kl_estimator=k4", "grpo.kl_estimator"),
    ("grpo.reward_norm.mean_level=prompt", "grpo.reward_norm.mean_level"),
    ("grpo.adv_norm.std_level=token", "grpo.adv_norm.std_level"),
    ("grpo.overlong_tokens=4", "grpo.overlong_tokens"),
    ("grpo.overlong_tokens=17 grpo.overlong_penalty_factor=1.0", "grpo.overlong_tokens"),
    ("grpo.overlong_tokens=4 grpo.overlong_penalty_factor=-1.0", "grpo.overlong_penalty_factor"),
    ("grpo.behav_imp_weight_cap=2.0", "grpo.behav_imp_weight_cap"),
    ("grpo.use_decoupled_loss=True grpo.behav_imp_weight_cap=1.0", "grpo.behav_imp_weight_cap"),
    ("grpo.reward_output_scaling=0", "grpo.reward_output_scaling"),
    ("grpo.max_reward_clip=0", "grpo.max_reward_clip"),
    ("grpo.top_p=0", "grpo.top_p"),
    ("grpo.gen.top_k=0", "grpo.gen"),
    ("grpo.max_new_tokens=32 grpo.gen.max_new_tokens=8", "grpo.max_new_tokens"),
    ("rew_interface=critic", "rew_interface"),
    ("rule_reward.reward=nonsense", "rule_reward.reward"),
    ("rule_reward.n_workers=-1", "rule_reward.n_workers"),
    ("rule_reward.timeout_s=0", "rule_reward.timeout_s"),
    ("rule_reward.answer_key=solution", "rule_reward.answer_key"),
    ("rew_interface=paired_rw", "rew.path"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    extra = override.split()
    if key == "grpo.norm_adv_by_std":
        extra.append("grpo.adv_estimator=rloo")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _grpo(*extra)


def test_greedy_is_allowed_where_no_group_baseline_reads_it():
    cfg = _grpo("grpo.temperature=0", "grpo.adv_estimator=reinforce_plus_plus")
    assert cfg.grpo.gen.greedy


def test_missing_or_malformed_prompts_are_a_config_error(tmp_path):
    """The math reward reads the records for their answers; a bad file is refused as the key, not a traceback."""
    with pytest.raises(ConfigError, match=r"dataset\.path.*not an existing file"):
        _grpo(f"dataset.path={tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3\n')
    with pytest.raises(ConfigError, match=r"dataset\.path: .*bad\.jsonl: line 1: invalid JSON"):
        _grpo(f"dataset.path={bad}")


def test_group_levels_and_dynamic_sampling_need_groups():
    for extra in ("grpo.dynamic_sampling=True", "grpo.reward_norm.mean_level=group"):
        with pytest.raises(ConfigError, match=r"grpo\.group_size"):
            _grpo("grpo.adv_estimator=reinforce_plus_plus", "grpo.group_size=1", extra)
    assert _grpo("grpo.adv_estimator=reinforce_plus_plus", "grpo.group_size=1").grpo.group_size == 1


def test_remax_adds_a_greedy_answer_to_each_group():
    import realhf.impl.model.interface  # noqa: F401  (registers grpo_actor)
    from realhf.api.core.model_api import make_interface

    cfg = _grpo("grpo.adv_estimator=remax", "grpo.group_size=1", "grpo.adv_norm.mean_level=batch")
    assert cfg.grpo.answers_per_prompt == 2  # one sample per prompt is enough: the baseline is greedy
    calls = _calls(cfg)
    assert set(calls) == {"actor_gen", "rew_inf", "actor_train"}  # the reward call scores the greedy answers too
    iface = make_interface(calls["actor_gen"].interface_impl)
    assert iface.adv_estimator == "remax" and iface.answers_per_item == 2
    assert not iface.generation_config.greedy
    # the token budget counts the greedy answer: 3 x (48 + 16) for groups of 2
    with pytest.raises(ConfigError, match=r"\(192 tokens: \(grpo\.group_size \+ 1 greedy answer\) x"):
        _grpo("grpo.adv_estimator=remax", "grpo.group_size=2", "actor_train.max_tokens_per_mb=100")


def test_dynamic_sampling_filters_and_refills_the_train_call():
    calls = _calls(_grpo())
    assert all(c.input_filter is None for c in calls.values())
    flt = _calls(_grpo("grpo.dynamic_sampling=True"))["actor_train"].input_filter
    assert (flt.name, flt.keys, flt.max_rounds) == ("grpo_dynamic_sampling", ("rewards",), 0)  # 0: no cap
    assert flt.args["group_size"] == 4 and flt.args["overlong_tokens"] is None
    calls = _calls(_grpo("grpo.dynamic_sampling=True", "grpo.dynamic_sampling_max_batches=3",
                         "grpo.overlong_tokens=4", "grpo.overlong_penalty_factor=0.5", "grpo.max_reward_clip=5"))
    flt = calls["actor_train"].input_filter
    # the filter sees the rewards train_step sees: with the overlong penalty (answer lengths) and clip
    assert flt.keys == ("rewards", "prompt_mask") and flt.max_rounds == 3
    assert (flt.args["overlong_tokens"], flt.args["overlong_penalty_factor"], flt.args["max_reward_clip"],
            flt.args["max_new_tokens"]) == (4, 0.5, 5.0, 16)
    assert all(c.input_filter is None for n, c in calls.items() if n != "actor_train")


def test_token_budget_counts_whole_groups():
    # an item holds group_size sequences of up to 48 + 16 tokens and is never split
    with pytest.raises(ConfigError, match=r"actor_train\.max_tokens_per_mb=100 .*\(256 tokens: grpo\.group_size x"):
        _grpo("actor_train.max_tokens_per_mb=100")


def test_exported_config_is_the_registered_experiment():
    import realhf
    import realhf.experiments  # noqa: F401
    from realhf.api.quickstart.entrypoint import get_quickstart_exp

    assert realhf.GRPOConfig is get_quickstart_exp("grpo") and "GRPOConfig" in realhf.__all__
    assert realhf.GRPOHyperparameters().adv_estimator == "grpo"
