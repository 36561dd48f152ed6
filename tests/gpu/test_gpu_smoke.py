"""End-to-end runs on one CUDA device: the quickstart CLI with one model worker.

Marked ``gpu`` (excluded by default) and skipped without CUDA. Run all GPU
checks with ``tests/gpu/run_gpu_smoke.sh``; the native-kernel-vs-fallback
comparisons on CUDA live in ``tests/ops/test_gpu_backends.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Dict, List

import pytest
import torch

from tests.gpu._args import ROOT, ppo_args, sft_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run_cli(exp: str, args: List[str], fileroot: str, timeout: float = 200) -> List[Dict]:
    """Run the quickstart CLI on the GPU (REAL_FORCE_CPU cleared); the trial's stats records."""
    from realhf.base import constants

    env = dict(os.environ, REAL_FILEROOT=fileroot)
    env.pop("REAL_FORCE_CPU", None)
    res = subprocess.run([sys.executable, "-m", "realhf.apps.quickstart", exp, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    name = next(a.split("=", 1)[1] for a in args if a.startswith("experiment_name="))
    path = os.path.join(fileroot, "logs", constants.get_user(), name, "t", "stats.jsonl")
    return [json.loads(line) for line in open(path)]


def _config(exp: str, args: List[str]):
    import realhf.experiments  # noqa: F401  (registers the experiments)
    from realhf.api.quickstart.entrypoint import parse_quickstart

    return parse_quickstart(exp, args).initial_setup()


def test_sft_one_gpu_bf16(tmp_path):
    args = sft_args(steps=4)
    cfg = _config("sft", args)
    assert cfg.n_model_workers == 1 and cfg.model_worker[0].device.startswith("cuda")
    recs = _run_cli("sft", args, str(tmp_path))
    losses = [r["stats"]["trainDefault"]["loss"] for r in recs if "stats" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert min(losses[1:]) < losses[0]


def test_ppo_one_gpu(tmp_path):
    args = ppo_args(steps=2)
    cfg = _config("ppo", args)
    assert cfg.n_model_workers == 1 and cfg.model_worker[0].device.startswith("cuda")
    recs = _run_cli("ppo", args, str(tmp_path))
    stats = [r["stats"] for r in recs if "stats" in r]
    assert len(stats) == 2
    for s in stats:
        for call in ("actor_train", "critic_train"):
            assert all(math.isfinite(v) for v in s[call].values() if isinstance(v, (int, float))), (call, s[call])


def test_worker_binds_and_decodes_on_cuda():
    from realhf.system import model_worker as mw

    n = torch.cuda.device_count()
    assert mw.bind_cuda_device(n, "cuda") == 0 and torch.cuda.current_device() == 0
    t = mw._to_bytes({"x": torch.arange(4)}).cuda()
    assert torch.equal(mw._from_bytes(t)["x"], torch.arange(4))
