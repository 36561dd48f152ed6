"""A user-defined dataset, registered by name and loaded by the packed loader.

The dataset follows the documented pattern: ``__getitem__`` returns one
sample as a ``NamedArray`` with its sequence length in the metadata. The
packed data loader turns such items into ``SequenceSample`` batches: all
sequences concatenated along one dimension, no padding.

Run it:

    python examples/custom_dataset.py
"""

import torch

from realhf import assets
from realhf.api.core import data_api
from realhf.api.core.config import DatasetAbstraction
from realhf.base.namedarray import NamedArray


class ReversedWordsDataset(torch.utils.data.Dataset):
    """Prompts are a few words of Austen; answers are the same words reversed."""

    def __init__(self, util: data_api.DatasetUtility, dataset_path: str, max_length: int = 64,
                 n_words: int = 4):
        self.util = util
        records = data_api.load_shuffle_split_dataset(util, dataset_path)
        self.items = []
        for r in records:
            words = r["prompt"].split()[:n_words]
            prompt = " ".join(words) + " =>"
            answer = " " + " ".join(reversed(words))
            p = util.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = util.tokenizer(answer, add_special_tokens=False)["input_ids"] + [util.tokenizer.eos_token_id]
            ids = (p + a)[:max_length]
            self.items.append((ids, min(len(p), len(ids))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        ids, n_prompt = self.items[idx]
        x = NamedArray(
            packed_input_ids=torch.tensor(ids, dtype=torch.long),
            prompt_mask=torch.arange(len(ids)) < n_prompt,
        )
        # The sequence length, and an id unique across data-parallel ranks.
        x.register_metadata(seqlens=[len(ids)], id=f"rank{self.util.dp_rank}-{idx}")
        return x


data_api.register_dataset("reversed_words", ReversedWordsDataset)


def main():
    tokenizer = data_api.load_hf_tokenizer(assets.tokenizer_path())
    cfg = DatasetAbstraction("reversed_words", args=dict(dataset_path=assets.dataset_path("sft-train")))
    dataset = data_api.make_dataset(cfg, seed=1, dp_rank=0, world_size=2, tokenizer_or_tokenizer_name=tokenizer)
    loader = data_api.PackedDataLoader(dataset, batch_size=8, seed=1)
    batch = next(iter(loader))
    lens = [s[0] for s in batch.seqlens["packed_input_ids"]]
    print(f"{len(dataset)} items on this rank; a batch of {batch.bs} sequences, lengths {lens}, "
          f"packed into {batch.data['packed_input_ids'].numel()} tokens")
    first = batch.data["packed_input_ids"][: lens[0]]
    print("first item:", repr(tokenizer.decode(first)))
    return batch


if __name__ == "__main__":
    main()
