"""``ppo.top_p`` / ``ppo.top_k`` / ... are shortcuts for the ``ppo.gen.*`` sampling options."""

import os

import pytest

from realhf.api.quickstart import ConfigError, PPOHyperparameters
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.assets import ASSETS_DIR, dataset_path

TINY = os.path.join(ASSETS_DIR, "models", "tiny-llama")


def _ppo(*extra):
    args = ["experiment_name=ppo", "trial_name=t", "n_gpus_per_node=1", "allocation_mode=d1",
            f"dataset.path={dataset_path('prompt-train')}", "dataset.train_bs_n_seqs=8",
            "dataset.max_prompt_len=48"]
    for role in ("actor", "critic", "ref", "rew"):
        args += [f"{role}.path={TINY}", f"{role}.init_from_scratch=True"]
    import realhf.experiments  # noqa: F401  (registers ppo)

    return parse_quickstart("ppo", args + list(extra))


def test_documented_command_options_reach_the_generation_config():
    cfg = _ppo("ppo.kl_ctl=0.1", "ppo.top_p=0.9", "ppo.top_k=1000")
    assert cfg.ppo.kl_ctl == 0.1
    assert cfg.ppo.gen.top_p == 0.9 and cfg.ppo.gen.top_k == 1000
    built = cfg.initial_setup()
    gen = next(r for r in built.model_rpcs if r.name == "actor_gen").interface_impl.args["generation_config"]
    assert gen.top_k == 1000 and gen.top_p == 0.9


@pytest.mark.parametrize("key,value,expected", [
    ("max_new_tokens", "16", 16), ("min_new_tokens", "3", 3), ("greedy", "True", True),
    ("top_p", "0.5", 0.5), ("top_k", "7", 7), ("temperature", "0.7", 0.7),
])
def test_each_shortcut_forwards(key, value, expected):
    # min_new_tokens defaults to max_new_tokens' default: the two are set together
    extra = {"min_new_tokens": ["ppo.max_new_tokens=32"], "max_new_tokens": ["ppo.gen.min_new_tokens=1"]}.get(key, [])
    cfg = _ppo(*extra, f"ppo.{key}={value}")
    assert getattr(cfg.ppo.gen, key) == expected and getattr(cfg.ppo, key) == expected


def test_both_forms_agree_or_are_refused():
    cfg = _ppo("ppo.top_k=50", "ppo.gen.top_k=50")
    assert cfg.ppo.gen.top_k == 50
    with pytest.raises(ConfigError, match=r"ppo\.top_k=50 and ppo\.gen\.top_k=60 disagree"):
        _ppo("ppo.top_k=50", "ppo.gen.top_k=60")


def test_shortcut_values_are_checked():
    with pytest.raises(ConfigError, match=r"ppo\.top_p=1\.5.*top_p must be in \(0, 1\]"):
        _ppo("ppo.top_p=1.5")
    with pytest.raises(ConfigError, match=r"ppo\.top_k='x' has the wrong type"):
        _ppo("ppo.top_k=x")


def test_temperature_zero_means_greedy_and_unset_shortcuts_keep_gen():
    assert _ppo("ppo.temperature=0").ppo.gen.greedy is True
    p = PPOHyperparameters()
    assert p.top_p is None and p.gen.top_p == 0.9 and p.gen.top_k == 200
    p = PPOHyperparameters(top_k=5)
    assert p.gen.top_k == 5
