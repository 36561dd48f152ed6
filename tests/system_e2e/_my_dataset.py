"""A user module in the documented form: a new registered dataset ("my-dataset") and
an SFT experiment whose ``datasets`` returns it (imported by the CLI and its workers)."""

import dataclasses
from typing import List

from realhf import SFTConfig
from realhf.api.core import data_api
from realhf.api.core.system_api import Dataset
from realhf.api.quickstart.entrypoint import register_quickstart_exp
from realhf.impl.dataset.prompt_answer_dataset import PromptAnswerDataset


class FirstRecordsDataset(PromptAnswerDataset):
    """The prompt/answer data, cut to its first ``n_records`` items."""

    def __init__(self, util, max_length: int, dataset_path: str, n_records: int):
        super().__init__(util, max_length=max_length, dataset_path=dataset_path)
        del self.ids[n_records:], self.tokens[n_records:], self.prompt_masks[n_records:]


data_api.register_dataset("my-dataset", FirstRecordsDataset)


@dataclasses.dataclass
class FewRecordsSFT(SFTConfig):
    n_records: int = 6

    @property
    def datasets(self) -> List[Dataset]:
        return [Dataset("my-dataset", args=dict(max_length=self.dataset.max_seqlen,
                                                dataset_path=self.dataset.train_path, n_records=self.n_records))]


register_quickstart_exp("my-sft-data", FewRecordsSFT)
