"""Dotted overrides through OmegaConf structured configs, and registration."""

import dataclasses

import pytest

from realhf.api.core.config import ModelFamily
from realhf.api.quickstart import ConfigError, ParallelismConfig, SFTConfig
from realhf.api.quickstart.entrypoint import (
    QUICKSTART_EXPS,
    get_quickstart_exp,
    parse_quickstart,
    register_quickstart_exp,
)


def test_nested_overrides(good_overrides):
    cfg = parse_quickstart("sft", good_overrides + [
        "model.optimizer.lr=1e-4",
        "model.optimizer.type=adam",
        "allocation_mode=manual",
        "allocation.parallel.pipeline_parallel_size=2",
        "allocation.parallel.data_parallel_size=1",
        "allocation.n_mbs=4",
        "exp_ctrl.save_freq_steps=null",
        "exp_ctrl.eval_freq_epochs=1",
        "model.type._class=llama",
        "model.type.size=1",
        "model.type.is_critic=False",  # sft refuses a critic
        "dataset.max_seqlen=64",
    ])
    assert isinstance(cfg, SFTConfig)
    assert cfg.model.optimizer.lr == 1e-4 and cfg.model.optimizer.type == "adam"
    assert cfg.allocation.parallel.pipeline_parallel_size == 2
    assert cfg.allocation.n_mbs == 4
    assert cfg.exp_ctrl.save_freq_steps is None and cfg.exp_ctrl.eval_freq_epochs == 1
    assert isinstance(cfg.model.type, ModelFamily)
    assert cfg.model.type == ModelFamily("llama", 1, False)
    assert isinstance(cfg.allocation.parallel, ParallelismConfig)
    assert cfg.dataset.max_seqlen == 64
    allocs = cfg.resolved_allocations()
    assert allocs["trainDefault"].parallel == ParallelismConfig(1, 2, 1)


def test_llama_class_and_null(good_overrides):
    cfg = parse_quickstart("sft", good_overrides + ["model.type._class=llama", "cache_clear_freq=null",
                                                   "exp_ctrl.save_freq_steps=50"])
    assert cfg.model.type._class == "llama"
    assert cfg.cache_clear_freq is None
    assert cfg.exp_ctrl.save_freq_steps == 50


def test_megatron_alias_and_precision(good_overrides):
    cfg = parse_quickstart("sft", good_overrides + ["model.backend=megatron", "model.enable_bf16=True"])
    assert cfg.model.backend_name == "train"
    assert cfg.model.dtype == "bfloat16"


def test_yaml_config_file(good_overrides, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  optimizer:\n    lr: 0.002\nexp_ctrl:\n  total_train_epochs: 3\n")
    cfg = parse_quickstart("sft", good_overrides + ["exp_ctrl.total_train_epochs=4"], config_files=[str(y)])
    assert cfg.model.optimizer.lr == 0.002
    assert cfg.exp_ctrl.total_train_epochs == 4  # command line wins


def test_trial_name_autofill(good_overrides):
    ov = [o for o in good_overrides if not o.startswith("trial_name=")]
    cfg = parse_quickstart("sft", ov)
    assert cfg.trial_name.startswith("run")
    with pytest.raises(ConfigError, match="trial_name is required"):
        parse_quickstart("sft", ov, auto_trial_name=False)


def test_register_custom_experiment(good_overrides):
    @dataclasses.dataclass
    class MySFT(SFTConfig):
        extra_knob: int = 3

    register_quickstart_exp("my-sft-test", MySFT)
    try:
        assert get_quickstart_exp("my-sft-test") is MySFT
        cfg = parse_quickstart("my-sft-test", good_overrides + ["extra_knob=5"])
        assert isinstance(cfg, MySFT) and cfg.extra_knob == 5
        # Re-registering the same class is fine; a different one under the same name is not.
        register_quickstart_exp("my-sft-test", MySFT)

        @dataclasses.dataclass
        class Other(SFTConfig):
            pass

        with pytest.raises(KeyError, match="already registered"):
            register_quickstart_exp("my-sft-test", Other)
    finally:
        QUICKSTART_EXPS.unregister("my-sft-test")


def test_builtin_sft_can_be_replaced():
    from realhf.api.quickstart import entrypoint

    @dataclasses.dataclass
    class FullSFT(SFTConfig):
        pass

    saved = dict(entrypoint._BUILTIN_DEFAULTS)
    saved_cls = QUICKSTART_EXPS.get("sft")  # whatever is registered now (maybe the full experiment)
    try:
        # Start from the built-in field-only config, as before any experiment module is imported.
        QUICKSTART_EXPS.register("sft", SFTConfig, override=True)
        entrypoint._BUILTIN_DEFAULTS["sft"] = SFTConfig
        register_quickstart_exp("sft", FullSFT)
        assert get_quickstart_exp("sft") is FullSFT
    finally:
        QUICKSTART_EXPS.register("sft", saved_cls, override=True)
        entrypoint._BUILTIN_DEFAULTS.clear()
        entrypoint._BUILTIN_DEFAULTS.update(saved)


def test_string_fields_kept_verbatim(good_overrides):
    cfg = parse_quickstart("sft", good_overrides + ["trial_name=0012", "experiment_name=1e3", "partition=yes", "wandb_mode='disabled'"])
    assert cfg.trial_name == "0012" and cfg.experiment_name == "1e3" and cfg.partition == "yes"
    assert cfg.wandb_mode == "disabled"  # quotes stripped
    # (not validated: a nodelist of other machines is refused in mode=local)
    cfg = parse_quickstart("sft", good_overrides + ["image_name=null", "nodelist=NODE[01]"], validate=False)
    assert cfg.image_name is None and cfg.nodelist == "NODE[01]"
