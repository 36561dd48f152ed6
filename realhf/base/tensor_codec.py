"""Encode Python objects holding tensors into one byte tensor, and back.

Model workers exchange batches (``SequenceSample`` parts: a few dozen small
tensors plus ids and lengths) over ``torch.distributed`` point-to-point calls,
which carry tensors only. ``torch.save``/``torch.load`` would do, but they
write a zip archive, one record per tensor, and re-read it; for a batch of a
few KB that costs more than the message itself. Here the object graph is
pickled (protocol 5) with every tensor replaced by a reference, and the
tensors' bytes follow the pickle, each at an 8-byte aligned offset, so
decoding reads each tensor as a view of the received buffer (no copy).

Layout: ``[u64 pickle length][u64 table length][pickle][tensor table][pad][tensor bytes, aligned]...``,
the table listing each tensor's dtype, shape and whether it came from a CUDA device.

Decoded tensors live on the CPU, except that a tensor sent from a CUDA
device is placed on this process's current CUDA device when there is one.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any, Dict, List

import torch

_ALIGN = 8
_HEAD = struct.Struct("<QQ")  # lengths of the object pickle and of the tensor table


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _Pickler(pickle.Pickler):
    """Pickles ``obj`` with each tensor replaced by its index in ``tensors``."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=5)
        self.tensors: List[torch.Tensor] = []
        self._index: Dict[int, int] = {}  # id(tensor) -> index: a tensor met twice is sent once

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        key = id(obj)
        if key not in self._index:
            if obj.layout != torch.strided:
                raise TypeError(f"tensor_codec encodes strided tensors only, got layout {obj.layout}.")
            self._index[key] = len(self.tensors)
            self.tensors.append(obj)
        return self._index[key]


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: List[torch.Tensor]):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self.tensors[pid]


def encode(obj: Any) -> torch.Tensor:
    """``obj`` as a 1-D uint8 CPU tensor (see the module docstring for the layout)."""
    f = io.BytesIO()
    p = _Pickler(f)
    p.dump(obj)
    body = f.getbuffer()
    table = pickle.dumps([(t.dtype, tuple(t.shape), t.device.type == "cuda") for t in p.tensors], protocol=5)
    sizes = [t.numel() * t.element_size() for t in p.tensors]
    pos = _aligned(_HEAD.size + len(body) + len(table))
    offsets = []
    for n in sizes:
        offsets.append(pos)
        pos = _aligned(pos + n)
    out = torch.empty(pos, dtype=torch.uint8)
    view = memoryview(out.numpy())
    _HEAD.pack_into(view, 0, len(body), len(table))
    a = _HEAD.size + len(body)
    view[_HEAD.size:a] = body
    view[a:a + len(table)] = table
    for t, off, n in zip(p.tensors, offsets, sizes):
        if n:
            out[off:off + n].copy_(t.detach().cpu().contiguous().view(-1).view(torch.uint8))
    return out


def decode(buf: torch.Tensor) -> Any:
    """The object :func:`encode` wrote into ``buf`` (a 1-D uint8 tensor on any device).

    Tensors are views of ``buf`` (of its host copy if it lives on a device)."""
    if buf.device.type != "cpu":
        buf = buf.cpu()
    raw = memoryview(buf.numpy())
    n_body, n_table = _HEAD.unpack_from(raw, 0)
    a = _HEAD.size + n_body
    table = pickle.loads(raw[a:a + n_table])
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    tensors, pos = [], _aligned(a + n_table)
    for dtype, shape, on_cuda in table:
        numel = 1
        for d in shape:
            numel *= d
        n = numel * dtype.itemsize
        t = buf[pos:pos + n].view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
        if on_cuda and device is not None:
            t = t.to(device)
        tensors.append(t)
        pos = _aligned(pos + n)
    return _Unpickler(io.BytesIO(raw[_HEAD.size:a]), tensors).load()
