"""Release a frozen ReaLModel's parameter memory between calls and restore it later.

Frozen models (reference, reward) only run forward. Between their model
function calls their flat parameter buffer (``model.flat_param``) can be moved
to a host store and the working memory given back; the next call restores it.

API (all functions take an instantiated :class:`ReaLModel`)::

    offload(model, store_dir=None, auto_reload=False)   # -> True if it offloaded
    reload(model, overlap=False)   # -> per-layer CUDA events (overlap) or None
    is_offloaded(model)
    invalidate(model)              # weights were replaced: next offload re-copies
    wait_layer(model, layer_index) # CUDA overlap: current stream waits for one layer
    wait_reload(model)             # wait for the whole reload
    release_store(model)           # delete the host store (file / pinned buffer)

Offloading an offloaded model and reloading a loaded one are no-ops.

CPU models
    The buffer is written into a file in a private temporary directory
    (``store_dir``, default ``tempfile.gettempdir()``) through a shared memory
    mapping, the mapping is dropped, every parameter's data becomes an empty
    tensor, ``model.flat_param`` becomes None and glibc is asked to trim its
    heap, so the pages go back to the OS. Buffers above glibc's mmap
    threshold (at most 32 MiB) are returned by ``free`` itself. The file's
    pages live in the page cache (or tmpfs), which is not the process's
    resident memory. :func:`reload` allocates a fresh buffer, copies from the
    mapped file and rebinds with ``model.bind_flat_param``.

    The file is kept after reload (deleted with :func:`release_store` or
    when the model is garbage collected). A frozen model's weights do not
    change, so the next offload skips the copy when the store is clean: the
    store is clean when the model still holds the buffer that :func:`reload`
    installed and that buffer's autograd version counter has not moved (any
    in-place write through ``flat_param`` or a parameter bumps it). Writes
    the counter cannot see (through ``.data``, numpy, DLPack, another
    process) must be announced with :func:`invalidate`; call it after
    parameter reallocation or any weight replacement to be safe. Installing
    a new buffer (``bind_flat_param``) is detected automatically, also while
    offloaded: a model re-instantiated while offloaded (e.g. as the target
    of a reallocation) counts as loaded, and its store as stale.

CUDA models
    A pinned host buffer of the flat size is allocated once and kept (the
    store). Offload copies device -> host on a side stream (after the
    current stream's pending work), records an event and frees the device
    buffer (``record_stream`` keeps the caching allocator from reusing it
    before the copy ends; the memory returns to PyTorch's cache, not the
    driver). Reload allocates the device buffer, makes the side stream wait
    for the current stream and the offload event, then copies layer by layer
    (layer order), recording one event per layer; parameters are rebound at
    once. With ``overlap=False`` the current stream waits for all copies
    before reload returns. With ``overlap=True`` it does not: the caller must
    make each layer's compute wait for its own copy, i.e. in
    ``ReaLModel.forward``::

        for idx, layer in zip(self.layer_indices, self.layers):
            offload.wait_layer(self, idx)   # no-op when nothing is in flight
            x = layer(...)

    so the copy of layer i+1 overlaps the compute of layer i. Anything else
    touching ``flat_param`` must call :func:`wait_reload` first.

Forward while offloaded
    ``offload`` installs a forward pre-hook. By default it raises
    :class:`ModelOffloadedError`. With ``auto_reload=True`` it reloads the
    model transparently (``overlap`` as given by ``auto_reload_overlap``,
    default False, since overlap needs the ``wait_layer`` calls above) and
    the model stays loaded afterwards.

Gradients are dropped on offload (frozen models have none).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import shutil
import tempfile
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from realhf.impl.model.nn.flat_param import param_intervals

__all__ = [
    "ModelOffloadedError",
    "offload",
    "reload",
    "is_offloaded",
    "invalidate",
    "wait_layer",
    "wait_reload",
    "release_store",
    "store_path",
    "trim_host_memory",
]

_STATE_ATTR = "_offload_state"


class ModelOffloadedError(RuntimeError):
    """Forward (or a weight access) on a model whose parameters are offloaded."""


@dataclasses.dataclass
class _OffloadState:
    dtype: torch.dtype
    device: torch.device
    numel: int
    store_dir: Optional[str] = None  # private directory holding the CPU store file
    pinned: Optional[torch.Tensor] = None  # CUDA store
    stream: Any = None  # CUDA side stream
    offload_event: Any = None
    layer_events: Dict[int, Any] = dataclasses.field(default_factory=dict)
    offloaded: bool = False
    store_valid: bool = False
    # Identity and version counter of the buffer that matches the store.
    clean_buffer: Optional[weakref.ref] = None
    clean_version: int = -1
    params: List[nn.Parameter] = dataclasses.field(default_factory=list)
    hook: Any = None
    auto_reload: bool = False
    auto_reload_overlap: bool = False
    finalizer: Any = None

    @property
    def path(self) -> Optional[str]:
        return None if self.store_dir is None else os.path.join(self.store_dir, "flat_param.bin")


def _state(model: nn.Module) -> Optional[_OffloadState]:
    st = model.__dict__.get(_STATE_ATTR)
    if st is not None and st.offloaded and model.flat_param is not None:
        # Re-instantiated behind our back (``instantiate``/``bind_flat_param``,
        # e.g. as a reallocation target): the model is loaded, the store stale.
        if st.hook is not None:
            st.hook.remove()
            st.hook = None
        st.offloaded = False
        st.store_valid = False
        st.params = []
    return st


def _get_state(model: nn.Module, store_dir: Optional[str]) -> _OffloadState:
    st = _state(model)
    flat = model.flat_param
    if st is not None and (st.dtype != flat.dtype or st.device != flat.device or st.numel != flat.numel()):
        release_store(model)
        st = None
    if st is None:
        st = _OffloadState(dtype=flat.dtype, device=flat.device, numel=flat.numel())
        if flat.device.type == "cpu":
            base = store_dir if store_dir is not None else tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            st.store_dir = tempfile.mkdtemp(prefix="realhf-offload-", dir=base)
            # Delete the directory with the model (or at interpreter exit).
            st.finalizer = weakref.finalize(model, shutil.rmtree, st.store_dir, True)
        model.__dict__[_STATE_ATTR] = st
    return st


def _is_clean(st: _OffloadState, flat: torch.Tensor) -> bool:
    return (
        st.store_valid
        and st.clean_buffer is not None
        and st.clean_buffer() is flat
        and flat._version == st.clean_version
    )


def _mark_clean(st: _OffloadState, flat: torch.Tensor) -> None:
    st.store_valid = True
    st.clean_buffer = weakref.ref(flat)
    st.clean_version = flat._version


# ------------------------------------------------------------------ host memory
_LIBC = None


def trim_host_memory() -> bool:
    """Ask glibc to return free heap memory to the OS (``malloc_trim(0)``); False if unavailable."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(_LIBC.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _map_store(st: _OffloadState) -> torch.Tensor:
    """Shared mapping of the store file (created at the right size if needed)."""
    path = st.path
    nbytes = st.numel * torch.empty(0, dtype=st.dtype).element_size()
    if not os.path.exists(path) or os.path.getsize(path) != nbytes:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    return torch.from_file(path, shared=True, size=st.numel, dtype=st.dtype)


