"""Prompts for generation, PPO and other RL rollouts.

Each record is ``{"id"?, "prompt": str, ...}``. Any other field (for example
``answer`` holding the reference result for a rule-based reward) travels with
the item in ``SequenceSample.metadata``, so reward code can score a
generation without a second lookup.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from realhf.api.core import data_api
from realhf.base.json_records import DatasetFormatError, load_rank_shard
from realhf.impl.dataset.common import encode_texts

REQUIRED_FIELDS = {"prompt": str}


class PromptDataset(torch.utils.data.Dataset):
    """Tokenized prompts under the key ``packed_prompts``.

    A prompt longer than ``max_length`` keeps its last ``max_length`` tokens:
    generation continues from the end of a prompt, which is where the
    question usually is. With ``pad_to_max_length`` prompts are left-padded
    with the pad token to exactly ``max_length``, so the text still ends
    where generation starts.

    Metadata fields are the union of extra fields over all records; a record
    lacking one of them holds None there, so samples can always be gathered.
    """

    def __init__(
        self,
        util: data_api.DatasetUtility,
        max_length: int,
        dataset_path: str | None = None,
        dataset_builder: Callable[[], Sequence[dict]] | None = None,
        pad_to_max_length: bool = False,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        records, source = load_rank_shard(dataset_path, dataset_builder, REQUIRED_FIELDS,
                                          util.seed, util.dp_rank, util.world_size)
        tok = util.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        extra: list[str] = []
        for r in records:
            extra += [k for k in r if k not in ("id", "prompt") and k not in extra]
        self.metadata_fields: list[str] = extra

        self.ids: list = []
        self.prompts: list[torch.Tensor] = []
        self.metadata: list[dict[str, Any]] = []
        n_truncated = 0
        for r, ids in zip(records, encode_texts(tok, [r["prompt"] for r in records], append_eos=False)):
            if not ids:  # generation continues a prompt: it needs at least one token to start from
                raise DatasetFormatError(f"{source}: record {r['id']!r}: the prompt {r['prompt']!r} encodes to no "
                                         "tokens; generation needs at least one.")
            if len(ids) > max_length:
                n_truncated += 1
                ids = ids[-max_length:]
            if pad_to_max_length and len(ids) < max_length:
                ids = [pad_id] * (max_length - len(ids)) + ids
            self.ids.append(r["id"])
            self.prompts.append(torch.tensor(ids, dtype=torch.int64))
            self.metadata.append({k: r.get(k) for k in extra})
        self.n_truncated = n_truncated
        self.max_length = max_length
        self.source = source

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> data_api.SequenceSample:
        prompt = self.prompts[idx]
        return data_api.SequenceSample.from_default(
            seqlens=[int(prompt.shape[0])],
            ids=[self.ids[idx]],
            data={"packed_prompts": prompt},
            metadata={k: [v] for k, v in self.metadata[idx].items()},
        )


data_api.register_dataset("prompt", PromptDataset)
