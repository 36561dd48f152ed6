"""Name -> implementation registries.

Datasets, interfaces, backends, models and experiments are all selected by a
registered name in configuration files. One small class serves them all so that
an unknown name fails the same way everywhere: with the list of known names.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised for unknown or conflicting registrations.

    Subclasses KeyError so callers that look names up like a dict can catch it,
    but keeps a readable message (KeyError's str() would quote it).
    """

    def __str__(self) -> str:  # pragma: no cover - trivial
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A mapping from names to implementations of one kind of component.

    Args:
        kind: what is registered ("dataset", "model interface", ...); used in
            error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str, obj: T, *, override: bool = False) -> T:
        """Register ``obj`` under ``name``.

        Re-registering the same object is a no-op (modules may be imported
        twice, e.g. by a user script and by the package). Registering a
        different object under a taken name is an error unless ``override``.
        """
        if not isinstance(name, str) or not name:
            raise RegistryError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        existing = self._entries.get(name)
        if existing is not None and existing is not obj and not override:
            if getattr(existing, "__qualname__", None) == getattr(obj, "__qualname__", object()) and \
                    getattr(existing, "__module__", None) == getattr(obj, "__module__", object()):
                # Same definition re-executed (e.g. a script run as __main__ and
                # imported again by name): keep the newest one.
                self._entries[name] = obj
                return obj
            raise RegistryError(
                f"{self.kind} '{name}' is already registered to {existing!r}; "
                f"pass override=True to replace it."
            )
        self._entries[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` form of :meth:`register`."""

        def wrap(obj: T) -> T:
            self.register(name, obj)
            return obj

        return wrap

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self._unknown_message(name)) from None

    def make(self, key: str, /, *args: Any, **kwargs: Any) -> Any:
        """Look ``key`` up and call it with the given arguments.

        ``key`` is positional-only so factories may take a ``name`` argument.
        """
        return self.get(key)(*args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        msg = f"Unknown {self.kind} '{name}'. Registered {self.kind}s: {known}."
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            msg += f" Did you mean '{close[0]}'?"
        return msg

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
