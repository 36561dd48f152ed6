"""NamedArray: a nested, named collection of arrays sliced as one.

NamedArray aggregates multiple arrays, possibly of different shapes. Each
array is given a name, providing a user-friendly way of indexing to the
corresponding data. NamedArrays can be nested. A NamedArray can also store
metadata such as sequence lengths. Users can regard it as a nested dictionary
of arrays, except that indexing a NamedArray with anything other than a
string slices every hosted array.

Both ``numpy.ndarray`` and ``torch.Tensor`` leaves are supported (and may be
mixed). A field may be ``None``; such fields are skipped by indexing,
assignment and arithmetic, and stay ``None``.

Metadata policy: metadata is opaque to NamedArray. It is carried over
unchanged (as a shallow copy of the metadata dict) by indexing, arithmetic,
``recursive_apply``, pickling and ``copy.deepcopy`` (deep-copied there).
Indexing does not try to slice it: a caller that stores per-row metadata
must adjust it after slicing. ``recursive_aggregate`` and
``from_flattened`` produce NamedArrays without metadata, because the
meaning of merging metadata is unknown here.
"""

from __future__ import annotations

import operator
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "NamedArray",
    "from_dict",
    "recursive_aggregate",
    "recursive_apply",
    "flatten",
    "from_flattened",
    "split",
]

# Attributes stored on the instance itself rather than as data fields.
_INTERNAL = ("_fields", "_metadata")


