"""Backend registry and selection for the operators in ``realhf.impl.ops``.

Every operator has several implementations ("backends"): native C++ for CPU
tensors, a CUDA extension and Triton kernels for GPU tensors, and a
vectorized torch fallback that always works.  Implementations register here
with the devices they serve and a probe saying whether they are usable in this
process (an extension may be missing, Triton may not be installed), so that
callers never need per-backend if-chains.

Selection order for a call:

1. the ``backend=`` argument of the operator, if given;
2. the ``REAL_OP_BACKEND`` environment variable, for operators that have an
   implementation under that name (operators without one, such as a CPU-only
   operator under ``REAL_OP_BACKEND=cuda``, keep their automatic choice);
3. otherwise the first usable backend in :data:`PRIORITY` for the tensor's
   device whose measured size threshold (``min_size``) the problem reaches.

A requested backend that is unknown, unusable or cannot serve the device
raises :class:`BackendError` listing the backends that would work.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

ENV_VAR = "REAL_OP_BACKEND"

# Preference per device type, fastest first.  Triton on the CPU only exists
# under TRITON_INTERPRET=1 (a debugging aid), hence last there.
PRIORITY: Dict[str, tuple] = {
    "cuda": ("cuda", "triton", "python"),
    "cpu": ("cpp", "python", "triton"),
}
_DEFAULT_PRIORITY = ("python",)

KNOWN_BACKENDS = ("cuda", "cpp", "triton", "python")

DeviceLike = Union[str, torch.device]


class BackendError(ValueError):
    """A requested backend is unknown or cannot run the call."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one operator.

    ``serves`` says which devices it handles; ``probe`` returns ``None`` when
    the backend is usable in this process, else the reason it is not.
    ``min_size`` is the problem size below which automatic selection skips
    it (explicit requests ignore it).
    """

    op: str
    backend: str
    fn: Callable
    serves: Callable[[torch.device], bool]
    probe: Callable[[], Optional[str]]
    min_size: int = 0

    def unusable_reason(self, device: torch.device) -> Optional[str]:
        reason = _cached_probe(self.probe)
        if reason is not None:
            return reason
        if not self.serves(device):
            return f"does not run on {device.type} tensors"
        return None


@functools.lru_cache(maxsize=None)
def _cached_probe(probe: Callable[[], Optional[str]]) -> Optional[str]:
    # Probes import modules; their answer cannot change within a process.
    return probe()


def always_usable() -> Optional[str]:
    return None


def on_any_device(device: torch.device) -> bool:
    return True


def on_device_types(*types: str) -> Callable[[torch.device], bool]:
    allowed = frozenset(types)

    def serves(device: torch.device) -> bool:
        return device.type in allowed

    return serves


class Registry:
    """Implementations keyed by operator name and backend name."""

    def __init__(self) -> None:
        self._impls: Dict[str, Dict[str, Implementation]] = {}

    def register(self, impl: Implementation) -> Implementation:
        if impl.backend not in KNOWN_BACKENDS:
            raise ValueError(f"unknown backend name {impl.backend!r}; "
                             f"expected one of {KNOWN_BACKENDS}")
        table = self._impls.setdefault(impl.op, {})
        if impl.backend in table:
            raise ValueError(f"{impl.op} already has a {impl.backend} backend")
        table[impl.backend] = impl
        return impl

    def ops(self) -> List[str]:
        return sorted(self._impls)

    def _table(self, op: str) -> Dict[str, Implementation]:
        try:
            return self._impls[op]
        except KeyError:
            raise BackendError(
                f"unknown operator {op!r}; known operators: {self.ops()}") from None

    def available(self, op: str, device: Optional[DeviceLike] = None) -> List[str]:
        """Usable backends for ``op``, in preference order.

        With ``device=None`` the answer covers every device kind this process
        can use (the CPU, plus CUDA when a GPU is visible).
        """
        table = self._table(op)
        if device is None:
            devices = [torch.device("cpu")]
            if torch.cuda.is_available():
                devices.append(torch.device("cuda"))
        else:
            devices = [torch.device(device)]
        names: List[str] = []
        for dev in devices:
            for name in PRIORITY.get(dev.type, _DEFAULT_PRIORITY):
                impl = table.get(name)
                if name in names or impl is None:
                    continue
                if impl.unusable_reason(dev) is None:
                    names.append(name)
        return names

    def unusable_reason(self, op: str, backend: str,
                        device: DeviceLike) -> Optional[str]:
        """None if ``backend`` can run ``op`` on ``device``, else why not."""
        impl = self._table(op).get(backend)
        if impl is None:
            return f"{op} has no {backend!r} backend"
        return impl.unusable_reason(torch.device(device))

    def select(self, op: str, device: DeviceLike, backend: Optional[str] = None,
               size: int = 0) -> Implementation:
        """The implementation to run ``op`` on ``device`` (see module docs)."""
        device = torch.device(device)
        table = self._table(op)
        if backend is None:
            forced = os.environ.get(ENV_VAR, "").strip().lower() or None
            if forced is not None and forced not in KNOWN_BACKENDS:
                raise BackendError(
                    f"{ENV_VAR}={forced!r} is not a backend name; known: "
                    f"{list(KNOWN_BACKENDS)}")
            if forced in table:
                return self._require(op, table, forced, device,
                                     f"forced by {ENV_VAR}")
            return self._auto(op, table, device, size)
        return self._require(op, table, backend, device, "requested")

    def _require(self, op: str, table: Dict[str, Implementation], name: str,
                 device: torch.device, why: str) -> Implementation:
        impl = table.get(name)
        if impl is None:
            reason = ("is not a backend name" if name not in KNOWN_BACKENDS
                      else f"has no {op} implementation")
        else:
            reason = impl.unusable_reason(device)
            if reason is None:
                return impl
        raise BackendError(
            f"backend {name!r} ({why}) cannot run {op} on {device.type}: "
            f"{reason}; available there: {self.available(op, device)}")

    def _auto(self, op: str, table: Dict[str, Implementation],
              device: torch.device, size: int) -> Implementation:
        fallback: Optional[Implementation] = None
        for name in PRIORITY.get(device.type, _DEFAULT_PRIORITY):
            impl = table.get(name)
            if impl is None or impl.unusable_reason(device) is not None:
                continue
            if size >= impl.min_size:
                return impl
            fallback = fallback or impl
        if fallback is not None:
            return fallback
        raise BackendError(f"no backend of {op} runs on {device.type}; "
                           f"registered: {sorted(table)}")


REGISTRY = Registry()


def register(op: str, backend: str, fn: Callable, *,
             serves: Callable[[torch.device], bool] = on_any_device,
             probe: Callable[[], Optional[str]] = always_usable,
             min_size: int = 0) -> Implementation:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    return REGISTRY.register(
        Implementation(op, backend, fn, serves, probe, min_size))


def select(op: str, device: DeviceLike, backend: Optional[str] = None,
           size: int = 0) -> Implementation:
    return REGISTRY.select(op, device, backend, size)


def available_backends(op: str, device: Optional[DeviceLike] = None) -> List[str]:
    """Usable backends of ``op`` (optionally for one device), fastest first."""
    return REGISTRY.available(op, device)


def unusable_reason(op: str, backend: str, device: DeviceLike) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device``, else the reason."""
    return REGISTRY.unusable_reason(op, backend, device)


def registered_ops() -> Sequence[str]:
    return REGISTRY.ops()
