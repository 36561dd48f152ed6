"""Dataset configs of quickstart experiments (``realhf-reference.md`` section 2).

The JSONL formats are those of the registered datasets ``prompt_answer``
(SFT), ``rw_pair`` (reward modeling, DPO) and ``prompt`` (PPO, generation);
small examples ship with the package (``realhf.assets.dataset_path``).
"""

import dataclasses
import os

from realhf.api.quickstart.base import ConfigError, check_positive_int, join_key


def _check_file(key: str, path: str, *, required: bool) -> None:
    if not path:
        if required:
            from realhf.assets import list_datasets

            raise ConfigError(
                f"{key} is empty; set it to a JSONL file (bundled examples under realhf/assets/data: "
                f"{list_datasets()})."
            )
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} is not an existing file.")


MIN_SEQLEN = 2  # one prompt token plus one answer token


def _check_seqlen(key: str, value: int) -> None:
    check_positive_int(key, value)
    if value < MIN_SEQLEN:
        raise ConfigError(
            f"{key}={value} leaves no room for a prompt plus one answer token; it must be at least "
            f"{MIN_SEQLEN} (and longer than the prompts of the data, which are dropped otherwise)."
        )


@dataclasses.dataclass
class PromptAnswerDatasetConfig:
    """SFT data: JSONL rows with ``prompt`` and ``answer``.

    :param train_path: training file (required).
    :param valid_path: evaluation file ("" = no evaluation).
    :param max_seqlen: maximum tokens of prompt + answer (longer rows are truncated).
    :param train_bs_n_seqs: training batch size in sequences.
    :param valid_bs_n_seqs: evaluation batch size in sequences.
    :param pad_to_max_length: pad every sequence to max_seqlen.
    """

    train_path: str = ""
    valid_path: str = ""
    max_seqlen: int = 1024
    train_bs_n_seqs: int = 256
    valid_bs_n_seqs: int = 256
    pad_to_max_length: bool = False

    def validate(self, prefix: str = "dataset", *, check_paths: bool = True) -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        for name in ("train_bs_n_seqs", "valid_bs_n_seqs"):
            check_positive_int(k(name), getattr(self, name))
        _check_seqlen(k("max_seqlen"), self.max_seqlen)
        if check_paths:
            _check_file(k("train_path"), self.train_path, required=True)
            _check_file(k("valid_path"), self.valid_path, required=False)


@dataclasses.dataclass
class PairedComparisonDatasetConfig:
    """Reward-modeling / DPO data: JSONL rows with ``prompt``, ``pos_answers``, ``neg_answers``.

    :param max_pairs_per_prompt: at most this many (pos, neg) pairs per prompt.
    :param train_bs_n_seqs: training batch size in prompts.
    """

    train_path: str = ""
    valid_path: str = ""
    max_pairs_per_prompt: int = 2
    max_seqlen: int = 1024
    train_bs_n_seqs: int = 256
    valid_bs_n_seqs: int = 256

    def validate(self, prefix: str = "dataset", *, check_paths: bool = True) -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        for name in ("max_pairs_per_prompt", "train_bs_n_seqs", "valid_bs_n_seqs"):
            check_positive_int(k(name), getattr(self, name))
        _check_seqlen(k("max_seqlen"), self.max_seqlen)
        if check_paths:
            _check_file(k("train_path"), self.train_path, required=True)
            _check_file(k("valid_path"), self.valid_path, required=False)


@dataclasses.dataclass
class PromptOnlyDatasetConfig:
    """PPO / generation prompts: JSONL rows with ``prompt``.

    :param path: the prompt file (required).
    :param max_prompt_len: prompts are truncated to this many tokens.
    :param train_bs_n_seqs: prompts per step.
    :param pad_to_max_length: pad every prompt to max_prompt_len.
    """

    path: str = ""
    max_prompt_len: int = 256
    train_bs_n_seqs: int = 256
    pad_to_max_length: bool = False

    def validate(self, prefix: str = "dataset", *, check_paths: bool = True) -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        for name in ("max_prompt_len", "train_bs_n_seqs"):
            check_positive_int(k(name), getattr(self, name))
        if check_paths:
            _check_file(k("path"), self.path, required=True)


__all__ = ["PairedComparisonDatasetConfig", "PromptAnswerDatasetConfig", "PromptOnlyDatasetConfig"]
