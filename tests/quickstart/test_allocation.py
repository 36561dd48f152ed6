"""allocation_mode forms and their errors."""

import types

import pytest

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.quickstart import ConfigError, MFCConfig, ParallelismConfig
from realhf.api.quickstart.allocation import check_parallel_fits, parse_allocation_mode, resolve_allocations

PPO_MFCS = ["actor_gen", "actor_train", "critic_inf", "critic_train", "rew_inf", "ref_inf"]
PPO_TRAIN = ["actor_train", "critic_train"]


def cfg(mode, n_nodes=1, gpn=8, allocations=None):
    return types.SimpleNamespace(allocation_mode=mode, n_nodes=n_nodes, n_gpus_per_node=gpn,
                                 allocations=allocations or {})


def P(m, p, d):
    return ParallelismConfig(model_parallel_size=m, pipeline_parallel_size=p, data_parallel_size=d)


def test_pipe_data():
    out = resolve_allocations(cfg("pipe_data", n_nodes=2, gpn=4), PPO_MFCS)
    assert set(out) == set(PPO_MFCS)
    assert all(a.parallel == P(1, 2, 4) and a.device_mesh is None for a in out.values())


def test_pipe_model():
    out = resolve_allocations(cfg("pipe_model", n_nodes=2, gpn=4), ["trainDefault"])
    assert out["trainDefault"].parallel == P(4, 2, 1)


@pytest.mark.parametrize("mode,expect", [
    ("d2p2m2", P(2, 2, 2)), ("m2d2p2", P(2, 2, 2)), ("p2m2d2", P(2, 2, 2)),
    ("d4p2m1", P(1, 2, 4)), ("d2t4", P(4, 1, 2)), ("t2p4d1", P(2, 4, 1)), ("d8", P(1, 1, 8)),
])
def test_symmetric(mode, expect):
    out = resolve_allocations(cfg(mode), PPO_MFCS, train_mfc_names=PPO_TRAIN)
    for name, a in out.items():
        assert a.parallel == expect
        assert a.parallel.use_sequence_parallel == (expect.model_parallel_size > 1 and name in PPO_TRAIN)


def test_symmetric_keeps_n_mbs():
    allocs = {"actor_gen": MFCConfig(n_mbs=2), "actor_train": MFCConfig(n_mbs=4)}
    out = resolve_allocations(cfg("m2d2p2", allocations=allocs), PPO_MFCS)
    assert out["actor_gen"].n_mbs == 2 and out["actor_train"].n_mbs == 4 and out["ref_inf"].n_mbs is None


def test_per_mfc():
    out = resolve_allocations(cfg("actor_gen:d4m2p1,*:d2p2m2"), PPO_MFCS, train_mfc_names=PPO_TRAIN)
    assert out["actor_gen"].parallel == P(2, 1, 4)
    assert all(out[n].parallel == P(2, 2, 2) for n in PPO_MFCS if n != "actor_gen")
    assert out["actor_train"].parallel.use_sequence_parallel


def test_manual():
    allocs = {
        "a": MFCConfig(parallel=P(2, 1, 2)),
        "b": MFCConfig(parallel=P(1, 2, 1), device_mesh="node01:0,1"),
        "c": MFCConfig(parallel=P(1, 1, 4), device_mesh="NODE[01]"),
    }
    out = resolve_allocations(cfg("manual", gpn=4, allocations=allocs), ["a", "b", "c"])
    assert out["b"].device_mesh == "node01:0,1" and out["a"].parallel == P(2, 1, 2)


def test_parse_forms():
    assert parse_allocation_mode("manual").kind == "manual"
    assert parse_allocation_mode("pipe_data").kind == "pipe_data"
    assert parse_allocation_mode("d2m2").kind == "global"
    m = parse_allocation_mode("x:d2, *:d1p2")
    assert m.kind == "per_mfc" and m.per_mfc["*"] == P(1, 2, 1)


@pytest.mark.parametrize("mode", ["d2x2", "d2p", "", "2d2", "d2d2", "m2t2", "a:d2,b", "a:", ":d2",
                                  "d2,p2", "d0p1", "a:d2,a:d2"])
def test_malformed(mode):
    with pytest.raises(ConfigError, match="allocation_mode"):
        parse_allocation_mode(mode)


