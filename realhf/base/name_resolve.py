"""Key-value name resolution for discovering peers across processes.

Workers publish addresses and status under hierarchical keys (built by
:mod:`realhf.base.names`) and wait for keys published by others. Keys are
slash-separated paths; a subtree of ``"a/b"`` is ``"a/b"`` itself plus every
key below ``"a/b/"``. Backends: ``memory`` (an in-process dictionary),
``file`` / ``nfs`` (a directory under ``$REAL_FILEROOT``; across hosts it must
be on a shared file system) and ``redis`` (a Redis server, see
:mod:`realhf.base.name_resolve_redis`; needs no shared file system).
Module-level functions forward to a default repository: the backend named by
``$REAL_NAME_RESOLVE`` (default ``file``), or one chosen with :func:`reconfigure`.
"""

from __future__ import annotations

import abc
import atexit
import os
import shutil
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

from realhf.base import constants

ENTRY_FILENAME = "ENTRY"
BACKEND_ENV_VAR = "REAL_NAME_RESOLVE"
DEFAULT_BACKEND = "file"


class NameEntryExistsError(Exception):
    """Raised by ``add`` when the key is present and ``replace`` is False."""


class NameEntryNotFoundError(Exception):
    """Raised when reading or deleting a key that does not exist."""


def normalize_key(name: str) -> str:
    """Canonical form of a key: no empty, ``.`` or ``..`` components."""
    parts = [p for p in str(name).split("/") if p]
    if not parts:
        raise ValueError(f"Empty name-resolve key: {name!r}.")
    for part in parts:
        if part in (".", ".."):
            raise ValueError(f"Key {name!r} contains a relative component.")
    return "/".join(parts)


def _in_subtree(key: str, root: str) -> bool:
    return key == root or key.startswith(root + "/")


class NameRecordRepository(abc.ABC):
    """Interface of a name-resolve backend.

    Subclasses implement storage (``_write``, ``_read``, ``_remove``,
    ``_keys_under``); bookkeeping shared by all backends lives here.
    """

    def __init__(self):
        # Keys this process added with delete_on_exit, with the adding pid so
        # forked children never delete their parent's entries.
        self._owned: List[Tuple[str, int]] = []
        self._owned_lock = threading.Lock()

    # -- storage primitives -------------------------------------------- #
    @abc.abstractmethod
    def _write(self, key: str, value: str, replace: bool) -> None:
        """Store ``value``; raise NameEntryExistsError if present and not replace."""

    @abc.abstractmethod
    def _read(self, key: str) -> str:
        """Return the value or raise NameEntryNotFoundError."""

    @abc.abstractmethod
    def _remove(self, key: str) -> None:
        """Remove the key or raise NameEntryNotFoundError."""

    @abc.abstractmethod
    def _keys_under(self, root: str) -> List[str]:
        """All keys in the subtree of ``root``, in any order."""

    # -- public API ------------------------------------------------------ #
    def add(
        self,
        name: str,
        value,
        delete_on_exit: bool = True,
        replace: bool = False,
    ) -> None:
        key = normalize_key(name)
        self._write(key, str(value), replace)
        if delete_on_exit:
            with self._owned_lock:
                entry = (key, os.getpid())
                if entry not in self._owned:
                    self._owned.append(entry)

    def add_subentry(self, name: str, value, **kwargs) -> str:
        """Add ``value`` under a fresh unique child of ``name``; return its key."""
        sub = f"{normalize_key(name)}/{uuid.uuid4().hex[:12]}"
        self.add(sub, value, **kwargs)
        return sub

    def get(self, name: str) -> str:
        return self._read(normalize_key(name))

    def find_subtree(self, name_root: str) -> List[str]:
        """Sorted keys in the subtree of ``name_root``."""
        return sorted(self._keys_under(normalize_key(name_root)))

    def get_subtree(self, name_root: str) -> List[str]:
        """Values of the subtree of ``name_root``, ordered by key."""
        values = []
        for key in self.find_subtree(name_root):
            try:
                values.append(self._read(key))
            except NameEntryNotFoundError:  # deleted concurrently
                continue
        return values

    def wait(
        self,
        name: str,
        timeout: Optional[float] = None,
        poll_frequency: float = 0.05,
    ) -> str:
        """Block until ``name`` exists and return its value."""
        key = normalize_key(name)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._read(key)
            except NameEntryNotFoundError:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Timed out after {timeout}s waiting for name-resolve key {key!r}."
                )
            time.sleep(poll_frequency)

    def delete(self, name: str) -> None:
        key = normalize_key(name)
        self._remove(key)
        self._forget(lambda k: k == key)

    def clear_subtree(self, name_root: str) -> None:
        root = normalize_key(name_root)
        for key in self._keys_under(root):
            try:
                self._remove(key)
            except NameEntryNotFoundError:
                pass
        self._forget(lambda k: _in_subtree(k, root))

    def reset(self) -> None:
        """Delete the delete_on_exit entries this process added."""
        pid = os.getpid()
        with self._owned_lock:
            mine = [k for k, p in self._owned if p == pid]
            self._owned = [(k, p) for k, p in self._owned if p != pid]
        for key in mine:
            try:
                self._remove(key)
            except NameEntryNotFoundError:
                pass

    def _forget(self, match: Callable[[str], bool]) -> None:
        with self._owned_lock:
            self._owned = [(k, p) for k, p in self._owned if not match(k)]


