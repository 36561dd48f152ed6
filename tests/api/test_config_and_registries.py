"""Config abstractions, identifiers and registries."""

import dataclasses
import pickle

import pytest
import torch

import realhf
from realhf.api.core import config as config_api
from realhf.api.core import model_api
from realhf.base.registry import Registry, RegistryError


# ---------------------------------------------------------------- registry --
def test_unknown_name_lists_known_names():
    reg = Registry("widget")
    reg.register("alpha", int)
    reg.register("beta", float)
    with pytest.raises(KeyError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert "Unknown widget 'alpah'" in msg
    assert "['alpha', 'beta']" in msg
    assert "Did you mean 'alpha'" in msg


def test_conflicting_registration_rejected_same_object_allowed():
    reg = Registry("widget")
    reg.register("a", int)
    reg.register("a", int)  # idempotent
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", float)
    reg.register("a", float, override=True)
    assert reg.get("a") is float
    assert reg.make("a", "2.5") == 2.5
    assert "a" in reg and len(reg) == 1 and list(reg) == ["a"]


def test_register_rejects_bad_names():
    with pytest.raises(RegistryError):
        Registry("widget").register("", int)


# ------------------------------------------------------------ abstractions --
def test_abstractions_validate_and_pickle():
    m = config_api.Model("tokenizer", args=dict(tokenizer_path="/x"))
    assert isinstance(m, config_api.ModelAbstraction) and m.wrappers == []
    assert config_api.DataLoader().type_ == "packed"
    assert config_api.ModelBackend("null").args == {}
    with pytest.raises(TypeError, match="type_"):
        config_api.ModelBackend(3)
    with pytest.raises(TypeError, match="args must be a dict"):
        config_api.Dataset("prompt_answer", args=[1, 2])
    assert pickle.loads(pickle.dumps(m)) == m


def test_model_name_and_family():
    n = config_api.ModelName("actor", 1)
    assert str(n) == "actor@1"
    assert config_api.ModelName.parse("actor@1") == n
    assert config_api.ModelName.parse("critic") == config_api.ModelName("critic", 0)
    assert {n: 1}[config_api.ModelName("actor", 1)] == 1
    assert sorted([config_api.ModelName("b"), config_api.ModelName("a", 2), config_api.ModelName("a")]) == [
        config_api.ModelName("a"), config_api.ModelName("a", 2), config_api.ModelName("b")]
    with pytest.raises(ValueError, match="role"):
        config_api.ModelName("")
    with pytest.raises(ValueError, match="replica_id"):
        config_api.ModelName("actor", -1)

    f = config_api.ModelFamily("llama", 7, True)
    assert repr(f) == "llama-7b-critic"
    with pytest.raises(ValueError, match="identifier"):
        config_api.ModelFamily("not-valid")


class _Topo:
    """The slice of ProcessTopology's interface ModelShardID uses (pipe-major)."""

    def __init__(self, pp, dp, tp):
        self.dims = dict(pipe=pp, data=dp, model=tp)

    def get_dim(self, axis):
        return self.dims[axis]

    def get_rank(self, pipe, data, model):
        return (pipe * self.dims["data"] + data) * self.dims["model"] + model

    def get_coord(self, rank):
        import collections
        C = collections.namedtuple("C", "pipe data model")
        tp, dp = self.dims["model"], self.dims["data"]
        return C(rank // (dp * tp), (rank // tp) % dp, rank % tp)


def test_model_shard_id():
    topo = _Topo(2, 2, 2)
    name = config_api.ModelName("actor", 0)
    ids = [config_api.ModelShardID.from_parallelism_rank(name, topo, r) for r in range(8)]
    assert [i.parallelism_rank for i in ids] == list(range(8))
    assert repr(ids[5]) == "actor@0@pp01@mp01@dp00"
    assert ids[5].tp_rank == 1
    with pytest.raises(ValueError, match="data rank 2"):
        config_api.ModelShardID(name, 2, 0, 0, topo)


# --------------------------------------------------------------- model api --
def test_generation_hyperparameters_validation():
    g = model_api.GenerationHyperparameters()
    assert (g.max_new_tokens, g.min_new_tokens, g.top_p, g.top_k, g.temperature) == (256, 256, 0.9, 200, 1.0)
    assert model_api.GenerationHyperparameters(temperature=0.0).greedy
    with pytest.raises(ValueError, match="min_new_tokens"):
        model_api.GenerationHyperparameters(max_new_tokens=8, min_new_tokens=9)
    with pytest.raises(ValueError, match="top_p"):
        model_api.GenerationHyperparameters(top_p=0.0)
    with pytest.raises(ValueError, match="n_mbs"):
        model_api.MicroBatchSpec(n_mbs=0)


def test_finetune_spec_and_version():
    spec = model_api.FinetuneSpec(total_train_epochs=2, dataset_size=10, train_batch_size=4)
    assert spec.steps_per_epoch == 3 and spec.total_train_steps == 6
    m = model_api.Model("actor", torch.nn.Linear(2, 2), tokenizer=None, ft_spec=spec)
    assert m.name == config_api.ModelName("actor", 0) and m.dtype == torch.float32
    for _ in range(4):
        m.inc_version()
    assert dataclasses.astuple(m.version) == (1, 1, 4)
    with pytest.raises(ValueError, match="dataset_size"):
        model_api.FinetuneSpec(1, 0, 1)


def test_builtin_null_backend_and_models():
    m = model_api.make_model(config_api.Model("null"), "reward@0")
    assert m.module is None and m.name.role == "reward"
    b = model_api.make_backend(config_api.ModelBackend("null"))
    spec = model_api.FinetuneSpec(1, 1, 1)
    assert b.initialize(m, spec) is m and m.ft_spec is spec
    with pytest.raises(KeyError, match="Registered model backends"):
        model_api.make_backend("no_such_backend")


def test_custom_interface_registration_documented_pattern():
    """The documented pattern: a dataclass interface with __post_init__, registered by name."""

    @dataclasses.dataclass
    class Scoring(model_api.ModelInterface):
        scale: float = 1.0

        def __post_init__(self):
            super().__post_init__()
            self.ready = True

        def inference(self, model, input_, mb_spec=None):
            return input_ * self.scale

    model_api.register_interface("test_scoring_iface", Scoring)
    try:
        iface = model_api.make_interface(config_api.ModelInterface("test_scoring_iface", args=dict(scale=3.0)))
        assert iface.ready and iface.inference(None, 2.0) == 6.0
        with pytest.raises(NotImplementedError, match="train_step"):
            iface.train_step(None, None)
    finally:
        model_api.INTERFACES.unregister("test_scoring_iface")


def test_lazy_top_level_exports():
    assert realhf.ModelName is config_api.ModelName
    assert realhf.ModelInterface is model_api.ModelInterface
    with pytest.raises(AttributeError):
        realhf.NoSuchThing
