"""Tokenization and reporting shared by the built-in datasets."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from realhf.base.json_records import DatasetFormatError


class PromptsTooLong(DatasetFormatError):
    """Every prompt fills ``max_length``; ``min_length`` (if known) is the smallest that keeps one."""

    def __init__(self, message: str, max_length: int, min_length: int | None) -> None:
        super().__init__(message)
        self.max_length = max_length
        self.min_length = min_length


def report_dropped(logger: logging.Logger, source: str, n_dropped: int, n_records: int, n_kept: int,
                   max_length: int, dp_rank: int, shortest_prompt: int | None = None) -> None:
    """Log records dropped because the prompt fills max_length; fail if none is left.

    ``shortest_prompt`` (tokens of the shortest prompt) lets the error say the
    smallest max_length that keeps a record.
    """
    if n_dropped:
        logger.info(f"{source}: dropped {n_dropped} of {n_records} records whose prompt "
                    f"fills max_length={max_length} tokens.")
    if n_kept == 0:
        hint = ""
        if shortest_prompt is not None:
            hint = (f"; the shortest prompt has {shortest_prompt} tokens, so max_length must be at least "
                    f"{shortest_prompt + 1} (the prompt plus one answer token)")
        raise PromptsTooLong(
            f"{source}: no usable records on dp rank {dp_rank}: every prompt is at "
            f"least max_length={max_length} tokens long{hint}.",
            max_length, None if shortest_prompt is None else shortest_prompt + 1,
        )


def encode_texts(tokenizer: Any, texts: Sequence[str], append_eos: bool) -> list[list[int]]:
    """Token ids of each text, without padding or truncation.

    Special tokens are added the way the tokenizer normally adds them, so a
    prompt encoded alone gets the same prefix as the prompt inside a longer
    text. ``append_eos`` appends the EOS id (an id, not the text, so it cannot
    be split or merged with neighbouring characters).
    """
    if not texts:
        return []
    ids = tokenizer(list(texts), padding=False, truncation=False)["input_ids"]
    if not append_eos:
        return [list(x) for x in ids]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which these datasets append to answers")
    return [list(x) + [eos] for x in ids]
