"""CUDA-tensor backends (CUDA extension, compiled Triton, torch fallback).

Needs a GPU; excluded from the default run by the ``gpu`` marker.  Results
are compared with the CPU torch fallback, which the CPU tests tie to
plain-Python references.
"""

import numpy as np
import pytest
import torch

from realhf.impl.ops import dispatch, gae_1d, set_intervals, slice_intervals

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BACKENDS = ("cuda", "triton", "python")


def _require(op, backend):
    reason = dispatch.unusable_reason(op, backend, "cuda")
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _intervals(rng, n, size, align):
    edges = np.sort(rng.integers(0, size // align + 1, 2 * n)) * align
    return edges.reshape(n, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("n,align", [(1, 1), (7, 1), (300, 8), (5000, 3), (64, 64)])
def test_slice_set_match_cpu(backend, dtype, n, align):
    _require("slice_intervals", backend)
    rng = np.random.default_rng(n * align)
    size = 200_000
    cpu_src = torch.from_numpy(rng.standard_normal(size).astype(np.float32) * 50).to(dtype)
    iv = _intervals(rng, n, size, align)
    expected = slice_intervals(cpu_src, iv, backend="python")
    src = cpu_src.cuda()
    packed = slice_intervals(src, iv, backend=backend)
    assert packed.is_cuda and torch.equal(packed.cpu(), expected)
    dst = torch.zeros(size, dtype=dtype, device="cuda")
    set_intervals(packed, dst, iv, backend=backend)
    ref = torch.zeros(size, dtype=dtype)
    set_intervals(expected, ref, iv, backend="python")
    assert torch.equal(dst.cpu(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_matches_cpu(backend, dtype):
    _require("gae_1d", backend)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, 1000)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    values = torch.from_numpy(rng.uniform(-1, 1, int(cu[-1]))).to(dtype)
    rewards = torch.from_numpy(rng.uniform(-1, 1, int(cu[-1]) - len(lengths))).to(dtype)
    truncate = torch.from_numpy(rng.random(len(lengths)) < 0.5)
    ref = gae_1d(rewards, values, cu, truncate, 0.99, 0.95, backend="python")
    got = gae_1d(rewards.cuda(), values.cuda(), cu.cuda(), truncate.cuda(), 0.99, 0.95,
                 backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


def test_auto_selection_prefers_native_kernels():
    for op in ("slice_intervals", "set_intervals", "gae_1d"):
        order = dispatch.available_backends(op, "cuda")
        assert order[-1] == "python"
        assert dispatch.select(op, "cuda").backend == order[0]
