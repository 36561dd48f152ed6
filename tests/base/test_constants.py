import os
import types

import pytest

from realhf.base import constants
from realhf.base.topology import (
    ModelParallelLayout,
    PipeDataModelParallelTopology,
    ProcessTopology,
)

ACTOR = "actor"
CRITIC = "critic"


@pytest.fixture(autouse=True)
def _clean_constants():
    constants.reset()
    yield
    constants.reset()


def _host_two_models():
    """Global rank 5 hosts an actor on ranks 0..7 (pp2 dp2 tp2) and a
    critic on ranks [6, 5, 4, 7] (pp1 dp2 tp2)."""
    constants.set_global_rank(5)
    actor_topo = PipeDataModelParallelTopology(2, 2, 2, gradient_checkpointing=True)
    critic_topo = PipeDataModelParallelTopology(
        1, 2, 2, sequence_parallel=True, max_prompt_len=64
    )
    constants.set_rank_mapping(ACTOR, ModelParallelLayout.contiguous(actor_topo))
    constants.set_rank_mapping(CRITIC, ModelParallelLayout(critic_topo, [6, 5, 4, 7]))


def _state():
    return dict(
        name=constants.model_name(),
        rank=constants.parallelism_rank(),
        size=constants.parallelism_group_size(),
        dp=(constants.data_parallel_rank(), constants.data_parallel_world_size()),
        tp=(constants.tensor_parallel_rank(), constants.tensor_parallel_world_size()),
        pp=(constants.pipe_parallel_rank(), constants.pipe_parallel_world_size()),
        first=constants.is_first_pipe_stage(),
        last=constants.is_last_pipe_stage(),
    )


# Local rank 5 of the actor has coordinates (pipe=1, data=0, model=1);
# local rank 1 of the critic has (pipe=0, data=0, model=1).
ACTOR_STATE = dict(
    name=ACTOR, rank=5, size=8, dp=(0, 2), tp=(1, 2), pp=(1, 2), first=False, last=True
)
CRITIC_STATE = dict(
    name=CRITIC, rank=1, size=4, dp=(0, 2), tp=(1, 2), pp=(0, 1), first=True, last=True
)


def test_two_models_on_one_process():
    _host_two_models()
    with constants.model_scope(ACTOR):
        assert _state() == ACTOR_STATE
        assert constants.gradient_checkpointing() and not constants.sequence_parallel()
        assert constants.max_prompt_len() is None
        assert constants.to_global_pg_rank(3) == 3
    with constants.model_scope(CRITIC):
        assert _state() == CRITIC_STATE
        assert constants.sequence_parallel() and not constants.gradient_checkpointing()
        assert constants.max_prompt_len() == 64
        assert constants.to_global_pg_rank(0) == 6
        assert constants.to_global_pg_rank(2) == 4
        assert constants.model_parallel_rank() == constants.tensor_parallel_rank()
        assert constants.model_parallel_world_size() == 2


def test_scopes_nest_and_restore():
    _host_two_models()
    with constants.model_scope(ACTOR):
        with constants.model_scope(CRITIC):
            assert _state() == CRITIC_STATE
            with constants.model_scope_disabled():
                assert not constants.in_model_scope()
                with pytest.raises(RuntimeError, match="No model scope is active"):
                    constants.model_name()
            assert constants.in_model_scope() and constants.model_name() == CRITIC
        assert _state() == ACTOR_STATE
    assert not constants.in_model_scope()
    with pytest.raises(RuntimeError, match="No model scope is active"):
        constants.model_name()


def test_scope_restored_after_exception():
    _host_two_models()
    with constants.model_scope(ACTOR):
        with pytest.raises(KeyError):
            with constants.model_scope(CRITIC):
                raise KeyError("x")
        assert constants.model_name() == ACTOR


@pytest.mark.parametrize(
    "getter",
    [
        "model_name",
        "grid",
        "parallelism_rank",
        "parallelism_group_size",
        "parallelism_group",
        "data_parallel_rank",
        "data_parallel_world_size",
        "data_parallel_group",
        "tensor_parallel_rank",
        "model_parallel_world_size",
        "pipe_parallel_rank",
        "pipe_parallel_group",
        "is_first_pipe_stage",
        "is_last_pipe_stage",
        "sequence_parallel",
        "gradient_checkpointing",
        "max_prompt_len",
    ],
)
def test_getters_outside_scope_raise(getter):
    _host_two_models()
    with pytest.raises(RuntimeError, match="No model scope is active"):
        getattr(constants, getter)()


def test_unregistered_model_errors():
    constants.set_global_rank(0)
    with constants.model_scope("ghost"):
        assert constants.model_name() == "ghost"
        with pytest.raises(RuntimeError, match="No rank mapping for model 'ghost'"):
            constants.data_parallel_rank()
        with pytest.raises(RuntimeError, match="No grid set"):
            constants.grid()
    assert not constants.has_model_name("ghost")


