"""The README's quickstart SFT command run as a CLI, shortened, plus manual (pp2, tp2)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.distributed


def _readme_quickstart_args():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    cmd = next(b for b in blocks if b.startswith("python -m realhf.apps.quickstart sft ")).strip()
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "realhf.apps.quickstart"]
    return args[3:]


def _run(args, root, trial):
    env = dict(os.environ, REAL_FILEROOT=str(root))
    args = [a for a in args if not a.startswith("trial_name=")] + [f"trial_name={trial}"]
    return subprocess.run([sys.executable, "-m", "realhf.apps.quickstart", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _records(root, trial):
    from realhf.base import constants

    path = os.path.join(root, "logs", constants.get_user(), "quickstart-sft", trial, "stats.jsonl")
    return [json.loads(l) for l in open(path)]


@pytest.mark.parametrize("extra,trial", [
    ([], "readme"),
    (["allocation_mode=manual", "allocation.parallel.pipeline_parallel_size=2",
      "allocation.parallel.model_parallel_size=2"], "manual-pp2-tp2"),
])
def test_quickstart_sft(tmp_path, extra, trial):
    import torch
    import transformers

    args = [a for a in _readme_quickstart_args() if not a.startswith("exp_ctrl.eval_freq_steps")]
    args += ["exp_ctrl.benchmark_steps=8", "exp_ctrl.eval_freq_steps=8"] + extra
    if extra:
        args = [a for a in args if not a.startswith("allocation_mode=")] + extra
    res = _run(args, tmp_path, trial)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "global step 8/8" in res.stdout  # step logs reach the console
    recs = _records(tmp_path, trial)
    losses = [r["stats"]["trainDefault"]["loss"] for r in recs if "stats" in r]
    evals = [r["eval"]["trainDefault"] for r in recs if "eval" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert evals and evals[-1]["loss"] < losses[0]
    ckpt = os.path.join(tmp_path, "checkpoints", _user(), "quickstart-sft", trial, "default",
                        "epoch1epochstep8globalstep8")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all()


def _user():
    from realhf.base import constants

    return constants.get_user()


@pytest.mark.parametrize("bad,expect", [
    ("malformed", "line 3"),
    ("maxlen", "dataset.max_seqlen=4"),
])
def test_bad_datasets_fail_before_workers_start(tmp_path, bad, expect):
    args = _readme_quickstart_args()
    if bad == "malformed":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n{"prompt": "e", "answ\n')
        args = [a for a in args if not a.startswith("dataset.train_path=")] + [f"dataset.train_path={path}"]
    else:
        args += ["dataset.max_seqlen=4"]
    res = _run(args, tmp_path, f"bad-{bad}")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and expect in err, err
    logs = os.path.join(tmp_path, "logs", _user(), "quickstart-sft", f"bad-{bad}")
    assert not os.path.exists(os.path.join(logs, "model_worker-0"))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_no_worker_outlives_the_launcher(tmp_path, sig):
    # A job system ends a run with SIGTERM (the launcher stops its workers) or
    # SIGKILL (the workers are told by the kernel that their launcher died).
    import signal
    import time

    import psutil

    args = [a for a in _readme_quickstart_args() if not a.startswith(("trial_name=", "exp_ctrl."))]
    env = dict(os.environ, REAL_FILEROOT=str(tmp_path))
    out = open(tmp_path / "out.txt", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "realhf.apps.quickstart", *args, f"trial_name=term-{sig}",
                                 "exp_ctrl.benchmark_steps=100000", "exp_ctrl.total_train_epochs=1000"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "global step 2/" not in (tmp_path / "out.txt").read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.5)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(workers) >= 5  # 4 model workers and the master
        launcher.send_signal(getattr(signal, sig))
        assert launcher.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        if launcher.poll() is None:
            launcher.kill()
        out.close()
