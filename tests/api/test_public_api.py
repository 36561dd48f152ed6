"""The documented public API: names importable from ``realhf`` and the modules the docs point to."""

import dataclasses
import subprocess
import sys

import pytest

import realhf

# Every class the configuration reference documents under ``realhf``.
DOCUMENTED = [
    "CommonExperimentConfig", "SFTConfig", "RWConfig", "DPOConfig", "PPOHyperparameters", "PPOConfig",
    "ModelTrainEvalConfig", "OptimizerConfig", "ParallelismConfig", "AllocationConfig", "MFCConfig",
    "ReaLModelConfig", "PromptAnswerDatasetConfig", "PairedComparisonDatasetConfig", "PromptOnlyDatasetConfig",
    "MFCDef", "ModelInterface", "NamedArray",
]

# quickstart name -> the config class exported by realhf
EXPERIMENTS = {"sft": "SFTConfig", "rw": "RWConfig", "dpo": "DPOConfig", "ppo": "PPOConfig",
               "gen": "GenerationConfig"}


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_name_is_exported(name):
    obj = getattr(realhf, name)
    assert isinstance(obj, type)
    assert name in dir(realhf) and name in realhf.__all__
    from realhf import __dict__ as ns  # cached after first access

    assert ns[name] is obj


def test_exports_are_the_defining_classes():
    from realhf.api.core import dfg, model_api
    from realhf.api.quickstart import dataset, experiment, model, ppo

    assert realhf.AllocationConfig is realhf.MFCConfig is model.MFCConfig
    assert realhf.ModelTrainEvalConfig is model.ModelTrainEvalConfig
    assert realhf.OptimizerConfig is model.OptimizerConfig
    assert realhf.ParallelismConfig is model.ParallelismConfig
    assert realhf.CommonExperimentConfig is experiment.CommonExperimentConfig
    assert realhf.PPOHyperparameters is ppo.PPOHyperparameters
    assert realhf.PromptAnswerDatasetConfig is dataset.PromptAnswerDatasetConfig
    assert realhf.PairedComparisonDatasetConfig is dataset.PairedComparisonDatasetConfig
    assert realhf.PromptOnlyDatasetConfig is dataset.PromptOnlyDatasetConfig
    assert realhf.MFCDef is dfg.MFCDef
    assert realhf.ReaLModelConfig is model_api.ReaLModelConfig
    # realhf.ModelInterface is the base class interfaces derive from; dfg.ModelInterface is
    # the (name, args) abstraction an MFCDef refers to.
    assert realhf.ModelInterface is model_api.ModelInterface
    assert dfg.ModelInterface("sentiment_scoring").type_ == "sentiment_scoring"
    for cls in (realhf.PPOConfig, realhf.SFTConfig, realhf.MFCConfig, realhf.PPOHyperparameters):
        assert dataclasses.is_dataclass(cls)


def test_documented_module_level_names():
    from realhf.api.core import config, data_api, dfg, model_api, system_api  # noqa: F401
    from realhf.api.quickstart.entrypoint import register_quickstart_exp
    from realhf.base.namedarray import NamedArray, from_dict, recursive_aggregate, recursive_apply
    from realhf.impl.model.nn.real_llm_api import ReaLModel

    assert callable(register_quickstart_exp) and isinstance(ReaLModel, type)
    assert realhf.NamedArray is NamedArray
    x = from_dict({"a": 1, "b": 2})
    assert isinstance(x, NamedArray)
    assert recursive_apply(x, lambda v: v * 10)["b"] == 20
    assert recursive_aggregate([x, x], sum)["a"] == 2


@pytest.mark.parametrize("exp,name", sorted(EXPERIMENTS.items()))
def test_exported_config_is_the_registered_experiment(exp, name):
    """``realhf.PPOConfig`` (etc.) is what ``quickstart ppo`` launches, so subclassing it and
    calling ``super().initial_setup()`` works; the experiments module exports the same class."""
    import importlib

    from realhf.api.quickstart.entrypoint import _import_builtin_experiments, get_quickstart_exp

    _import_builtin_experiments()
    cls = getattr(realhf, name)
    assert get_quickstart_exp(exp) is cls
    assert callable(getattr(cls, "initial_setup", None))
    module = importlib.import_module(f"realhf.experiments.common.{exp}_exp")
    assert getattr(module, name) is cls
    old = {"sft": "SFTExperiment", "rw": "RWExperiment", "dpo": "DPOExperiment", "ppo": "PPOExperiment",
           "gen": "GenerationExperiment"}[exp]
    assert getattr(module, old) is cls  # the earlier name stays an alias
    import realhf.api.quickstart as qs

    assert getattr(qs, name) is cls


def test_subclass_calls_super_initial_setup():
    from realhf.api.quickstart.entrypoint import QUICKSTART_EXPS, parse_quickstart, register_quickstart_exp
    from realhf.assets import ASSETS_DIR, dataset_path

    class MySFTConfig(realhf.SFTConfig):
        def initial_setup(self):
            cfg = super().initial_setup()
            cfg.model_rpcs[0].post_hooks = []
            return cfg

    register_quickstart_exp("my-sft-api-test", MySFTConfig)
    try:
        config = parse_quickstart("my-sft-api-test", [
            "experiment_name=e", "trial_name=t", f"model.path={ASSETS_DIR}/models/tiny-llama",
            "model.init_from_scratch=True", f"dataset.train_path={dataset_path('sft-train')}",
            "n_gpus_per_node=1", "allocation_mode=d1", "dataset.train_bs_n_seqs=4"])
    finally:
        QUICKSTART_EXPS.unregister("my-sft-api-test")
    exp = config.initial_setup()
    assert [r.name for r in exp.model_rpcs] == ["trainDefault"]


def test_config_exports_do_not_import_torch():
    code = ("import sys, realhf; realhf.SFTConfig; realhf.CommonExperimentConfig; realhf.MFCConfig; "
            "realhf.PromptOnlyDatasetConfig; assert 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
