"""Bad inputs refused by the command line before any worker starts: exit code 2, one stderr line."""

import os
import subprocess
import sys
import time

import pytest

import realhf
from realhf.assets import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(realhf.__file__)))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")


def _models(*roles):
    return [a for r in roles for a in (f"{r}.path={TINY}", f"{r}.init_from_scratch=True")]


BASE = {
    "sft": _models("model") + [f"dataset.train_path={DATA_DIR}/sft-train.jsonl", "dataset.max_seqlen=128",
                               "dataset.train_bs_n_seqs=8"],
    "rw": _models("model") + [f"dataset.train_path={DATA_DIR}/rw_pair-train.jsonl", "dataset.max_seqlen=128",
                              "dataset.train_bs_n_seqs=8"],
    "dpo": _models("actor", "ref") + [f"dataset.train_path={DATA_DIR}/rw_pair-train.jsonl",
                                      "dataset.max_seqlen=128", "dataset.train_bs_n_seqs=8"],
    "ppo": _models("actor", "critic", "ref", "rew") + [f"dataset.path={DATA_DIR}/prompt-train.jsonl",
                                                        "dataset.max_prompt_len=32", "dataset.train_bs_n_seqs=8",
                                                        "ppo.gen.max_new_tokens=8", "ppo.gen.min_new_tokens=0"],
    "gen": _models("model") + [f"dataset.path={DATA_DIR}/prompt-train.jsonl", "dataset.max_prompt_len=32",
                               "dataset.train_bs_n_seqs=8", "gen.max_new_tokens=8", "gen.min_new_tokens=0"],
}
DP2 = ["n_gpus_per_node=2", "allocation_mode=d2"]


def _records_file(tmp_path, name, src, n):
    with open(os.path.join(DATA_DIR, src)) as f:
        lines = [next(f) for _ in range(n)]
    p = tmp_path / name
    p.write_text("".join(lines))
    return str(p)


