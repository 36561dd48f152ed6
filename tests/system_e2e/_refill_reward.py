"""Rewards of the refill tests: flat groups for a known set of prompts.

A prompt whose dataset index is a multiple of ``every`` gets a reward that
depends on the answer text (different answers, different rewards); every
other prompt gets 0.5 whatever the answer, so its group is flat and dynamic
sampling drops it.
"""

from __future__ import annotations

import zlib


def varies(prompt_id: str, every: int) -> bool:
    """Whether the prompt ``prompt-train-NNNNN-...`` gets answer-dependent rewards."""
    return int(str(prompt_id).split("-")[2]) % every == 0


def _reward(completion: str, prompt_id: str, every: int) -> float:
    if not varies(prompt_id, every):
        return 0.5
    return zlib.crc32(completion.encode()) / 2.0 ** 32


def reward_half(prompt: str, completion: str, id: str) -> float:  # noqa: A002  (the metadata field's name)
    """Every second prompt (by index) varies."""
    return _reward(completion, id, 2)


def reward_quarter(prompt: str, completion: str, id: str) -> float:  # noqa: A002
    """Every fourth prompt (by index) varies."""
    return _reward(completion, id, 4)