def test_rank_not_in_model():
    _host_two_models()
    constants.set_global_rank(1)
    with constants.model_scope(CRITIC):
        with pytest.raises(ValueError, match="hosts no shard"):
            constants.data_parallel_rank()


def test_grids_and_groups():
    _host_two_models()
    constants.set_grid(ACTOR, None)
    with constants.model_scope(ACTOR):
        assert constants.grid() is None
        with pytest.raises(RuntimeError, match="not created yet"):
            constants.data_parallel_group()

    class MethodGrid:
        def get_data_parallel_group(self):
            return "dp-handle"

        def get_tensor_model_parallel_group(self):
            return "tp-handle"

        def get_pipe_parallel_group(self):
            return "pp-handle"

    constants.set_grid(ACTOR, MethodGrid())
    attr_grid = types.SimpleNamespace(dp_group="dp2", tp_group="tp2", pp_group="pp2")
    constants.set_grid(CRITIC, attr_grid)
    constants.set_parallelism_group(CRITIC, "critic-pg", [6, 5, 4, 7])
    with constants.model_scope(ACTOR):
        assert constants.data_parallel_group() == "dp-handle"
        assert constants.tensor_parallel_group() == "tp-handle"
        assert constants.model_parallel_group() == "tp-handle"
        assert constants.pipe_parallel_group() == "pp-handle"
        assert constants.parallelism_group_ranks() == list(range(8))
        with pytest.raises(RuntimeError, match="set_parallelism_group"):
            constants.parallelism_group()
    with constants.model_scope(CRITIC):
        assert constants.grid() is attr_grid
        assert constants.data_parallel_group() == "dp2"
        assert constants.pipe_parallel_group() == "pp2"
        assert constants.parallelism_group() == "critic-pg"
        assert constants.parallelism_group_ranks() == [6, 5, 4, 7]
    constants.set_grid("other", object())
    with constants.model_scope("other"):
        with pytest.raises(TypeError, match="get_data_parallel_group"):
            constants.data_parallel_group()


def test_registry_and_reset():
    _host_two_models()
    constants.set_grid("only-grid", None)
    assert constants.has_model_name(ACTOR) and constants.has_model_name("only-grid")
    assert constants.registered_model_names() == [ACTOR, CRITIC, "only-grid"]
    with pytest.raises(TypeError):
        constants.set_rank_mapping("bad", PipeDataModelParallelTopology(1, 1, 1))
    constants.reset()
    assert not constants.has_model_name(ACTOR)
    with pytest.raises(RuntimeError, match="set_global_rank"):
        constants.global_rank()


def test_generic_topology_defaults():
    constants.set_global_rank(2)
    topo = ProcessTopology(["pipe", "data", "model"], [1, 4, 1])
    constants.set_rank_mapping("m", ModelParallelLayout.contiguous(topo, offset=1))
    with constants.model_scope("m"):
        assert constants.data_parallel_rank() == 1
        assert constants.sequence_parallel() is False
        assert constants.max_prompt_len() is None


def test_global_rank_and_world_size():
    constants.set_global_rank(3)
    constants.set_global_world_size(16)
    assert constants.global_rank() == 3 and constants.global_world_size() == 16


def test_experiment_names():
    with pytest.raises(RuntimeError, match="set_experiment_trial_names"):
        constants.experiment_name()
    with pytest.raises(RuntimeError, match="set_experiment_trial_names"):
        constants.trial_name()
    constants.set_experiment_trial_names("ppo", "t1")
    assert (constants.experiment_name(), constants.trial_name()) == ("ppo", "t1")


def test_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("REAL_FILEROOT", str(tmp_path))
    monkeypatch.setattr(constants.getpass, "getuser", lambda: "alice")
    assert constants.get_fileroot() == str(tmp_path)
    assert constants.get_log_path("e", "t") == f"{tmp_path}/logs/alice/e/t"
    assert constants.get_save_path("e", "t") == f"{tmp_path}/checkpoints/alice/e/t"
    assert constants.get_recover_path("e", "t") == f"{tmp_path}/recover/alice/e/t"
    assert constants.get_param_realloc_path("e", "t") == f"{tmp_path}/param_realloc/alice/e/t"
    constants.set_experiment_trial_names("exp", "trial")
    assert constants.get_log_path() == f"{tmp_path}/logs/alice/exp/trial"


def test_default_fileroot(monkeypatch):
    monkeypatch.delenv("REAL_FILEROOT", raising=False)
    expected = os.path.join(os.path.expanduser("~"), ".cache", "realhf")
    assert constants.get_fileroot() == expected


def test_user_fallback(monkeypatch):
    def no_user():
        raise KeyError("no passwd entry")

    monkeypatch.setattr(constants.getpass, "getuser", no_user)
    assert constants.get_user() == str(os.getuid())