# (id, experiment, extra overrides (``{tmp}`` is a folder with small data files), substrings of the error)
BAD = [
    # max_seqlen / max_prompt_len that leave no room for a prompt and one answer token
    ("sft-seqlen-1", "sft", ["dataset.max_seqlen=1"], ["dataset.max_seqlen=1", "at least 2"]),
    ("rw-seqlen-1", "rw", ["dataset.max_seqlen=1"], ["dataset.max_seqlen=1", "at least 2"]),
    ("dpo-seqlen-1", "dpo", ["dataset.max_seqlen=1"], ["dataset.max_seqlen=1", "at least 2"]),
    ("sft-seqlen-below-prompts", "sft", ["dataset.max_seqlen=3"],
     ["dataset.max_seqlen=3", "sft-train.jsonl", "must be at least"]),
    ("ppo-prompt-fills-context", "ppo", ["dataset.max_prompt_len=1024"],
     ["dataset.max_prompt_len=1024", "n_positions=1024", "at most 1023"]),
    ("gen-prompt-fills-context", "gen", ["dataset.max_prompt_len=4096"],
     ["dataset.max_prompt_len=4096", "at most 1023"]),
    # a token budget below the longest sequence (sequences are never split)
    ("sft-budget-below-seqlen", "sft", ["dataset.max_seqlen=128", "allocation.max_tokens_per_mb=64"],
     ["allocation.max_tokens_per_mb=64", "longest sequence", "dataset.max_seqlen", "at least 128"]),
    # data smaller than the data-parallel size
    ("sft-train-fewer-than-dp", "sft", DP2 + ["dataset.train_path={tmp}/one-sft.jsonl"],
     ["dataset.train_path=", "one-sft.jsonl", "1 usable sample", "data-parallel size 2"]),
    ("sft-valid-fewer-than-dp", "sft", DP2 + ["dataset.valid_path={tmp}/one-sft.jsonl"],
     ["dataset.valid_path=", "one-sft.jsonl", "1 sample", "data-parallel size 2"]),
    ("ppo-prompts-fewer-than-dp", "ppo", DP2 + ["dataset.path={tmp}/one-prompt.jsonl"],
     ["dataset.path=", "one-prompt.jsonl", "1 usable sample", "data-parallel size 2"]),
    ("sft-batch-below-dp", "sft", DP2 + ["dataset.train_bs_n_seqs=1"],
     ["dataset.train_bs_n_seqs=1", "data-parallel size 2", "at least 2"]),
    ("dpo-batch-below-dp", "dpo", DP2 + ["dataset.train_bs_n_seqs=1"],
     ["dataset.train_bs_n_seqs=1", "data-parallel size 2"]),
    # non-finite floats, anywhere
    ("lr-inf", "sft", ["model.optimizer.lr=inf"], ["model.optimizer.lr=inf", "finite"]),
    ("lr-nan", "sft", ["model.optimizer.lr=nan"], ["model.optimizer.lr=nan", "finite"]),
    ("kl-nan", "ppo", ["ppo.kl_ctl=nan"], ["ppo.kl_ctl=nan", "finite"]),
    ("temperature-inf", "gen", ["gen.temperature=inf"], ["gen.temperature=inf", "finite"]),
    ("dpo-beta-nan", "dpo", ["beta=nan"], ["beta=nan", "finite"]),
    # heads that do not fit the experiment
    ("sft-on-critic", "sft", ["model.type.is_critic=True"], ["model.type.is_critic=True", "is_critic=False"]),
    ("gen-on-critic", "gen", ["model.type.is_critic=True"], ["model.type.is_critic=True", "is_critic=False"]),
    ("dpo-actor-critic", "dpo", ["actor.type.is_critic=True"], ["actor.type.is_critic=True", "is_critic=False"]),
    ("rw-on-lm", "rw", ["model.type.is_critic=False"], ["model.type.is_critic=False", "is_critic=True"]),
    # options that would otherwise be accepted and ignored
    ("allocation-use-cache", "sft", ["allocation_use_cache=True"],
     ["allocation_use_cache=True", "search", "allocation_use_cache=False"]),
    ("rew-head-path", "ppo", ["rew_head_path=/tmp/head.bin"], ["rew_head_path='/tmp/head.bin'", "rew.path"]),
    ("gen-cuda-graph", "gen", ["gen.use_cuda_graph=True"], ["gen.use_cuda_graph=True", "gen.use_cuda_graph=False"]),
    ("ppo-cuda-graph", "ppo", ["ppo.gen.use_cuda_graph=True"], ["ppo.gen.use_cuda_graph=True"]),
    ("mesh-foreign-host", "sft", ["n_gpus_per_node=2", "allocation_mode=manual", "allocation.device_mesh=gpu-node-7:0"],
     ["allocation.device_mesh='gpu-node-7:0'", "mode='local'", "localhost"]),
    ("size-mismatch", "sft", ["model.type.size=13"], ["model.type.size=13", "0.00134B parameters", "or 0"]),
    ("nodelist-foreign", "sft", ["nodelist=NODE[01-02]"], ["nodelist='NODE[01-02]'", "NODE01", "mode='local'"]),
]


@pytest.fixture
def small_data(tmp_path):
    _records_file(tmp_path, "one-sft.jsonl", "sft-train.jsonl", 1)
    _records_file(tmp_path, "one-prompt.jsonl", "prompt-train.jsonl", 1)
    return str(tmp_path)


@pytest.mark.parametrize("exp,extra,needles", [pytest.param(x, e, n, id=i) for i, x, e, n in BAD])
def test_refused_before_workers(small_data, tmp_path, exp, extra, needles):
    extra = [a.replace("{tmp}", small_data) for a in extra]
    args = [sys.executable, "-m", "realhf.apps.quickstart", exp, f"experiment_name=bad-{exp}", "trial_name=t",
            "n_gpus_per_node=1", "allocation_mode=d1", *BASE[exp], *extra]
    env = dict(os.environ, REAL_FORCE_CPU="1", REAL_FILEROOT=str(tmp_path / "root"))
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    dt = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert dt < 60, dt  # refused while parsing or preparing: no worker was started
    assert not os.path.exists(tmp_path / "root" / "logs"), "a run directory was created"


def test_non_finite_refused_in_programmatic_configs(tiny_model_dir):
    """Configs built in Python (not parsed) go through the same check in validate()."""
    from realhf.api.quickstart import ConfigError, SFTConfig

    cfg = SFTConfig(experiment_name="a", trial_name="b", n_gpus_per_node=1, allocation_mode="d1")
    cfg.model.path = tiny_model_dir
    cfg.dataset.train_path = os.path.join(DATA_DIR, "sft-train.jsonl")
    cfg.model.optimizer.weight_decay = float("inf")
    with pytest.raises(ConfigError, match=r"model\.optimizer\.weight_decay=inf is not a finite number"):
        cfg.validate()


