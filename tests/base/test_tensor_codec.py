"""The byte codec model workers use to exchange batches: every value and dtype
comes back, shared tensors stay shared, and a received tensor is a view of
the received buffer."""

import pytest
import torch

from realhf.api.core.data_api import SequenceSample
from realhf.base import tensor_codec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool])
def test_round_trip_of_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, generator=g) * 50).to(dtype)
    y = tensor_codec.decode(tensor_codec.encode({"x": x, "odd": x[:, 1:2]}))
    assert y["x"].dtype == dtype and torch.equal(y["x"], x)
    assert torch.equal(y["odd"], x[:, 1:2])  # a non-contiguous view arrives as its values


def test_structure_shapes_and_sharing():
    a = torch.arange(7)
    obj = {"a": a, "again": a, "t": torch.randn(3, 4).t(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
           "nested": [1, "two", (3.0, None)], "grad": torch.ones(2, requires_grad=True)}
    y = tensor_codec.decode(tensor_codec.encode(obj))
    assert y["again"] is y["a"] and torch.equal(y["a"], a)
    assert torch.equal(y["t"], obj["t"]) and y["t"].shape == (4, 3)
    assert y["empty"].shape == (0, 3) and y["scalar"].shape == () and float(y["scalar"]) == 2.5
    assert y["nested"] == [1, "two", (3.0, None)]
    assert not y["grad"].requires_grad and torch.equal(y["grad"], torch.ones(2))


def test_tensors_are_aligned_views_of_the_buffer():
    buf = tensor_codec.encode([torch.ones(3, dtype=torch.int8), torch.arange(4, dtype=torch.float64)])
    ints, floats = tensor_codec.decode(buf)
    base = buf.data_ptr()
    assert base <= floats.data_ptr() < base + buf.numel()
    assert (floats.data_ptr() - base) % 8 == 0
    assert torch.equal(ints, torch.ones(3, dtype=torch.int8))


def test_sequence_sample_parts():
    parts = [SequenceSample.from_default([3, 5], ["a", "b"], {"packed_input_ids": torch.arange(8), "values": torch.randn(8)}),
             SequenceSample.from_default([2], ["c"], {"packed_input_ids": torch.arange(2), "values": torch.randn(2)})]
    out = tensor_codec.decode(tensor_codec.encode(parts))
    for p, q in zip(parts, out):
        assert q.ids == p.ids and q.seqlens == p.seqlens and q.keys == p.keys and q.dtypes == p.dtypes
        assert all(torch.equal(q.data[k], p.data[k]) for k in p.keys)
        assert [it.ids for it in q.unpack()] == [[i] for i in p.ids]


def test_sparse_tensors_are_refused():
    with pytest.raises(TypeError, match="strided"):
        tensor_codec.encode(torch.eye(3).to_sparse())
