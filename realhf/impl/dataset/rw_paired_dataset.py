"""Preference pairs for reward modeling and DPO.

Each record is ``{"id"?, "prompt": str, "pos_answers": [str], "neg_answers":
[str]}`` where ``pos_answers[i]`` is preferred over ``neg_answers[i]``. One
item packs up to ``max_pairs_per_prompt`` pairs as consecutive sequences
``pos1, neg1, pos2, neg2, ...``; the paired loss reads them in that order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from realhf.api.core import data_api
from realhf.base import logging
from realhf.base.json_records import FieldError, load_rank_shard
from realhf.impl.dataset.common import encode_texts, report_dropped

logger = logging.getLogger("RewardModelingPairedDataset")

REQUIRED_FIELDS = {"prompt": str, "pos_answers": list[str], "neg_answers": list[str]}


def check_pairs(record: dict) -> None:
    """Answers must pair up one to one, with at least one pair."""
    n_pos, n_neg = len(record["pos_answers"]), len(record["neg_answers"])
    if n_pos == 0:
        raise FieldError("pos_answers", "must hold at least one answer, got an empty list")
    if n_neg == 0:
        raise FieldError("neg_answers", "must hold at least one answer, got an empty list")
    if n_pos != n_neg:
        raise FieldError(
            "neg_answers",
            f"has {n_neg} answers but pos_answers has {n_pos}; they must have the same length",
        )


class RewardModelingPairedDataset(torch.utils.data.Dataset):
    """Items of up to ``max_pairs_per_prompt`` (chosen, rejected) pairs.

    Which pairs an item holds is drawn without replacement by an RNG seeded
    with ``(seed, index)``, so an index always yields the same item while
    different prompts draw independently. Each sequence is
    ``prompt + answer + EOS`` truncated to ``max_length``. ``prompt_lens``
    holds the prompt's token count once per item, for losses (DPO) that skip
    prompt tokens.
    """

    def __init__(
        self,
        util: data_api.DatasetUtility,
        max_length: int,
        dataset_path: str | None = None,
        dataset_builder: Callable[[], Sequence[dict]] | None = None,
        max_pairs_per_prompt: int = 2,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt must be positive, got {max_pairs_per_prompt}")
        records, source = load_rank_shard(dataset_path, dataset_builder, REQUIRED_FIELDS,
                                          util.seed, util.dp_rank, util.world_size, check=check_pairs)
        tok = util.tokenizer

        prompt_ids = encode_texts(tok, [r["prompt"] for r in records], append_eos=False)
        texts: list[str] = []
        for r in records:
            for pos, neg in zip(r["pos_answers"], r["neg_answers"]):
                texts += [r["prompt"] + pos, r["prompt"] + neg]
        encoded = iter(encode_texts(tok, texts, append_eos=True))

        self.ids: list = []
        self.prompt_lens: list[int] = []
        # pairs[i][j] = (chosen ids, rejected ids) of pair j of item i.
        self.pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        n_dropped = 0
        for r, p in zip(records, prompt_ids):
            item = [
                (
                    torch.tensor(next(encoded)[:max_length], dtype=torch.int64),
                    torch.tensor(next(encoded)[:max_length], dtype=torch.int64),
                )
                for _ in r["pos_answers"]
            ]
            if len(p) >= max_length:
                n_dropped += 1
                continue
            self.ids.append(r["id"])
            self.prompt_lens.append(len(p))
            self.pairs.append(item)
        report_dropped(logger, source, n_dropped, len(records), len(self.ids), max_length, util.dp_rank,
                       shortest_prompt=min(map(len, prompt_ids), default=None))
        self.seed = util.seed
        self.max_length = max_length
        self.max_pairs_per_prompt = max_pairs_per_prompt
        self.source = source

    def __len__(self) -> int:
        return len(self.ids)

    def pair_indices(self, idx: int) -> list[int]:
        """The pairs item ``idx`` holds, in packing order."""
        n = len(self.pairs[idx])
        k = min(n, self.max_pairs_per_prompt)
        rng = np.random.default_rng([self.seed, idx])
        return [int(i) for i in rng.choice(n, size=k, replace=False)]

    def __getitem__(self, idx: int) -> data_api.SequenceSample:
        seqs: list[torch.Tensor] = []
        for j in self.pair_indices(idx):
            seqs.extend(self.pairs[idx][j])
        packed = torch.cat(seqs)
        return data_api.SequenceSample(
            keys={"packed_input_ids", "prompt_lens"},
            trailing_shapes={"packed_input_ids": (), "prompt_lens": ()},
            dtypes={"packed_input_ids": torch.int64, "prompt_lens": torch.int32},
            ids=[self.ids[idx]],
            seqlens={
                "packed_input_ids": [[int(s.shape[0]) for s in seqs]],
                "prompt_lens": [[1]],
            },
            data={
                "packed_input_ids": packed,
                "prompt_lens": torch.tensor([self.prompt_lens[idx]], dtype=torch.int32),
            },
            metadata={},
        )


data_api.register_dataset("rw_pair", RewardModelingPairedDataset)
