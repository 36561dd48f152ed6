"""Options of every quickstart experiment either work or are refused before workers start:
wandb_mode, debug, cache_clear_freq, ignore_worker_error."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from realhf.api.quickstart.base import ConfigError
from realhf.api.quickstart.entrypoint import parse_quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data", "sft-train.jsonl")
BASE = [f"model.path={TINY}", "model.init_from_scratch=True", f"dataset.train_path={DATA}",
        "dataset.train_bs_n_seqs=32", "n_gpus_per_node=1", "allocation_mode=d1p1m1"]


def _user() -> str:
    from realhf.base import constants

    return constants.get_user()


def test_ignore_worker_error_is_refused():
    with pytest.raises(ConfigError, match=r"^ignore_worker_error=True is not supported"):
        parse_quickstart("sft", ["experiment_name=e", "trial_name=t", "ignore_worker_error=True", *BASE])


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_wandb_without_the_package_is_refused(mode):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError) as e:
        parse_quickstart("sft", ["experiment_name=e", "trial_name=t", f"wandb_mode={mode}", *BASE])
    assert str(e.value).startswith(f"wandb_mode='{mode}' needs the wandb package (pip install wandb)")


def test_worker_command_runs_python_optimized_without_debug():
    from realhf.apps.main import worker_command

    assert worker_command("model_worker", "e", "t", debug=False)[:4] == [sys.executable, "-O", "-m",
                                                                        "realhf.apps.remote"]
    assert "-O" not in worker_command("model_worker", "e", "t", debug=True)


def test_cache_clear_freq_reaches_the_workers(tmp_path):
    from realhf.system.pipe_runner import run_with_pipes

    from tests.system_e2e._sft import sft_experiment

    cfg = sft_experiment(1, 1, 1, benchmark_steps=5)
    cfg.cache_clear_freq = 2
    master = run_with_pipes(cfg, "opt-cache", "t", fileroot=str(tmp_path))
    assert master.cache_clears == [2, 4]  # every worker answered "empty_cache" after these steps


FAKE_WANDB = textwrap.dedent('''
    """Records the calls a run makes, one JSON line each, in $FAKE_WANDB_LOG."""
    import json, os, sys

    def _rec(call, **kw):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(json.dumps(dict(call=call, **kw)) + "\\n")

    def init(**kw):
        _rec("init", optimize=sys.flags.optimize, **kw)

    def log(data, step=None):
        _rec("log", data=data, step=step)

    def finish():
        _rec("finish")
''')


def test_quickstart_options_reach_the_run(tmp_path):
    # wandb_mode=offline logs what tensorboard gets; debug=False runs workers with python -O;
    # cache_clear_freq is in the experiment config the workers read.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    record = tmp_path / "wandb.jsonl"
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path), FAKE_WANDB_LOG=str(record),
               PYTHONPATH=os.pathsep.join([str(fake)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([sys.executable, "-m", "realhf.apps.quickstart", "sft", "experiment_name=opt-wandb",
                          "trial_name=t", *BASE, "wandb_mode=offline", "debug=False", "cache_clear_freq=1",
                          "exp_ctrl.benchmark_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    calls = [json.loads(l) for l in open(record)]
    assert [c["call"] for c in calls] == ["init", "log", "log", "finish"]
    init = calls[0]
    assert (init["mode"], init["project"], init["name"], init["optimize"]) == ("offline", "opt-wandb", "t", 1)
    log_dir = os.path.join(tmp_path, "logs", _user(), "opt-wandb", "t")
    stats = [json.loads(l) for l in open(os.path.join(log_dir, "stats.jsonl"))]
    for c, s in zip(calls[1:3], stats):
        assert c["step"] == s["global_step"]
        assert c["data"]["trainDefault/loss"] == s["stats"]["trainDefault"]["loss"]
        assert c["data"]["step/seconds"] == s["seconds"]
    with open(os.path.join(log_dir, "experiment_config.pkl"), "rb") as f:
        cfg = pickle.load(f)
    assert (cfg.cache_clear_freq, cfg.wandb_mode) == (1, "offline")
