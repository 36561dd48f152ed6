"""Backend selection: automatic choice, REAL_OP_BACKEND, explicit requests, errors."""

import subprocess
import sys
import textwrap

import pytest
import torch

from realhf.impl import ops
from realhf.impl.ops import dispatch, native

OPS = ("merge_intervals", "slice_intervals", "set_intervals", "gae_1d")
CPP_BUILT = native.load("interval_op") is not None and native.load("gae") is not None


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_every_op_is_registered_with_a_python_fallback():
    assert set(OPS) <= set(dispatch.registered_ops())
    for op in OPS:
        assert "python" in ops.available_backends(op, "cpu")
        assert ops.available_backends(op, "cpu")[-1] in ("python", "triton")


@pytest.mark.skipif(not CPP_BUILT, reason="realhf._C extensions are not built")
@pytest.mark.parametrize("op", ["slice_intervals", "set_intervals", "gae_1d"])
def test_auto_picks_cpp_on_cpu(op):
    assert ops.available_backends(op, "cpu")[0] == "cpp"
    assert dispatch.select(op, "cpu").backend == "cpp"


@pytest.mark.skipif(CPP_BUILT, reason="only meaningful without the extensions")
def test_auto_picks_python_without_extensions():
    for op in OPS:
        assert dispatch.select(op, "cpu", size=10**6).backend == "python"


@pytest.mark.skipif(not CPP_BUILT, reason="realhf._C extensions are not built")
def test_merge_crossover_for_lists():
    """Short Python lists stay in Python; long lists and arrays go native."""
    assert dispatch.select("merge_intervals", "cpu", size=4).backend == "python"
    assert dispatch.select("merge_intervals", "cpu", size=1000).backend == "cpp"


def test_env_forces_python(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "python")
    for op in OPS:
        assert dispatch.select(op, "cpu", size=10**6).backend == "python"

    # The calls really avoid the extensions: any attempt to load one fails.
    def no_native(name):
        raise AssertionError(f"extension {name} used under REAL_OP_BACKEND=python")

    monkeypatch.setattr(native, "load", no_native)
    assert ops.slice_intervals(torch.arange(5.0), [(1, 3)]).tolist() == [1.0, 2.0]
    big = [(2 * i, 2 * i + 1) for i in range(100)]
    assert ops.merge_intervals(big) == big
    adv, _ = ops.gae_1d(torch.ones(1), torch.zeros(2), torch.tensor([0, 2]),
                        torch.tensor([False]), 0.9, 0.9)
    assert adv.tolist() == [1.0]


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "python")
    if CPP_BUILT:
        assert dispatch.select("gae_1d", "cpu", backend="cpp").backend == "cpp"


def test_unknown_backend_errors_list_available(monkeypatch):
    with pytest.raises(dispatch.BackendError, match=r"'nope'.*available there: \[.*'python'"):
        ops.slice_intervals(torch.zeros(4), [(0, 1)], backend="nope")
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(dispatch.BackendError, match="REAL_OP_BACKEND='nope'.*known"):
        ops.gae_1d(torch.zeros(1), torch.zeros(2), torch.tensor([0, 2]),
                   torch.tensor([True]), 0.9, 0.9)


def test_backend_error_is_a_value_error():
    assert issubclass(dispatch.BackendError, ValueError)


def test_unavailable_backend_explains_why(monkeypatch):
    # CUDA kernels cannot take CPU tensors, whatever is installed.
    with pytest.raises(dispatch.BackendError, match=r"'cuda'.*cpu.*available there"):
        ops.slice_intervals(torch.zeros(4), [(0, 1)], backend="cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(dispatch.BackendError, match="forced by REAL_OP_BACKEND"):
        ops.gae_1d(torch.zeros(1), torch.zeros(2), torch.tensor([0, 2]),
                   torch.tensor([True]), 0.9, 0.9)
    # merge has no CUDA implementation at all, so forcing cuda leaves it alone.
    assert ops.merge_intervals([(0, 1), (1, 2)]) == [(0, 2)]
    with pytest.raises(dispatch.BackendError, match="has no merge_intervals implementation"):
        ops.merge_intervals([(0, 1)], backend="triton")


def test_registry_is_a_table_not_a_chain():
    reg = dispatch.Registry()
    reg.register(dispatch.Implementation("op", "python", lambda: "py",
                                         dispatch.on_any_device, dispatch.always_usable))
    reg.register(dispatch.Implementation("op", "cpp", lambda: "cpp",
                                         dispatch.on_device_types("cpu"),
                                         lambda: "not built"))
    with pytest.raises(ValueError, match="already has"):
        reg.register(dispatch.Implementation("op", "python", lambda: None,
                                             dispatch.on_any_device,
                                             dispatch.always_usable))
    with pytest.raises(ValueError, match="unknown backend name"):
        reg.register(dispatch.Implementation("op", "fortran", lambda: None,
                                             dispatch.on_any_device,
                                             dispatch.always_usable))
    assert reg.available("op", "cpu") == ["python"]
    assert reg.select("op", "cpu").fn() == "py"
    with pytest.raises(dispatch.BackendError, match="not built"):
        reg.select("op", "cpu", backend="cpp")
    with pytest.raises(dispatch.BackendError, match="unknown operator"):
        reg.select("missing", "cpu")


def test_min_size_is_a_preference_not_a_limit():
    reg = dispatch.Registry()
    reg.register(dispatch.Implementation("op", "cpp", lambda: "cpp",
                                         dispatch.on_any_device,
                                         dispatch.always_usable, min_size=100))
    # No alternative: the thresholded backend still runs small problems.
    assert reg.select("op", "cpu", size=1).backend == "cpp"
    reg.register(dispatch.Implementation("op", "python", lambda: "py",
                                         dispatch.on_any_device, dispatch.always_usable))
    assert reg.select("op", "cpu", size=1).backend == "python"
    assert reg.select("op", "cpu", size=100).backend == "cpp"


def test_fallbacks_work_when_extensions_fail_to_import():
    """Blocking realhf._C imports leaves a fully working python backend."""
    script = textwrap.dedent("""
        import sys
        for name in ("interval_op", "gae", "interval_op_cuda", "cugae"):
            sys.modules["realhf._C." + name] = None  # makes the import fail
        import torch
        from realhf.impl import ops
        for op in ("merge_intervals", "slice_intervals", "set_intervals", "gae_1d"):
            assert ops.available_backends(op, "cpu")[0] == "python", op
        x = torch.arange(10.0)
        assert ops.slice_intervals(x, [(1, 3), (3, 4)]).tolist() == [1.0, 2.0, 3.0]
        assert ops.merge_intervals([(1, 3), (3, 4)]) == [(1, 4)]
        adv, _ = ops.gae_1d(torch.ones(1), torch.zeros(2), torch.tensor([0, 2]),
                            torch.tensor([False]), 0.9, 0.9)
        assert adv.tolist() == [1.0]
        try:
            ops.gae_1d(torch.ones(1), torch.zeros(2), torch.tensor([0, 2]),
                       torch.tensor([False]), 0.9, 0.9, backend="cpp")
        except ops.BackendError as e:
            assert "unavailable" in str(e), e
        else:
            raise AssertionError("cpp should be unavailable")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
