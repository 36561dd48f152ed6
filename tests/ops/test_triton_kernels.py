"""Triton kernels: GPU compilation ahead of time, and CPU runs in the interpreter.

Without a GPU the kernels are still compiled down to a cubin for sm_80, which
catches type errors the interpreter forgives.  Functional checks run the
regular interval/GAE tests with TRITON_INTERPRET=1 in a subprocess, because
the mode is fixed when the kernels are decorated at import.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@pytest.mark.skipif(_interpreting(), reason="kernels are interpreted in this process")
@pytest.mark.parametrize("n_type", ["i32", "i64"])
def test_kernels_compile_for_sm80(n_type, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # pin the default, silence its warning
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    from realhf.impl.ops import triton_kernels as tk

    target = GPUTarget("cuda", 80, 32)
    for dt in ("i8", "i16", "i32", "i64"):
        src = ASTSource(
            fn=tk._interval_copy_kernel,
            signature={"flat_ptr": f"*{dt}", "packed_ptr": f"*{dt}", "plan_ptr": "*i64",
                       "n": n_type, "CHUNK": "constexpr", "SEARCH_STEPS": "constexpr",
                       "GATHER": "constexpr"},
            constexprs={"CHUNK": 1024, "SEARCH_STEPS": 5, "GATHER": dt == "i32"})
        assert "cubin" in triton.compile(src, target=target).asm
    for dt in ("fp32", "fp64"):
        for cu in ("i32", "i64"):
            src = ASTSource(
                fn=tk._gae_kernel,
                signature={"rewards_ptr": f"*{dt}", "values_ptr": f"*{dt}",
                           "cu_ptr": f"*{cu}", "truncate_ptr": "*i8", "adv_ptr": f"*{dt}",
                           "ret_ptr": f"*{dt}", "coef_ptr": f"*{dt}", "bs": n_type,
                           "SEQS": "constexpr"},
                constexprs={"SEQS": tk.GAE_SEQS})
            kernel = triton.compile(src, target=target, options={"num_warps": 1})
            assert "cubin" in kernel.asm


@pytest.mark.skipif(_interpreting(), reason="triton cases already run in this process")
def test_interpreted_backend_matches_references():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("REAL_OP_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
           "tests/ops/test_intervals.py", "tests/ops/test_gae.py"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 40, out.stdout[-2000:]