class NamedArray:
    """A nested dictionary of arrays that is indexed as a whole.

    String keys and attributes address fields; any other index (int, slice,
    index array/tensor, boolean mask) returns a new NamedArray of the same
    class with every non-None field indexed.

    Field names that clash with methods or properties of this class (e.g.
    ``values``, ``shape``) are allowed but must be accessed with string keys,
    ``p["values"]``; assigning them as attributes raises AttributeError so
    that the method is never silently shadowed.
    """

    # Makes numpy defer binary operators (``np.float64(2) * p``) to the
    # reflected methods below instead of building an object array.
    __array_ufunc__ = None

    def __init__(self, **kwargs: Any):
        object.__setattr__(self, "_fields", dict(kwargs))
        object.__setattr__(self, "_metadata", {})

    # ------------------------------------------------------------------ #
    # Field access
    # ------------------------------------------------------------------ #
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails. Private and dunder names are
        # never fields; answering them would confuse copy/pickle protocols,
        # which probe for hooks on half-constructed instances.
        if name.startswith("_"):
            raise AttributeError(name)
        fields = self.__dict__.get("_fields")
        if fields is None or name not in fields:
            raise AttributeError(
                f"{type(self).__name__} has no field '{name}'. Fields: {list(fields or [])}."
            )
        return fields[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _INTERNAL:
            raise AttributeError(f"'{name}' is reserved by {type(self).__name__}.")
        if hasattr(type(self), name):
            raise AttributeError(
                f"Field name '{name}' clashes with a {type(self).__name__} attribute; "
                f"use p['{name}'] = ... instead."
            )
        self._fields[name] = value

    def __delattr__(self, name: str) -> None:
        if name not in self._fields:
            raise AttributeError(name)
        del self._fields[name]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):
            try:
                return self._fields[index]
            except KeyError:
                raise KeyError(
                    f"{type(self).__name__} has no field '{index}'. Fields: {list(self._fields)}."
                ) from None
        out = self.__class__(
            **{k: (None if v is None else v[index]) for k, v in self._fields.items()}
        )
        out._metadata.update(self._metadata)
        return out

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, str):
            self._fields[index] = value
            return
        if isinstance(value, NamedArray):
            if set(value.keys()) != set(self.keys()):
                missing = [k for k in self.keys() if k not in value]
                extra = [k for k in value.keys() if k not in self]
                raise ValueError(
                    f"Cannot assign a NamedArray with a different structure: "
                    f"missing fields {missing}, unexpected fields {extra}."
                )
            for k, v in self._fields.items():
                if v is None:
                    continue
                src = value[k]
                if src is None:
                    raise ValueError(f"Cannot assign None into non-None field '{k}'.")
                if isinstance(v, NamedArray) != isinstance(src, NamedArray):
                    raise ValueError(
                        f"Field '{k}': cannot assign a {type(src).__name__} into a {type(v).__name__}."
                    )
                v[index] = src
        else:
            for v in self._fields.values():
                if v is not None:
                    v[index] = value

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __len__(self) -> int:
        return len(self._fields)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fields.values())

    def keys(self):
        return self._fields.keys()

    def values(self):
        return self._fields.values()

    def items(self):
        return self._fields.items()

    # ------------------------------------------------------------------ #
    # Metadata
    # ------------------------------------------------------------------ #
    def register_metadata(self, **kwargs: Any) -> None:
        """Attach metadata entries; names must not shadow data fields."""
        for k in kwargs:
            if k in self._fields:
                raise KeyError(f"Metadata key '{k}' collides with a data field of the same name.")
        self._metadata.update(kwargs)

    @property
    def metadata(self) -> Mapping[str, Any]:
        """A read-only view; use register/pop/clear to change it."""
        return MappingProxyType(self._metadata)

    def pop_metadata(self, key: str) -> Any:
        try:
            return self._metadata.pop(key)
        except KeyError:
            raise KeyError(f"No metadata '{key}'. Metadata keys: {list(self._metadata)}.") from None

    def clear_metadata(self) -> None:
        self._metadata.clear()

    # ------------------------------------------------------------------ #
    # Introspection
    # ------------------------------------------------------------------ #
    def length(self, dim: int = 0) -> int:
        """Size along ``dim`` of the first (depth-first) array that has it."""
        found = _first_size(self, dim)
        if found is None:
            raise ValueError(f"No array in this {type(self).__name__} has dimension {dim}.")
        return found

    def to_dict(self) -> Dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, NamedArray) else v) for k, v in self._fields.items()}

    @property
    def shape(self) -> Dict[str, Any]:
        """Nested dict of leaf shapes (tuples); None for None fields."""
        out: Dict[str, Any] = {}
        for k, v in self._fields.items():
            if v is None:
                out[k] = None
            elif isinstance(v, NamedArray):
                out[k] = v.shape
            else:
                out[k] = tuple(v.shape)
        return out

    def size(self) -> int:
        """Total number of elements over all leaves (None counts as 0)."""
        total = 0
        for v in self._fields.values():
            if v is None:
                continue
            if isinstance(v, NamedArray):
                total += v.size()
            elif isinstance(v, torch.Tensor):
                total += v.numel()
            else:
                total += int(np.size(v))
        return total

    def __repr__(self) -> str:
        parts = [f"{k}={_leaf_repr(v)}" for k, v in self._fields.items()]
        if self._metadata:
            parts.append(f"metadata={list(self._metadata)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------ #
    # Pickling and copying
    # ------------------------------------------------------------------ #
    def __getstate__(self) -> Dict[str, Any]:
        return {"fields": self._fields, "metadata": self._metadata}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        object.__setattr__(self, "_fields", dict(state["fields"]))
        object.__setattr__(self, "_metadata", dict(state.get("metadata", {})))

    # ------------------------------------------------------------------ #
    # Arithmetic
    # ------------------------------------------------------------------ #
    def _binary(self, other: Any, op: Callable[[Any, Any], Any], reflected: bool = False) -> "NamedArray":
        if isinstance(other, NamedArray):
            _check_same_keys(self, other)
            out = {}
            for k, v in self._fields.items():
                o = other[k]
                if v is None and o is None:
                    out[k] = None
                elif v is None or o is None:
                    raise ValueError(f"Field '{k}' is None on only one side of the operation.")
                else:
                    out[k] = op(o, v) if reflected else op(v, o)
        else:
            out = {
                k: None if v is None else (op(other, v) if reflected else op(v, other))
                for k, v in self._fields.items()
            }
        res = self.__class__(**out)
        res._metadata.update(self._metadata)
        return res

    def _inplace(self, other: Any, op: Callable[[Any, Any], Any]) -> "NamedArray":
        if isinstance(other, NamedArray):
            _check_same_keys(self, other)
        for k, v in self._fields.items():
            if v is None:
                continue
            o = other[k] if isinstance(other, NamedArray) else other
            if o is None:
                raise ValueError(f"Field '{k}' is None on only one side of the operation.")
            # Tensors/ndarrays update in place; the assignment keeps the
            # field correct for immutable leaves (Python numbers).
            self._fields[k] = op(v, o)
        return self

    def __add__(self, other):
        return self._binary(other, operator.add)

    def __radd__(self, other):
        return self._binary(other, operator.add, reflected=True)

    def __sub__(self, other):
        return self._binary(other, operator.sub)

    def __rsub__(self, other):
        return self._binary(other, operator.sub, reflected=True)

    def __mul__(self, other):
        return self._binary(other, operator.mul)

    def __rmul__(self, other):
        return self._binary(other, operator.mul, reflected=True)

    def __truediv__(self, other):
        return self._binary(other, operator.truediv)

    def __rtruediv__(self, other):
        return self._binary(other, operator.truediv, reflected=True)

    def __iadd__(self, other):
        return self._inplace(other, operator.iadd)

    def __isub__(self, other):
        return self._inplace(other, operator.isub)

    def __imul__(self, other):
        return self._inplace(other, operator.imul)

    def __itruediv__(self, other):
        return self._inplace(other, operator.itruediv)


# ---------------------------------------------------------------------- #
# Internal utilities
# ---------------------------------------------------------------------- #
def _check_same_keys(a: NamedArray, b: NamedArray) -> None:
    if set(a.keys()) != set(b.keys()):
        raise ValueError(
            f"NamedArrays have different fields: {list(a.keys())} vs {list(b.keys())}."
        )


def _first_size(x: NamedArray, dim: int) -> Optional[int]:
    for v in x.values():
        if v is None:
            continue
        if isinstance(v, NamedArray):
            found = _first_size(v, dim)
            if found is not None:
                return found
            continue
        shape = getattr(v, "shape", None)
        if shape is not None and len(shape) > dim:
            return int(shape[dim])
    return None


def _leaf_repr(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"Tensor(shape={tuple(v.shape)}, dtype={v.dtype}, device={v.device})"
    if isinstance(v, np.ndarray):
        return f"ndarray(shape={v.shape}, dtype={v.dtype})"
    return repr(v)


def _zeros_like(x: Any) -> Any:
    if isinstance(x, NamedArray):
        return recursive_apply(x, _zeros_like)
    if isinstance(x, torch.Tensor):
        return torch.zeros_like(x)
    return np.zeros_like(x)


def _reraise_naming_field(e: Exception, context: str) -> None:
    """Re-raise ``e`` with the field path prepended, keeping its type if possible."""
    try:
        new = type(e)(f"{context}: {e}")
    except Exception:
        new = RuntimeError(f"{context}: {type(e).__name__}: {e}")
    raise new from e


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ---------------------------------------------------------------------- #
# Public functions
# ---------------------------------------------------------------------- #
def from_dict(values: Mapping[str, Any]) -> NamedArray:
    """Build a NamedArray from a (nested) dict without mutating it.

    Nested non-empty dicts become nested NamedArrays; ``None`` and empty
    dicts become ``None`` fields.
    """
    fields: Dict[str, Any] = {}
    for k, v in values.items():
        if v is None or (isinstance(v, Mapping) and not isinstance(v, NamedArray) and len(v) == 0):
            fields[k] = None
        elif isinstance(v, Mapping) and not isinstance(v, NamedArray):
            fields[k] = from_dict(v)
        else:
            fields[k] = v
    return NamedArray(**fields)


def recursive_aggregate(xs: Sequence[Any], aggregate_fn: Callable[[List[Any]], Any]) -> Any:
    """Merge same-structured NamedArrays field by field.

    ``aggregate_fn`` receives the list of leaves of one field (e.g.
    ``torch.cat``, ``np.stack``). If a field is None in some entries but not
    in others, the Nones are replaced by zeros shaped like a present entry,
    so optional fields can still be batched. The result has no metadata.
    Errors name the (dotted) field that failed.
    """

    def _agg(entries: List[Any], path: str) -> Any:
        where = path or "<root>"
        if len(entries) == 0:
            raise ValueError(f"recursive_aggregate needs at least one entry (field '{where}').")
        present = [x for x in entries if x is not None]
        if not present:
            return None
        example = present[0]
        if len(present) < len(entries):
            entries = [(_zeros_like(example) if x is None else x) for x in entries]
        if isinstance(example, NamedArray):
            for i, x in enumerate(entries):
                if not isinstance(x, NamedArray):
                    raise TypeError(
                        f"Field '{where}': entry {i} is a {type(x).__name__}, expected NamedArray."
                    )
                if set(x.keys()) != set(example.keys()):
                    raise ValueError(
                        f"Field '{where}': entry {i} has fields {list(x.keys())}, "
                        f"expected {list(example.keys())}."
                    )
            return example.__class__(
                **{k: _agg([x[k] for x in entries], _join(path, k)) for k in example.keys()}
            )
        try:
            return aggregate_fn(list(entries))
        except Exception as e:
            _reraise_naming_field(e, f"Aggregating field '{where}' failed")

    return _agg(list(xs), "")


def recursive_apply(x: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every non-None leaf, keeping structure and metadata."""

    def _apply(node: Any, path: str) -> Any:
        if node is None:
            return None
        if isinstance(node, NamedArray):
            out = node.__class__(**{k: _apply(v, _join(path, k)) for k, v in node.items()})
            out._metadata.update(node._metadata)
            return out
        try:
            return fn(node)
        except Exception as e:
            _reraise_naming_field(e, f"Applying function to field '{path or '<root>'}' failed")

    return _apply(x, "")


def flatten(x: NamedArray) -> List[Tuple[str, Any]]:
    """List ``(dotted_key, leaf)`` pairs depth-first; None leaves included."""
    out: List[Tuple[str, Any]] = []

    def _walk(node: NamedArray, prefix: str) -> None:
        for k, v in node.items():
            if "." in k:
                raise ValueError(f"Field name '{k}' contains '.', which flatten uses as separator.")
            key = _join(prefix, k)
            if isinstance(v, NamedArray):
                _walk(v, key)
            else:
                out.append((key, v))

    _walk(x, "")
    return out


def from_flattened(flattened: Sequence[Tuple[str, Any]]) -> NamedArray:
    """Inverse of :func:`flatten` (metadata is not restored)."""
    tree: Dict[str, Any] = {}
    for key, v in flattened:
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"Key '{key}' nests under leaf '{p}'.")
            node = child
        if parts[-1] in node:
            raise ValueError(f"Duplicate flattened key '{key}'.")
        node[parts[-1]] = v

    def _build(d: Dict[str, Any]) -> NamedArray:
        return NamedArray(**{k: (_build(v) if isinstance(v, dict) else v) for k, v in d.items()})

    return _build(tree)


def split(x: NamedArray, n: int) -> List[NamedArray]:
    """Split along dim 0 into ``n`` near-equal contiguous parts.

    Like ``numpy.array_split``: the first ``len % n`` parts get one extra row.
    """
    if n < 1:
        raise ValueError(f"Number of parts must be >= 1, got {n}.")
    total = x.length(0)
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        out.append(x[start:end])
        start = end
    return out