def test_local_host_names_accepted(good_overrides):
    """``localhost`` and this machine's name are valid hosts of a device mesh in local mode."""
    import socket

    from realhf.api.quickstart.entrypoint import parse_quickstart

    for host in ("localhost", socket.gethostname()):
        cfg = parse_quickstart("sft", good_overrides + [
            "allocation_mode=manual", f"allocation.device_mesh={host}:1", f"nodelist={host}"])
        assert cfg.resolved_allocations()["trainDefault"].device_mesh == f"{host}:1"


def test_model_size_matching_checkpoint_accepted(good_overrides):
    from realhf.api.quickstart.entrypoint import parse_quickstart

    for size in (0, 1, 7):  # unspecified, right order for a tiny model, the default placeholder
        assert parse_quickstart("sft", good_overrides + [f"model.type.size={size}"]).model.type.size == size


def test_ppo_token_budget_counts_prompt_and_answer():
    """PPO's training and inference calls see prompt + answer; generation sees the prompt."""
    import realhf.experiments  # noqa: F401  (registers ppo)
    from realhf.api.quickstart import ConfigError
    from realhf.api.quickstart.entrypoint import parse_quickstart

    base = ["experiment_name=a", "trial_name=b", "n_gpus_per_node=1", "allocation_mode=manual", *BASE["ppo"],
            "dataset.max_prompt_len=64", "ppo.gen.max_new_tokens=32"]
    cfg = parse_quickstart("ppo", base + ["actor_gen.max_tokens_per_mb=64", "critic_inf.max_tokens_per_mb=96"])
    assert cfg.resolved_allocations()["critic_inf"].max_tokens_per_mb == 96
    with pytest.raises(ConfigError, match=r"critic_inf\.max_tokens_per_mb=95 .*96 tokens"):
        parse_quickstart("ppo", base + ["critic_inf.max_tokens_per_mb=95"])
    with pytest.raises(ConfigError, match=r"actor_gen\.max_tokens_per_mb=63 .*at least 64"):
        parse_quickstart("ppo", base + ["actor_gen.max_tokens_per_mb=63"])


def test_cpu_threads_reach_the_call_and_bad_values_are_refused():
    """``<call>.cpu_threads`` survives allocation and lands on that call's MFCDef only; a bad
    value is refused naming the key."""
    import realhf.experiments  # noqa: F401  (registers ppo)
    from realhf.api.quickstart import ConfigError
    from realhf.api.quickstart.entrypoint import parse_quickstart

    base = ["experiment_name=a", "trial_name=b", "n_gpus_per_node=1", "allocation_mode=manual", *BASE["ppo"]]
    with pytest.warns(UserWarning, match=r"actor_gen\.cpu_threads=2 on 1 of the 1 workers"):  # one worker: no idle core
        cfg = parse_quickstart("ppo", base + ["actor_gen.cpu_threads=2"]).initial_setup()
    rpcs = {r.name: r for r in cfg.model_rpcs}
    assert rpcs["actor_gen"].cpu_threads == 2
    assert all(r.cpu_threads is None for name, r in rpcs.items() if name != "actor_gen")
    for bad, allowed in (("0", "positive integer"), ("300", "at most 256"), ("two", "")):
        with pytest.raises(ConfigError, match=rf"actor_gen\.cpu_threads.*{allowed}"):
            parse_quickstart("ppo", base + [f"actor_gen.cpu_threads={bad}"])


def test_cpu_threads_on_a_mesh_without_idle_workers_warns():
    import realhf.experiments  # noqa: F401  (registers ppo)
    from realhf.api.quickstart.entrypoint import parse_quickstart

    base = ["experiment_name=a", "trial_name=b", "n_gpus_per_node=2", "allocation_mode=manual", *BASE["ppo"]]
    meshes = {"actor_gen": "0", "actor_train": "0", "ref_inf": "0", "critic_inf": "1", "critic_train": "1"}
    mesh_args = [f"{c}.device_mesh=localhost:{r}" for c, r in meshes.items()]
    mesh_args += ["rew_inf.parallel.data_parallel_size=2"]
    with pytest.warns(UserWarning, match=r"rew_inf\.cpu_threads=2 on 2 of the 2 workers .* 4 threads for 2 CPU"):
        parse_quickstart("ppo", base + mesh_args + ["rew_inf.cpu_threads=2"]).resolved_allocations()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one worker of two: the other is idle, no warning
        parse_quickstart("ppo", base + mesh_args + ["actor_gen.cpu_threads=2"]).resolved_allocations()
