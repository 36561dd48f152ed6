"""Point-to-point transfer of tensors whose shape is not known in advance.

Packed activations have ``[n_tokens, hidden]`` shapes that differ for every
micro-batch, so the receiver cannot pre-allocate a buffer. Each transfer is
therefore two messages: a fixed-size int64 header (dtype code, rank, dims),
then the payload (skipped for empty tensors). Ranks are global ranks, as in
``torch.distributed``; ``group`` is the pipeline group they belong to. The
same code runs on gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

# Supported payload dtypes; the index is the code sent in the header.
_DTYPES: Tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
MAX_NDIM = 8
HEADER_LEN = 2 + MAX_NDIM


def _device_for(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where buffers must live for the group's backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def encode_header(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Header describing ``t`` so the receiver can allocate its buffer."""
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"Unsupported dtype for pipeline transfer: {t.dtype}.")
    if t.dim() > MAX_NDIM:
        raise ValueError(f"Tensors with more than {MAX_NDIM} dims cannot be sent, got {t.dim()}.")
    h = [_DTYPE_CODE[t.dtype], t.dim()] + list(t.shape) + [0] * (MAX_NDIM - t.dim())
    return torch.tensor(h, dtype=torch.int64, device=device)


def decode_header(h: torch.Tensor) -> Tuple[torch.dtype, Tuple[int, ...]]:
    vals = h.tolist()
    code, ndim = int(vals[0]), int(vals[1])
    if not 0 <= code < len(_DTYPES) or not 0 <= ndim <= MAX_NDIM:
        raise ValueError(f"Corrupted pipeline transfer header: {vals}.")
    return _DTYPES[code], tuple(int(x) for x in vals[2 : 2 + ndim])


def _wire(t: torch.Tensor) -> torch.Tensor:
    """Contiguous view with a dtype every backend can move (bool as uint8)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _alloc(dtype: torch.dtype, shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    wire_dtype = torch.uint8 if dtype == torch.bool else dtype
    return torch.empty(shape, dtype=wire_dtype, device=device)


def _unwire(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return buf.view(torch.bool) if dtype == torch.bool else buf


def send_tensor(t: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup] = None) -> None:
    """Blocking send of ``t`` (any shape, supported dtype) to global rank ``dst``."""
    dev = _device_for(group)
    dist.send(encode_header(t, dev), dst, group=group)
    if t.numel() > 0:
        dist.send(_wire(t.to(dev)), dst, group=group)


def recv_tensor(
    src: int, group: Optional[dist.ProcessGroup] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Blocking receive of a tensor sent with :func:`send_tensor` from ``src``."""
    dev = _device_for(group) if device is None else torch.device(device)
    h = torch.empty(HEADER_LEN, dtype=torch.int64, device=dev)
    dist.recv(h, src, group=group)
    dtype, shape = decode_header(h)
    buf = _alloc(dtype, shape, dev)
    if buf.numel() > 0:
        dist.recv(buf, src, group=group)
    return _unwire(buf, dtype)


def isend_tensor(t: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup] = None) -> List[dist.Work]:
    """Non-blocking :func:`send_tensor`; wait on every returned handle before
    reusing or freeing ``t``."""
    dev = _device_for(group)
    header = encode_header(t, dev)
    works = [dist.isend(header, dst, group=group)]
    if t.numel() > 0:
        works.append(dist.isend(_wire(t.to(dev)), dst, group=group))
    return works


def _run_batch(ops: List[dist.P2POp]) -> None:
    if not ops:
        return
    for w in dist.batch_isend_irecv(ops):
        w.wait()


def batch_send_recv(
    sends: Sequence[Tuple[torch.Tensor, int]],
    recv_srcs: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
) -> List[torch.Tensor]:
    """Post all ``(tensor, dst)`` sends and receives from ``recv_srcs`` at once.

    Concurrent posting lets a stage exchange with both neighbours without
    caring about send/recv order. Messages between one pair of ranks match in
    posting order. Returns the received tensors in ``recv_srcs`` order. On
    NCCL every rank of ``group`` must take part in the group's first batch.
    """
    dev = _device_for(group)
    headers = [encode_header(t, dev) for t, _ in sends]
    recv_headers = [torch.empty(HEADER_LEN, dtype=torch.int64, device=dev) for _ in recv_srcs]
    ops = [dist.P2POp(dist.isend, h, dst, group) for h, (_, dst) in zip(headers, sends)]
    ops += [dist.P2POp(dist.irecv, h, src, group) for h, src in zip(recv_headers, recv_srcs)]
    _run_batch(ops)
    metas = [decode_header(h) for h in recv_headers]
    bufs = [_alloc(dtype, shape, dev) for dtype, shape in metas]
    payloads = [_wire(t.to(dev)) for t, _ in sends]
    ops = [dist.P2POp(dist.isend, p, dst, group) for p, (_, dst) in zip(payloads, sends) if p.numel() > 0]
    ops += [dist.P2POp(dist.irecv, b, src, group) for b, src in zip(bufs, recv_srcs) if b.numel() > 0]
    _run_batch(ops)
    return [_unwire(b, dtype) for b, (dtype, _) in zip(bufs, metas)]