class MemoryNameRecordRepository(NameRecordRepository):
    """Entries in a dictionary; visible to this process only."""

    def __init__(self):
        super().__init__()
        self._store: Dict[str, str] = {}
        self._lock = threading.Lock()

    def _write(self, key, value, replace):
        with self._lock:
            if key in self._store and not replace:
                raise NameEntryExistsError(key)
            self._store[key] = value

    def _read(self, key):
        with self._lock:
            try:
                return self._store[key]
            except KeyError:
                raise NameEntryNotFoundError(key) from None

    def _remove(self, key):
        with self._lock:
            if self._store.pop(key, None) is None:
                raise NameEntryNotFoundError(key)

    def _keys_under(self, root):
        with self._lock:
            return [k for k in self._store if _in_subtree(k, root)]


class FileNameRecordRepository(NameRecordRepository):
    """Entries as files ``<root>/<key>/ENTRY`` in a (possibly shared) directory.

    Values are written to a temporary file and moved into place, so readers
    in other processes see either nothing or the complete value.
    """

    def __init__(self, fileroot: Optional[str] = None):
        super().__init__()
        # Without an explicit root, follow $REAL_FILEROOT at each use, so a
        # process that launches several trials under different roots (tests)
        # writes where its workers will read.
        self._explicit_root = None if fileroot is None else os.path.abspath(fileroot)
        os.makedirs(self.fileroot, exist_ok=True)

    @property
    def fileroot(self) -> str:
        if self._explicit_root is not None:
            return self._explicit_root
        return os.path.abspath(os.path.join(constants.get_fileroot(), "name_resolve"))

    def _dir(self, key: str) -> str:
        parts = key.split("/")
        if ENTRY_FILENAME in parts or any(p.startswith(".") for p in parts):
            raise ValueError(
                f"Key {key!r}: components may not be {ENTRY_FILENAME!r} or start "
                "with '.' in the file backend."
            )
        return os.path.join(self.fileroot, *parts)

    def _entry(self, key: str) -> str:
        return os.path.join(self._dir(key), ENTRY_FILENAME)

    def _write(self, key, value, replace):
        entry = self._entry(key)
        for _ in range(20):
            try:
                self._write_once(entry, value, replace)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the directory we just created.
                continue
        raise OSError(f"Could not write name-resolve entry {key!r}.")

    def _write_once(self, entry: str, value: str, replace: bool) -> None:
        directory = os.path.dirname(entry)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{ENTRY_FILENAME}.{os.getpid()}.{uuid.uuid4().hex}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        try:
            if replace:
                os.replace(tmp, entry)
                return
            try:
                # link() fails if the entry exists, making create-if-absent
                # atomic across processes.
                os.link(tmp, entry)
            except FileExistsError:
                raise NameEntryExistsError(entry_key(self.fileroot, entry)) from None
            except OSError:
                # File systems without hard links: best-effort check.
                if os.path.exists(entry):
                    raise NameEntryExistsError(entry_key(self.fileroot, entry)) from None
                os.replace(tmp, entry)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _read(self, key):
        try:
            with open(self._entry(key), "r", encoding="utf-8") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NameEntryNotFoundError(key) from None

    def _remove(self, key):
        try:
            os.unlink(self._entry(key))
        except FileNotFoundError:
            raise NameEntryNotFoundError(key) from None
        self._prune(self._dir(key))

    def _prune(self, directory: str) -> None:
        """Remove empty directories from ``directory`` up to the root."""
        while directory != self.fileroot and directory.startswith(self.fileroot):
            try:
                os.rmdir(directory)
            except OSError:  # not empty, or already gone
                return
            directory = os.path.dirname(directory)

    def _keys_under(self, root):
        base = self._dir(root)
        keys = []
        for dirpath, _, filenames in os.walk(base):
            if ENTRY_FILENAME in filenames:
                keys.append(entry_key(self.fileroot, os.path.join(dirpath, ENTRY_FILENAME)))
        return keys

    def destroy(self) -> None:
        """Delete the whole root directory, including other processes' entries."""
        shutil.rmtree(self.fileroot, ignore_errors=True)


