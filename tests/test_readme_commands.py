"""The README's set-up commands are the ones CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    main, tests = cmds
    assert "realhf.apps" in main and "pytest" in tests
    for c in cmds:
        assert "\n" not in c.strip(), "each set-up command is one line"
        assert "torch==2.13.0" in c, "torch must be pinned"


def test_ci_runs_the_readme_test_command_verbatim():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert _readme_commands()[1] in ci
    assert "set -euo pipefail" in ci


def test_setup_pins_torch():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert 'TORCH_PIN = "torch==2.13.0"' in setup
