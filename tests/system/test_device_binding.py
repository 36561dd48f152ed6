"""Model workers bind their own CUDA device, decode transfers from any device,
and warm up NCCL groups; checked on CPU by standing in for the CUDA runtime."""

from __future__ import annotations

import socket
from typing import List

import pytest
import torch
import torch.distributed as dist

from realhf.impl.model.comm import global_comm
from realhf.system import model_worker as mw


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this process sees two CUDA devices; records set_device calls."""
    calls: List[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(int(i)))
    return calls


def test_workers_spread_over_visible_devices(fake_cuda):
    assert [mw.cuda_device_index(r, "cuda") for r in range(5)] == [0, 1, 0, 1, 0]


def test_explicit_index_wins_and_is_checked(fake_cuda):
    assert mw.cuda_device_index(0, "cuda:1") == 1
    with pytest.raises(RuntimeError, match="only 2 CUDA devices"):
        mw.cuda_device_index(0, "cuda:2")


def test_cpu_workers_bind_nothing(fake_cuda):
    assert mw.bind_cuda_device(3, "cpu") is None
    assert fake_cuda == []


def test_no_cuda_binds_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mw.cuda_device_index(1, "cuda") is None


def test_bind_sets_current_device(fake_cuda):
    assert [mw.bind_cuda_device(r, "cuda") for r in range(3)] == [0, 1, 0]
    assert fake_cuda == [0, 1, 0]


class _DeviceTensor:
    """Acts like a CUDA tensor: ``.numpy()`` fails until copied to the host."""

    device = torch.device("cuda", 0)

    def __init__(self, t: torch.Tensor):
        self._t = t

    def detach(self) -> "_DeviceTensor":
        return self

    def cpu(self) -> torch.Tensor:
        return self._t

    def numpy(self):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


def test_from_bytes_copies_device_buffers_to_host():
    payload = {"ids": [1, 2], "x": torch.arange(3)}
    t = mw._to_bytes(payload)
    out = mw._from_bytes(_DeviceTensor(t))
    assert out["ids"] == [1, 2] and torch.equal(out["x"], torch.arange(3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    global_comm.clear_group_cache()
    yield
    global_comm.clear_group_cache()
    dist.destroy_process_group()


def test_gloo_groups_are_not_warmed_up(gloo_world):
    assert global_comm.warm_up_group(None) is False


def test_nccl_group_runs_one_all_reduce(gloo_world, monkeypatch):
    reduced = []
    monkeypatch.setattr(global_comm.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
    monkeypatch.setattr(global_comm.dist, "all_reduce", lambda t, group=None: reduced.append(group))
    assert global_comm.warm_up_group("g") is True
    assert reduced == ["g"]


def test_new_groups_are_warmed_up_by_members(gloo_world, monkeypatch):
    warmed = []
    monkeypatch.setattr(global_comm, "warm_up_group", lambda g: warmed.append(g))
    g = global_comm.new_or_get_group([0])
    assert warmed == [g]
    global_comm.new_or_get_group([0])  # cached: no second warm-up
    assert warmed == [g]