# ------------------------------------------------------------------ layer order
def _layer_copy_plan(model: nn.Module) -> List[Tuple[int, List[Tuple[int, int]]]]:
    """[(layer index, intervals to copy for it)] in layer order, each element once.

    A layer's intervals are those of its keys not copied for an earlier layer
    (a tied head reuses the embedding's slot); padding between buckets goes
    with the last layer.
    """
    by_layer: Dict[int, List[str]] = {}
    for key in model.param_spec:
        by_layer.setdefault(int(key.split(".", 1)[0]), []).append(key)
    covered: List[Tuple[int, int]] = []
    plan = []
    for idx in model.layer_indices:
        ivs = [iv for iv in param_intervals(model.param_spec, by_layer.get(idx, [])) if iv not in covered]
        covered.extend(ivs)
        plan.append((idx, ivs))
    # Gaps (bucket padding) not covered by any parameter.
    gaps, pos = [], 0
    for s, e in sorted(covered):
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < model.flat_size:
        gaps.append((pos, model.flat_size))
    if plan:
        plan[-1] = (plan[-1][0], plan[-1][1] + gaps)
    return plan


# ------------------------------------------------------------------ parameters
def _drop_params(model: nn.Module, st: _OffloadState) -> None:
    """Point every parameter at an empty tensor so nothing keeps the buffer alive."""
    seen, params = set(), []
    for key in model.param_spec:
        p = model.get_param(key)
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.grad = None
        p.data = torch.empty(0, dtype=st.dtype, device=st.device)
        params.append(p)
    st.params = params


def _forward_pre_hook(module: nn.Module, args, kwargs=None):
    st = _state(module)
    if st is None or not st.offloaded:
        return None
    if st.auto_reload:
        reload(module, overlap=st.auto_reload_overlap)
        return None
    raise ModelOffloadedError(
        f"{type(module).__name__} (layers {module.layer_indices[0]}..{module.layer_indices[-1]}) is offloaded: "
        "its parameters were released to host memory. Call "
        "realhf.impl.model.nn.offload.reload(model) before forward, or offload with auto_reload=True."
    )


# ------------------------------------------------------------------ public API
def is_offloaded(model: nn.Module) -> bool:
    st = _state(model)
    return st is not None and st.offloaded


@torch.no_grad()
def offload(
    model: nn.Module,
    store_dir: Optional[str] = None,
    auto_reload: bool = False,
    auto_reload_overlap: bool = False,
) -> bool:
    """Move the flat buffer to the host store and free it; see the module docstring.

    Returns False (no-op) if the model is already offloaded. ``store_dir`` is
    used when the store is first created (CPU models only).
    """
    if is_offloaded(model):
        return False
    if not model.instantiated:
        raise RuntimeError("Cannot offload a model that is not instantiated.")
    wait_reload(model)
    flat = model.flat_param
    st = _get_state(model, store_dir)
    if flat.device.type == "cuda":
        _offload_cuda(st, flat)
    else:
        if not _is_clean(st, flat):
            store = _map_store(st)
            store.copy_(flat)
            del store  # unmap: the pages stay in the page cache, not in our RSS
            _mark_clean(st, flat)
    st.auto_reload, st.auto_reload_overlap = auto_reload, auto_reload_overlap
    _drop_params(model, st)
    model.flat_param = None
    del flat
    st.offloaded = True
    st.clean_buffer = None
    st.hook = model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    if st.device.type == "cpu":
        trim_host_memory()
    return True