def entry_key(fileroot: str, entry_path: str) -> str:
    rel = os.path.relpath(os.path.dirname(entry_path), fileroot)
    return "/".join(rel.split(os.sep))


# ---------------------------------------------------------------------- #
# Backend registry and the default repository.
# ---------------------------------------------------------------------- #
_BACKENDS: Dict[str, Callable[..., NameRecordRepository]] = {}


def register_backend(name: str, cls: Callable[..., NameRecordRepository]) -> None:
    """Register a backend class, or a factory (so optional clients are imported only when used)."""
    _BACKENDS[name] = cls


def _redis_backend(**kwargs) -> NameRecordRepository:
    from realhf.base.name_resolve_redis import redis_backend

    return redis_backend(**kwargs)


register_backend("memory", MemoryNameRecordRepository)
register_backend("file", FileNameRecordRepository)
register_backend("nfs", FileNameRecordRepository)
register_backend("redis", _redis_backend)


def make_repository(backend_name: str, **kwargs) -> NameRecordRepository:
    try:
        cls = _BACKENDS[backend_name]
    except KeyError:
        raise ValueError(
            f"Unknown name-resolve backend {backend_name!r}; "
            f"known: {sorted(_BACKENDS)}."
        ) from None
    return cls(**kwargs)


_default_repo: Optional[NameRecordRepository] = None
_default_lock = threading.Lock()


def default_repository() -> NameRecordRepository:
    """The process-wide repository, created on first use from ``$REAL_NAME_RESOLVE``."""
    global _default_repo
    with _default_lock:
        if _default_repo is None:
            _default_repo = make_repository(
                os.environ.get(BACKEND_ENV_VAR, DEFAULT_BACKEND)
            )
        return _default_repo


def reconfigure(backend_name: str, **kwargs) -> NameRecordRepository:
    """Replace the default repository; entries owned by the old one are deleted."""
    global _default_repo
    repo = make_repository(backend_name, **kwargs)
    with _default_lock:
        old, _default_repo = _default_repo, repo
    if old is not None:
        old.reset()
    return repo


@atexit.register
def _cleanup_default() -> None:
    if _default_repo is not None:
        _default_repo.reset()


def add(name: str, value, delete_on_exit: bool = True, replace: bool = False) -> None:
    default_repository().add(name, value, delete_on_exit=delete_on_exit, replace=replace)


def add_subentry(name: str, value, **kwargs) -> str:
    return default_repository().add_subentry(name, value, **kwargs)


def get(name: str) -> str:
    return default_repository().get(name)


def get_subtree(name_root: str) -> List[str]:
    return default_repository().get_subtree(name_root)


def find_subtree(name_root: str) -> List[str]:
    return default_repository().find_subtree(name_root)


def wait(name: str, timeout: Optional[float] = None, poll_frequency: float = 0.05) -> str:
    return default_repository().wait(name, timeout=timeout, poll_frequency=poll_frequency)


def delete(name: str) -> None:
    default_repository().delete(name)


def clear_subtree(name_root: str) -> None:
    default_repository().clear_subtree(name_root)


def reset() -> None:
    default_repository().reset()
