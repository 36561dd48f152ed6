"""Small tokenizer and datasets shipped with the package.

Tests and examples run without network access, so they use these files
instead of anything from a model or data hub.  They are regenerated with
``python build_tools/make_assets.py`` (see ``README.md`` in this folder).
"""

from __future__ import annotations

import os

ASSETS_DIR: str = os.path.dirname(os.path.abspath(__file__))
DATA_DIR: str = os.path.join(ASSETS_DIR, "data")
TOKENIZER_DIR: str = os.path.join(ASSETS_DIR, "tokenizer")


def tokenizer_path() -> str:
    """Folder of the byte-level BPE tokenizer, loadable by ``AutoTokenizer``."""
    return TOKENIZER_DIR


def list_datasets() -> list[str]:
    """Names accepted by :func:`dataset_path`, e.g. ``"sft-train"``."""
    if not os.path.isdir(DATA_DIR):
        return []
    return sorted(f[: -len(".jsonl")] for f in os.listdir(DATA_DIR) if f.endswith(".jsonl"))


def dataset_path(name: str) -> str:
    """Absolute path of a bundled JSONL dataset given its short name."""
    available = list_datasets()
    if name.endswith(".jsonl"):
        name = name[: -len(".jsonl")]
    if name not in available:
        raise ValueError(
            f"unknown bundled dataset {name!r}; available: {', '.join(available) or '(none)'}"
        )
    return os.path.join(DATA_DIR, f"{name}.jsonl")


__all__ = ["ASSETS_DIR", "DATA_DIR", "TOKENIZER_DIR", "tokenizer_path", "list_datasets", "dataset_path"]