def _offload_cuda(st: _OffloadState, flat: torch.Tensor) -> None:
    if st.stream is None:
        st.stream = torch.cuda.Stream(device=flat.device)
    if st.pinned is None:
        st.pinned = torch.empty(st.numel, dtype=st.dtype, pin_memory=True)
        st.store_valid = False
    if _is_clean(st, flat):
        st.offload_event = None
        return
    cur = torch.cuda.current_stream(flat.device)
    st.stream.wait_stream(cur)
    with torch.cuda.stream(st.stream):
        st.pinned.copy_(flat, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(st.stream)
    flat.record_stream(st.stream)
    st.offload_event = ev
    _mark_clean(st, flat)


@torch.no_grad()
def reload(model: nn.Module, overlap: bool = False) -> Optional[List[Any]]:
    """Restore the parameters; no-op (returns None) if the model is not offloaded.

    CPU: synchronous, returns None. CUDA: returns the per-layer events in
    layer order; with ``overlap=True`` the copies may still be running (use
    :func:`wait_layer` / :func:`wait_reload`).
    """
    st = _state(model)
    if st is None or not st.offloaded:
        return None
    flat = torch.empty(st.numel, dtype=st.dtype, device=st.device)
    plan = _layer_copy_plan(model)
    events = None
    if st.device.type == "cuda":
        events = _reload_cuda(st, flat, plan, overlap)
    else:
        store = _map_store(st)
        for _, ivs in plan:
            for s, e in ivs:
                flat[s:e].copy_(store[s:e])
        del store
    _rebind(model, st, flat)
    return events


def _rebind(model: nn.Module, st: _OffloadState, flat: torch.Tensor) -> None:
    model.bind_flat_param(flat)
    st.params = []
    if st.hook is not None:
        st.hook.remove()
        st.hook = None
    st.offloaded = False
    _mark_clean(st, flat)


def _reload_cuda(st: _OffloadState, flat: torch.Tensor, plan, overlap: bool) -> List[Any]:
    cur = torch.cuda.current_stream(st.device)
    # The new buffer's memory may still be read by earlier work on the current stream.
    st.stream.wait_stream(cur)
    if st.offload_event is not None:
        st.stream.wait_event(st.offload_event)
    st.layer_events = {}
    with torch.cuda.stream(st.stream):
        for idx, ivs in plan:
            for s, e in ivs:
                flat[s:e].copy_(st.pinned[s:e], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(st.stream)
            st.layer_events[idx] = ev
    flat.record_stream(st.stream)
    events = list(st.layer_events.values())
    if not overlap:
        cur.wait_stream(st.stream)
        st.layer_events = {}
    return events


def wait_layer(model: nn.Module, layer_index: int) -> None:
    """Make the current stream wait until layer ``layer_index``'s weights are copied.

    No-op for CPU models, loaded models with no copy in flight, and layers
    already waited for.
    """
    st = _state(model)
    if st is None or not st.layer_events:
        return
    ev = st.layer_events.pop(layer_index, None)
    if ev is not None:
        torch.cuda.current_stream(st.device).wait_event(ev)


def wait_reload(model: nn.Module) -> None:
    """Make the current stream wait for every pending per-layer copy."""
    st = _state(model)
    if st is None or not st.layer_events:
        return
    cur = torch.cuda.current_stream(st.device)
    for ev in st.layer_events.values():
        cur.wait_event(ev)
    st.layer_events = {}


def invalidate(model: nn.Module) -> None:
    """Mark the host store stale: the next offload copies the weights again.

    Call after replacing weights in ways the version counter may not see
    (parameter reallocation, ``.data`` writes). Invalidating an offloaded
    model is an error: its only copy of the weights is the store.
    """
    st = _state(model)
    if st is None:
        return
    if st.offloaded:
        raise ModelOffloadedError("Cannot invalidate the store of an offloaded model: it holds the only copy.")
    st.store_valid = False
    st.clean_buffer = None


def release_store(model: nn.Module) -> None:
    """Delete the host store (file or pinned buffer) of a loaded model."""
    st = _state(model)
    if st is None:
        return
    if st.offloaded:
        raise ModelOffloadedError("Cannot release the store of an offloaded model: reload it first.")
    wait_reload(model)
    if st.stream is not None:
        st.stream.synchronize()
    if st.finalizer is not None:
        st.finalizer()  # removes the directory
    del model.__dict__[_STATE_ATTR]


def store_path(model: nn.Module) -> Optional[str]:
    """Path of a CPU model's store file (None if there is none)."""
    st = _state(model)
    return None if st is None else st.path
