"""``allocation_mode=search`` in the ppo quickstart: validates, builds, runs."""

import json
import os

import pytest

import realhf.experiments  # noqa: F401
from realhf.api.quickstart import ConfigError
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.search import quickstart as sq
from tests.search.test_cost import simple_profile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")


@pytest.fixture
def fixed_profile(tmp_path, monkeypatch):
    """A fixed machine profile (no 7 s measurement in tests): 2 devices, tp and pp expensive as on CPU."""
    prof = simple_profile(devices_per_node=2, param_bytes=4, op_overhead_s=1e-3, call_overhead_s=4e-3,
                          collective_overhead_s=4e-3, pp_slot_overhead_s=0.04, memory_bytes=8e9)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof.to_json()))
    monkeypatch.setenv("REALHF_SEARCH_PROFILE", str(path))
    sq._CACHE.clear()
    return prof


def ppo_args(n_workers=2, steps=2):
    args = ["experiment_name=ppo", "trial_name=search", f"n_gpus_per_node={n_workers}", "allocation_mode=search",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "ppo.gen.max_new_tokens=8", "ppo.gen.min_new_tokens=1", "ppo.ppo_n_minibatches=1",
            f"exp_ctrl.benchmark_steps={steps}"]
    for r in ["actor", "critic", "ref", "rew"]:
        args += [f"{r}.path={TINY}", f"{r}.init_from_scratch=True"]
    return args


def test_search_config_validates_and_builds(fixed_profile, capsys):
    cfg = parse_quickstart("ppo", ppo_args())
    allocs = cfg.resolved_allocations()
    assert "predicted step time" in capsys.readouterr().out
    assert set(allocs) == set(cfg.mfc_names)
    for name, a in allocs.items():
        n = 2 if a.device_mesh is None else len(a.device_mesh.partition(":")[2].split(","))
        assert a.parallel.world_size == n, name
    exp = cfg.initial_setup()
    assert {r.name for r in exp.model_rpcs} == set(cfg.mfc_names)
    # the same search answers validation and the build (cached, deterministic)
    out1, res1 = sq.search_allocations(cfg, cfg.mfc_names, cfg.train_mfc_names)
    sq._CACHE.clear()
    out2, res2 = sq.search_allocations(cfg, cfg.mfc_names, cfg.train_mfc_names)
    assert res1.plan == res2.plan and out1 == out2


def test_search_errors_name_the_field(fixed_profile, monkeypatch):
    args = [a for a in ppo_args() if not a.startswith("actor.path")] + ["actor.path=/nonexistent"]
    with pytest.raises(ConfigError, match="actor"):
        parse_quickstart("ppo", args).resolved_allocations()
    monkeypatch.setattr(sq, "machine_profile", lambda n: simple_profile(devices_per_node=n, memory_bytes=1.0))
    with pytest.raises(ConfigError, match="allocation_mode='search'.*fits"):
        parse_quickstart("ppo", ppo_args()).resolved_allocations()


@pytest.mark.distributed
def test_search_ppo_runs(fixed_profile, tmp_path):
    from realhf.system.pipe_runner import run_with_pipes

    exp = parse_quickstart("ppo", ppo_args()).initial_setup()
    hist = run_with_pipes(exp, "ppo", "search", timeout=300, fileroot=str(tmp_path)).history
    assert len(hist) == 2 and all(-1e3 < h.stats["actor_train"]["task_reward"] < 1e3 for h in hist)


def test_search_sft_and_grpo_build(fixed_profile):
    sft = ["experiment_name=s", "trial_name=t", "n_gpus_per_node=2", "allocation_mode=search", f"model.path={TINY}",
           "model.init_from_scratch=True", f"dataset.train_path={DATA}/sft-train.jsonl", "dataset.train_bs_n_seqs=16"]
    parse_quickstart("sft", sft).initial_setup()
    grpo = ["experiment_name=g", "trial_name=t", "n_gpus_per_node=2", "allocation_mode=search",
            f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8", "dataset.max_prompt_len=48",
            "grpo.group_size=2", "grpo.gen.max_new_tokens=8", "grpo.gen.min_new_tokens=1"]
    for r in ["actor", "ref", "rew"]:
        grpo += [f"{r}.path={TINY}", f"{r}.init_from_scratch=True"]
    cfg = parse_quickstart("grpo", grpo)
    calls = sq.workload_of(cfg, cfg.mfc_names, cfg.train_mfc_names)
    assert all(c.n_seqs == 16 for c in calls)  # 8 prompts x groups of 2
    cfg.initial_setup()
