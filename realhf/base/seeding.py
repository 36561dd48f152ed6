"""Reproducible seeding of every random generator a worker touches.

Each worker seeds with the experiment's base seed plus a key (its worker
name, model name, ...). Deriving the effective seed from both gives every
worker its own stream while keeping a rerun bit-for-bit identical.
:func:`get_rng_state` / :func:`set_rng_state` capture and restore all
generators so that a recovered run continues the same streams.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

# numpy's legacy global generator only accepts seeds below 2**32.
_SEED_MODULUS = 2**32

_base_seed: Optional[int] = None
_key: str = ""
_seed: Optional[int] = None


def derive_seed(seed: int, key: str = "") -> int:
    """Map ``(seed, key)`` to a seed in ``[0, 2**32)``.

    An empty key keeps the seed itself, so ``set_random_seed(s)`` matches the
    usual ``torch.manual_seed(s)`` convention. Other keys go through SHA-256,
    which is stable across processes and Python versions (unlike ``hash``).
    """
    seed = int(seed)
    if not key:
        return seed % _SEED_MODULUS
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_MODULUS


def set_random_seed(seed: int, key: str = "") -> int:
    """Seed python, numpy, torch and CUDA (when present). Returns the seed used."""
    global _base_seed, _key, _seed
    derived = derive_seed(seed, key)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(derived)
    _base_seed, _key, _seed = int(seed), key, derived
    return derived


def get_seed() -> Optional[int]:
    """The effective (derived) seed of this process, or None before seeding."""
    return _seed


def get_base_seed() -> Optional[int]:
    """The seed passed to :func:`set_random_seed`, before key derivation."""
    return _base_seed


def get_seed_key() -> str:
    return _key


def get_rng_state() -> Dict[str, Any]:
    """Snapshot every generator; the result is picklable."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "seed": _seed,
        "base_seed": _base_seed,
        "key": _key,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a snapshot from :func:`get_rng_state`.

    CUDA states are restored only when CUDA is present here, so a snapshot
    taken on a GPU node can still be loaded on a CPU-only process.
    """
    global _base_seed, _key, _seed
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    _seed = state.get("seed")
    _base_seed = state.get("base_seed")
    _key = state.get("key", "")
