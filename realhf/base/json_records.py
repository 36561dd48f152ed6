"""Reading and validating JSON / JSONL record files, and sharding them by rank.

A bad record deep inside a large file should fail at load time with a message
that says exactly where to look, not as a ``KeyError`` in a worker process
minutes into a run. Every error raised here is a :class:`DatasetFormatError`
whose message names the file, the line (JSONL) or record index (JSON), and
the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import types
import typing
from typing import Any, Callable, Hashable, Sequence

# A field spec: a type, a tuple of types, or ``list[T]`` for a list whose
# elements must all be ``T``.
FieldType = type | tuple | types.GenericAlias
RecordCheck = Callable[[dict], None]


class DatasetFormatError(ValueError):
    """A dataset file (or builder output) does not match the expected format."""


class FieldError(Exception):
    """Raised by per-record checks; the loader adds the file and line."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where a record came from, for error messages."""

    source: str
    line: int | None = None
    index: int = 0

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}: line {self.line}"
        return f"{self.source}: record {self.index}"


def _type_name(t: FieldType) -> str:
    if isinstance(t, types.GenericAlias):
        return str(t)
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return t.__name__


def _json_type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "str",
        bool: "bool",
        int: "int",
        float: "float",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_field(value: Any, spec: FieldType, field: str) -> None:
    """Raise FieldError when ``value`` does not match ``spec``."""
    if isinstance(spec, types.GenericAlias):
        origin, args = typing.get_origin(spec), typing.get_args(spec)
        if origin is not list or len(args) != 1:
            raise TypeError(f"unsupported field spec {spec!r}; use list[T]")
        if not isinstance(value, list):
            raise FieldError(field, f"expected {_type_name(spec)}, got {_json_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, args[0]):
                raise FieldError(
                    field,
                    f"element {i}: expected {_type_name(args[0])}, got {_json_type_name(item)}",
                )
        return
    # JSON booleans are Python ints; never accept one where a number is expected.
    if isinstance(value, bool) and not _allows_bool(spec):
        raise FieldError(field, f"expected {_type_name(spec)}, got bool")
    if not isinstance(value, spec):
        raise FieldError(field, f"expected {_type_name(spec)}, got {_json_type_name(value)}")


def _allows_bool(spec: FieldType) -> bool:
    specs = spec if isinstance(spec, tuple) else (spec,)
    return bool in specs or object in specs


def validate_records(
    records: Sequence[Any],
    required: dict[str, FieldType],
    locations: Sequence[_Location],
    check: RecordCheck | None = None,
) -> list[dict]:
    """Check every record and give each a unique ``id``.

    A record without ``id`` gets its index in the file (0-based, counting
    records rather than lines). Returns shallow copies; inputs are not mutated.
    """
    out: list[dict] = []
    first_seen: dict[Hashable, _Location] = {}
    for i, (rec, loc) in enumerate(zip(records, locations)):
        if not isinstance(rec, dict):
            raise DatasetFormatError(
                f"{loc}: expected a JSON object with fields {sorted(required)}, "
                f"got {_json_type_name(rec)}"
            )
        for field, spec in required.items():
            if field not in rec:
                raise DatasetFormatError(f"{loc}: field '{field}' is missing")
            try:
                _check_field(rec[field], spec, field)
            except FieldError as e:
                raise DatasetFormatError(f"{loc}: field '{e.field}': {e.message}") from None
        if check is not None:
            try:
                check(rec)
            except FieldError as e:
                raise DatasetFormatError(f"{loc}: field '{e.field}': {e.message}") from None
        rec = dict(rec)
        rec.setdefault("id", i)
        rid = rec["id"]
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise DatasetFormatError(
                f"{loc}: field 'id': expected str or int, got {_json_type_name(rid)}"
            )
        if rid in first_seen:
            raise DatasetFormatError(
                f"{loc}: field 'id': duplicate id {rid!r} (first used at {first_seen[rid]})"
            )
        first_seen[rid] = loc
        out.append(rec)
    return out


def _decode_lines(path: str, raw: bytes) -> list[str]:
    """Split into lines, reporting the first non-UTF-8 byte precisely."""
    lines = raw.split(b"\n")
    offset = 0
    text_lines: list[str] = []
    for n, line in enumerate(lines, start=1):
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line, offset = line[3:], offset + 3
        try:
            text_lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DatasetFormatError(
                f"{path}: line {n}: not valid UTF-8: byte 0x{line[e.start]:02x} at column "
                f"{e.start + 1} of the line (file byte offset {offset + e.start})"
            ) from None
        offset += len(line) + 1
    return text_lines


def _read_jsonl(path: str, raw: bytes) -> tuple[list[Any], list[_Location]]:
    records, locs = [], []
    for n, line in enumerate(_decode_lines(path, raw), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetFormatError(
                f"{path}: line {n}: invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        locs.append(_Location(path, line=n, index=len(locs)))
    return records, locs


def _read_json(path: str, raw: bytes) -> tuple[list[Any], list[_Location]]:
    text = "\n".join(_decode_lines(path, raw))
    if not text.strip():
        return [], []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(
            f"{path}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
        ) from None
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{path}: expected a JSON list of objects at top level, got {_json_type_name(data)}"
        )
    return data, [_Location(path, index=i) for i in range(len(data))]


def load_json_records(
    path: str,
    required: dict[str, FieldType],
    check: RecordCheck | None = None,
) -> list[dict]:
    """Load a ``.json`` (list of objects) or ``.jsonl`` (object per line) file.

    ``required`` maps field names to expected types; ``check`` may inspect a
    whole record and raise :class:`FieldError` for cross-field rules. Blank
    lines in JSONL are skipped; an empty file or one with no records is an
    error, since training on nothing is never intended.
    """
    if not os.path.exists(path):
        raise DatasetFormatError(f"{path}: dataset file does not exist")
    if os.path.isdir(path):
        raise DatasetFormatError(f"{path}: is a directory, expected a .json or .jsonl file")
    with open(path, "rb") as f:
        raw = f.read()
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        records, locs = _read_jsonl(path, raw)
    elif ext == ".json":
        records, locs = _read_json(path, raw)
    else:
        raise DatasetFormatError(f"{path}: unsupported extension {ext!r}, expected .json or .jsonl")
    if not records:
        raise DatasetFormatError(f"{path}: file is empty or contains no records")
    return validate_records(records, required, locs, check)


def load_records(
    dataset_path: str | None,
    dataset_builder: Callable[[], Sequence[dict]] | None,
    required: dict[str, FieldType],
    check: RecordCheck | None = None,
) -> tuple[list[dict], str]:
    """Records from exactly one of a file or a builder, plus a source name."""
    if (dataset_path is None) == (dataset_builder is None):
        raise ValueError("pass exactly one of dataset_path and dataset_builder")
    if dataset_path is not None:
        return load_json_records(dataset_path, required, check), dataset_path
    source = f"<dataset_builder {getattr(dataset_builder, '__name__', repr(dataset_builder))}>"
    records = list(dataset_builder())
    if not records:
        raise DatasetFormatError(f"{source}: returned no records")
    locs = [_Location(source, index=i) for i in range(len(records))]
    return validate_records(records, required, locs, check), source


def shuffle_and_shard(records: Sequence[Any], seed: int, dp_rank: int, world_size: int) -> list[Any]:
    """This rank's share of a seeded shuffle of ``records``.

    Every rank gets ``len(records) // world_size`` records so that all data
    parallel ranks run the same number of steps; the remainder (fewer than
    ``world_size`` records) is dropped. The shuffle depends only on ``seed``,
    so the shards of different ranks are disjoint.
    """
    if world_size < 1 or not 0 <= dp_rank < world_size:
        raise ValueError(f"invalid dp_rank={dp_rank} for world_size={world_size}")
    per_rank = len(records) // world_size
    if per_rank == 0:
        raise ValueError(
            f"{len(records)} records cannot be split over {world_size} data parallel ranks: "
            "rank shards would be empty"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    mine = order[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [records[i] for i in mine]


def load_rank_shard(dataset_path: str | None, dataset_builder: Callable[[], Sequence[dict]] | None,
                    required: dict[str, FieldType], seed: int, dp_rank: int, world_size: int,
                    check: RecordCheck | None = None) -> tuple[list[dict], str]:
    """Validated records of one data-parallel rank, and the name of their source."""
    records, source = load_records(dataset_path, dataset_builder, required, check)
    return shuffle_and_shard(records, seed, dp_rank, world_size), source


__all__ = [
    "DatasetFormatError",
    "FieldError",
    "load_json_records",
    "load_rank_shard",
    "load_records",
    "shuffle_and_shard",
    "validate_records",
]
