"""``mode=ray`` options refused at validation, before any worker or cluster connection."""

import dataclasses
import importlib.util

import pytest

from realhf.api.quickstart import CommonExperimentConfig, ConfigError
from realhf.api.quickstart.entrypoint import QUICKSTART_EXPS, parse_quickstart, register_quickstart_exp

BASE = ["experiment_name=e", "trial_name=t", "n_gpus_per_node=1"]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="mode=ray needs the 'ray' package: pip install -e '.[ray]'")


@pytest.fixture
def plain():
    @dataclasses.dataclass
    class Plain(CommonExperimentConfig):
        pass

    register_quickstart_exp("ray-config-test", Plain)
    yield "ray-config-test"
    QUICKSTART_EXPS.unregister("ray-config-test")


def test_ray_address_needs_mode_ray(plain):
    with pytest.raises(ConfigError, match="ray_address='h:1' is only used with mode=ray"):
        parse_quickstart(plain, BASE + ["ray_address=h:1"])


@needs_ray
@pytest.mark.parametrize("extra,env,needle", [
    ([], None, "mode='ray' needs ray_address=<host>:<port>"),
    (["ray_address=head"], None, "ray_address='head' is not a Ray address"),
    (["ray_address=head:99999"], None, "port 99999 is out of range"),
    ([], "nohost", "$RAY_ADDRESS='nohost' is not a Ray address"),
])
def test_bad_ray_address(plain, monkeypatch, extra, env, needle):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with pytest.raises(ConfigError) as e:
        parse_quickstart(plain, BASE + ["mode=ray", *extra])
    assert needle in str(e.value)


@needs_ray
@pytest.mark.parametrize("extra,env", [(["ray_address=10.0.0.5:6379"], None), ([], "auto"),
                                       (["ray_address=ray://head:10001"], None)])
def test_good_ray_address(plain, monkeypatch, extra, env):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = parse_quickstart(plain, BASE + ["mode=ray", *extra])
    assert cfg.mode == "ray"
