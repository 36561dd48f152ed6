"""Device profiles: the H100 preset, the JSON cache, and (slow) measuring this machine."""

import dataclasses
import json
import time

import pytest

from realhf.search.hardware import (
    H100_MATMUL_EFFICIENCY,
    DeviceProfile,
    cached_profile,
    h100_profile,
    profile_this_machine,
)


def test_h100_preset():
    p = h100_profile()
    assert p.matmul_flops == pytest.approx(989e12 * H100_MATMUL_EFFICIENCY)
    assert p.memory_bytes == 80e9 and p.devices_per_node == 8 and p.param_bytes == 2
    assert p.intra_bw > p.inter_bw == pytest.approx(400e9 / 8 * 0.8)
    assert p.link(True) == (p.inter_bw, p.inter_lat) and p.link(False) == (p.intra_bw, p.intra_lat)


def test_cached_profile_reads_file_and_rescales_workers(tmp_path):
    p = dataclasses.replace(h100_profile(), devices_per_node=2, memory_bytes=10.0)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p.to_json()))
    got = cached_profile(4, path)
    assert got.devices_per_node == 4 and got.memory_bytes == pytest.approx(5.0)  # same RAM, more workers
    assert DeviceProfile.from_json(p.to_json()) == p


@pytest.mark.slow
def test_profile_this_machine_is_short():
    t0 = time.perf_counter()
    p = profile_this_machine(2)
    assert time.perf_counter() - t0 < 20
    assert p.matmul_flops > 1e8 and p.mem_bytes_per_s > 1e7 and p.intra_bw > 1e6
    assert 0 < p.intra_lat < 0.1 and 0 < p.train_efficiency <= 1 and p.op_overhead_s > 0
