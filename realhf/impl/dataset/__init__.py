"""Built-in datasets; importing this package registers them by name.

``prompt_answer`` (SFT), ``rw_pair`` (reward modeling, DPO) and ``prompt``
(generation, RL rollouts). Construct them with
``realhf.api.core.data_api.make_dataset``.
"""

from realhf.base.json_records import DatasetFormatError, load_json_records, shuffle_and_shard
from realhf.impl.dataset import prompt_answer_dataset, prompt_dataset, rw_paired_dataset
from realhf.impl.dataset.prompt_answer_dataset import PromptAnswerDataset
from realhf.impl.dataset.prompt_dataset import PromptDataset
from realhf.impl.dataset.rw_paired_dataset import RewardModelingPairedDataset

__all__ = [
    "DatasetFormatError",
    "PromptAnswerDataset",
    "PromptDataset",
    "RewardModelingPairedDataset",
    "load_json_records",
    "prompt_answer_dataset",
    "prompt_dataset",
    "rw_paired_dataset",
    "shuffle_and_shard",
]
