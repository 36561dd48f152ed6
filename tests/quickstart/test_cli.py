"""The quickstart command line: exit codes, one-line errors, launching and user scripts."""

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest

import realhf
from realhf.api.quickstart import SFTConfig
from realhf.api.quickstart.entrypoint import QUICKSTART_EXPS, main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(realhf.__file__)))


def _run(args, cwd=None, timeout=60):
    env = dict(os.environ, REAL_FORCE_CPU="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or REPO_ROOT,
                       env=env, timeout=timeout)
    return p, time.monotonic() - t0


def test_cli_wrong_type_exits_2_one_line():
    p, dt = _run(["-m", "realhf.apps.quickstart", "sft", "dataset.max_seqlen=abc"])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "dataset.max_seqlen" in lines[0] and "abc" in lines[0] and "int" in lines[0]
    assert "Traceback" not in p.stderr
    assert dt < 30, dt  # parsing only: no workers are started


def test_cli_unknown_experiment():
    p, _ = _run(["-m", "realhf.apps.quickstart", "nope", "a=1"])
    assert p.returncode == 2
    assert "Unknown quickstart experiment 'nope'" in p.stderr and "'sft'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_help_lists_keys():
    p, _ = _run(["-m", "realhf.apps.quickstart", "sft", "--help"])
    assert p.returncode == 0
    assert "model:" in p.stdout and "allocation_mode: pipe_model" in p.stdout


def test_user_script_registers_and_launches(tmp_path):
    script = tmp_path / "my_exp.py"
    script.write_text(textwrap.dedent("""
        import dataclasses
        from realhf.api.quickstart import SFTConfig
        from realhf.api.quickstart.entrypoint import quickstart_main, register_quickstart_exp

        @dataclasses.dataclass
        class MySFTConfig(SFTConfig):
            my_knob: int = 1

        register_quickstart_exp("my-sft", MySFTConfig)

        if __name__ == "__main__":
            quickstart_main()
    """))
    p, _ = _run([str(script), "my-sft", "my_knob=abc"], cwd=str(tmp_path))
    assert p.returncode == 2, p.stderr
    assert "my_knob='abc'" in p.stderr and "expected int" in p.stderr
    p, _ = _run([str(script), "my-sft", "--help"], cwd=str(tmp_path))
    assert p.returncode == 0 and "my_knob: 1" in p.stdout


@pytest.fixture
def fake_launcher(monkeypatch):
    started = []
    mod = types.ModuleType("realhf.apps.main")
    mod.main_start = lambda cfg: started.append(cfg)
    monkeypatch.setitem(sys.modules, "realhf.apps.main", mod)
    return started


@pytest.fixture
def launchable_sft():
    """An SFT config with initial_setup(), registered as 'sft-launch-test'."""
    import dataclasses

    @dataclasses.dataclass
    class LaunchableSFT(SFTConfig):
        def initial_setup(self):
            return "built"

    QUICKSTART_EXPS.register("sft-launch-test", LaunchableSFT)
    yield "sft-launch-test"
    QUICKSTART_EXPS.unregister("sft-launch-test")


def test_main_launches_valid_config(fake_launcher, good_overrides, launchable_sft):
    ov = [o for o in good_overrides if not o.startswith("trial_name=")]
    assert main([launchable_sft, *ov]) == 0
    (cfg,) = fake_launcher
    assert isinstance(cfg, SFTConfig) and cfg.trial_name.startswith("run")


def test_main_refuses_config_without_initial_setup(fake_launcher, capsys):
    from realhf.api.quickstart import CommonExperimentConfig

    @dataclasses.dataclass
    class BareExp(CommonExperimentConfig):  # fields only, no initial_setup
        knob: int = 1

    QUICKSTART_EXPS.register("bare-sft", BareExp, override=True)
    try:
        assert main(["bare-sft", "experiment_name=bare", "trial_name=t1", "n_gpus_per_node=1"]) == 1
    finally:
        QUICKSTART_EXPS.unregister("bare-sft")
    assert "has no initial_setup()" in capsys.readouterr().err
    assert not fake_launcher


def test_main_with_import_option(fake_launcher, good_overrides, tmp_path):
    script = tmp_path / "other_exp.py"
    script.write_text(textwrap.dedent("""
        import dataclasses
        from realhf.api.quickstart import SFTConfig
        from realhf.api.quickstart.entrypoint import register_quickstart_exp

        @dataclasses.dataclass
        class ImportedSFT(SFTConfig):
            def initial_setup(self):
                return None

        register_quickstart_exp("imported-sft", ImportedSFT)
    """))
    try:
        assert main(["--import", str(script), "imported-sft", *good_overrides]) == 0
        assert type(fake_launcher[0]).__name__ == "ImportedSFT"
    finally:
        QUICKSTART_EXPS.unregister("imported-sft")


def test_main_without_launcher(monkeypatch, good_overrides, capsys):
    monkeypatch.setitem(sys.modules, "realhf.apps.main", None)
    assert main(["sft", *good_overrides]) == 1
    assert "realhf.apps.main is not available" in capsys.readouterr().err


def test_main_config_error_returns_2(capsys):
    assert main(["sft", "model.optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'model.optimizer.lrr'") and err.count("\n") == 1


def test_main_no_args_prints_usage(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().out
