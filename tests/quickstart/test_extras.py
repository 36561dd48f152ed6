"""PPO hyperparameters through the parser, launch-mode and GPU-only checks, import cost."""

import dataclasses
import importlib.util
import subprocess
import sys

import pytest

from realhf.api.quickstart import CommonExperimentConfig, ConfigError
from realhf.api.quickstart import base as qs_base
from realhf.api.quickstart.entrypoint import QUICKSTART_EXPS, parse_quickstart, register_quickstart_exp


@pytest.fixture
def ppo_like():
    from realhf.api.quickstart import PPOHyperparameters

    @dataclasses.dataclass
    class PPOLike(CommonExperimentConfig):
        ppo: PPOHyperparameters = dataclasses.field(default_factory=PPOHyperparameters)

        def validate(self):
            super().validate()
            self.ppo.validate("ppo")

    register_quickstart_exp("ppo-like-test", PPOLike)
    yield "ppo-like-test"
    QUICKSTART_EXPS.unregister("ppo-like-test")


BASE = ["experiment_name=e", "trial_name=t", "n_gpus_per_node=1"]


def test_ppo_overrides(ppo_like):
    cfg = parse_quickstart(ppo_like, BASE + ["ppo.gen.top_p=0.5", "ppo.gen.max_new_tokens=16",
                                             "ppo.gen.min_new_tokens=0", "ppo.kl_ctl=0.2", "ppo.adv_norm=False"])
    assert cfg.ppo.gen.top_p == 0.5 and cfg.ppo.gen.max_new_tokens == 16
    assert cfg.ppo.kl_ctl == 0.2 and cfg.ppo.adv_norm is False


@pytest.mark.parametrize("extra,needle", [
    (["ppo.gen.top_p=0"], "ppo.gen: top_p must be in (0, 1]"),
    (["ppo.gen.min_new_tokens=300"], "min_new_tokens"),
    (["ppo.value_norm_type=median"], "ppo.value_norm_type='median'"),
    (["ppo.discount=1.5"], "ppo.discount=1.5"),
    (["ppo.ppo_n_minibatches=0"], "ppo.ppo_n_minibatches=0"),
])
def test_ppo_bad(ppo_like, extra, needle):
    with pytest.raises(ConfigError) as e:
        parse_quickstart(ppo_like, BASE + extra)
    assert needle in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here")
def test_ray_without_ray(ppo_like):
    with pytest.raises(ConfigError, match="mode='ray' needs the 'ray' package"):
        parse_quickstart(ppo_like, BASE + ["mode=ray"])


def test_gpu_checks(monkeypatch, good_overrides):
    monkeypatch.delenv("REAL_FORCE_CPU")
    qs_base.cuda_available.cache_clear()
    if not qs_base.cuda_available():
        pytest.skip("needs a CUDA device")
    import torch

    cfg = parse_quickstart("sft", good_overrides[:-2] + ["n_gpus_per_node=1", "allocation_mode=d1",
                                                          "model.enable_fp16=True"])
    assert cfg.model.dtype == "float16"
    cfg = parse_quickstart("sft", good_overrides[:-2] + ["n_gpus_per_node=1", "allocation_mode=d1"])
    assert cfg.model.dtype == "bfloat16"
    n = torch.cuda.device_count() + 1
    with pytest.raises(ConfigError, match=f"n_gpus_per_node={n} but this machine has"):
        parse_quickstart("sft", good_overrides[:-2] + [f"n_gpus_per_node={n}", f"allocation_mode=d{n}"])


def test_import_is_light():
    code = ("import sys, realhf.api.quickstart.entrypoint; "
            "assert 'torch' not in sys.modules, 'quickstart parsing imports torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
