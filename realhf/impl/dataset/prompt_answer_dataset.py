"""Supervised fine-tuning data: a prompt and the answer to learn.

Each record is ``{"id"?, "prompt": str, "answer": str}``. An item is the
token sequence ``prompt + answer + EOS`` with a ``prompt_mask`` marking the
prompt tokens, so the SFT loss covers only the answer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from realhf.api.core import data_api
from realhf.base import logging
from realhf.base.json_records import load_rank_shard
from realhf.impl.dataset.common import encode_texts, report_dropped

logger = logging.getLogger("PromptAnswerDataset")

REQUIRED_FIELDS = {"prompt": str, "answer": str}


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Packed ``prompt + answer + EOS`` sequences truncated to ``max_length``.

    Records whose prompt alone already fills ``max_length`` would leave no
    answer token to train on; they are dropped and the count is logged.
    With ``pad_to_max_length`` every item is right-padded with the pad token
    to exactly ``max_length``; padded positions are marked in ``prompt_mask``
    so that they are excluded from the loss just like the prompt.
    """

    def __init__(
        self,
        util: data_api.DatasetUtility,
        max_length: int,
        dataset_path: str | None = None,
        dataset_builder: Callable[[], Sequence[dict]] | None = None,
        pad_to_max_length: bool = False,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        records, source = load_rank_shard(dataset_path, dataset_builder, REQUIRED_FIELDS,
                                          util.seed, util.dp_rank, util.world_size)
        tok = util.tokenizer

        prompt_ids = encode_texts(tok, [r["prompt"] for r in records], append_eos=False)
        full_ids = encode_texts(tok, [r["prompt"] + r["answer"] for r in records], append_eos=True)

        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.ids: list = []
        self.tokens: list[torch.Tensor] = []
        self.prompt_masks: list[torch.Tensor] = []
        n_dropped = 0
        for rec, p, full in zip(records, prompt_ids, full_ids):
            if len(p) >= max_length:
                n_dropped += 1
                continue
            full = full[:max_length]
            n_prompt = len(p)
            mask = [True] * n_prompt + [False] * (len(full) - n_prompt)
            if pad_to_max_length and len(full) < max_length:
                n_pad = max_length - len(full)
                full = full + [pad_id] * n_pad
                mask = mask + [True] * n_pad
            self.ids.append(rec["id"])
            self.tokens.append(torch.tensor(full, dtype=torch.int64))
            self.prompt_masks.append(torch.tensor(mask, dtype=torch.bool))
        report_dropped(logger, source, n_dropped, len(records), len(self.ids), max_length, util.dp_rank,
                       shortest_prompt=min(map(len, prompt_ids), default=None))
        self.max_length = max_length
        self.source = source

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> data_api.SequenceSample:
        tokens = self.tokens[idx]
        return data_api.SequenceSample.from_default(
            seqlens=[int(tokens.shape[0])],
            ids=[self.ids[idx]],
            data={"packed_input_ids": tokens, "prompt_mask": self.prompt_masks[idx]},
        )


data_api.register_dataset("prompt_answer", PromptAnswerDataset)