def test_product_mismatch_message():
    with pytest.raises(ConfigError) as e:
        resolve_allocations(cfg("d2p2m1", gpn=8), ["x"])
    msg = str(e.value)
    assert "'d2p2m1'" in msg and "d*p*m=4" in msg and "8 workers" in msg


def test_pipe_modes_never_mismatch():
    for n_nodes, gpn in [(1, 1), (1, 3), (3, 2)]:
        for mode in ("pipe_data", "pipe_model"):
            out = resolve_allocations(cfg(mode, n_nodes, gpn), ["x"])
            assert out["x"].parallel.world_size == n_nodes * gpn


def test_per_mfc_errors():
    with pytest.raises(ConfigError, match=r"unknown MFC.*'actr_gen'.*actor_gen"):
        resolve_allocations(cfg("actr_gen:d8,*:d8"), PPO_MFCS)
    with pytest.raises(ConfigError, match="no layout for MFC 'actor_train'"):
        resolve_allocations(cfg("actor_gen:d8"), ["actor_gen", "actor_train"])
    with pytest.raises(ConfigError, match=r"actor_gen.*d\*p\*m=4.*8 workers"):
        resolve_allocations(cfg("actor_gen:d4,*:d8"), PPO_MFCS)


def test_manual_errors():
    with pytest.raises(ConfigError, match=r"missing: \['b'\]"):
        resolve_allocations(cfg("manual", allocations={"a": MFCConfig(parallel=P(1, 1, 8))}), ["a", "b"])
    with pytest.raises(ConfigError, match=r"alloc\.parallel=Parallel\(mp=1,pp=1,dp=2\) uses 2 devices.*has 8"):
        resolve_allocations(cfg("manual", allocations={"a": MFCConfig(parallel=P(1, 1, 2))}), ["a"],
                            allocation_keys={"a": "alloc"})
    with pytest.raises(ConfigError, match=r"a\.device_mesh='h:0,9'"):
        resolve_allocations(cfg("manual", allocations={"a": MFCConfig(parallel=P(1, 1, 2), device_mesh="h:0,9")}),
                            ["a"])


def test_search_and_heuristic():
    with pytest.raises(ConfigError, match="search"):
        resolve_allocations(cfg("search"), ["x"])
    with pytest.raises(ConfigError, match="heuristic"):
        resolve_allocations(cfg("heuristic"), ["x"])
    c = cfg("heuristic")
    c._heuristic_rpc_allocation = lambda: {"x": MFCConfig(parallel=P(1, 1, 8))}
    assert resolve_allocations(c, ["x"])["x"].parallel == P(1, 1, 8)


def tiny_config(**kw):
    d = dict(n_layers=2, n_kv_heads=2, n_q_heads=4, hidden_dim=64, intermediate_dim=128, vocab_size=256)
    d.update(kw)
    return ReaLModelConfig(**d)


def test_check_parallel_fits():
    check_parallel_fits(P(4, 4, 1), tiny_config(), "allocation.parallel")
    # KV heads that tp does not divide are replicated (GQA/MQA), not refused.
    check_parallel_fits(P(4, 1, 1), tiny_config(n_kv_heads=1), "allocation.parallel")
    with pytest.raises(ConfigError, match=r"allocation\.parallel\.model_parallel_size=3 does not divide n_q_heads=4"):
        check_parallel_fits(P(3, 1, 1), tiny_config(), "allocation.parallel")
    with pytest.raises(ConfigError, match="does not divide vocab_size=255"):
        check_parallel_fits(P(2, 1, 1), tiny_config(vocab_size=255), "k")
    with pytest.raises(ConfigError, match="does not divide intermediate_dim=102"):
        check_parallel_fits(P(4, 1, 1), tiny_config(intermediate_dim=102), "k")
    with pytest.raises(ConfigError, match=r"k\.pipeline_parallel_size=5 exceeds the 4 layers"):
        check_parallel_fits(P(1, 5, 1), tiny_config(), "k")


def test_resolve_checks_model_configs():
    with pytest.raises(ConfigError, match="model_parallel_size=8 does not divide n_q_heads=4"):
        resolve_allocations(cfg("pipe_model"), ["x"], model_configs={"x": tiny_config()})
