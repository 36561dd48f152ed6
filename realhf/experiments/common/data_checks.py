"""Dataset checks run in the launching process, before any worker starts.

The model workers read the training set whole (every data head, in batches
of ``train_bs_n_seqs``) and shard an evaluation set over the data-parallel
ranks of the model that evaluates it. Each batch is split over the
data-parallel ranks of every call that consumes it, so every batch must hold
at least one sequence per rank (a trailing batch with fewer is skipped, and
said so here).
The errors name the config key, the file, its sample count and the sizes.
"""

from __future__ import annotations

from typing import Optional

from realhf.api.core import system_api as sa
from realhf.api.core.system_api import ExperimentConfigError


def _build(ds: sa.Dataset, seed: int, rank: int, world: int, tok, key: str, length_key: Optional[str]):
    from realhf.api.core.data_api import make_dataset
    from realhf.impl.dataset.common import PromptsTooLong
    from realhf.base.json_records import DatasetFormatError

    path = ds.args.get("dataset_path")
    try:
        return make_dataset(ds, seed, rank, world, tok)
    except PromptsTooLong as e:
        if length_key is None:
            raise
        need = f"; it must be at least {e.min_length}" if e.min_length is not None else ""
        raise ExperimentConfigError(
            f"{length_key}={e.max_length} is shorter than every prompt of {key}={path!r}, which leaves no "
            f"room for an answer token{need} (the prompt plus one answer token)."
        ) from None
    except DatasetFormatError as e:
        raise DatasetFormatError(f"{key}: {e}") from None


def _n_records(ds: sa.Dataset) -> int:
    from realhf.base.json_records import load_records

    return len(load_records(ds.args.get("dataset_path"), None, {})[0])


def check_datasets(train: sa.Dataset, tokenizer_path: str, seed: int, *, train_key: str, batch_size: int,
                   batch_key: str, dp: int, dp_mfc: str, valid: Optional[sa.Dataset] = None,
                   valid_key: Optional[str] = None, eval_dp: int = 1, length_key: Optional[str] = None) -> None:
    """Build the datasets once as the workers will and refuse sizes the runtime cannot split.

    :param dp: the largest data-parallel size among the calls that consume
        the training batches (``dp_mfc`` names that call).
    :param eval_dp: data-parallel size of the model evaluating ``valid``.
    """
    from realhf.api.core.data_api import load_hf_tokenizer
    import realhf.impl.dataset  # noqa: F401  (registers the datasets)

    tok = load_hf_tokenizer(tokenizer_path)
    path = train.args.get("dataset_path")
    n = len(_build(train, seed, 0, 1, tok, train_key, length_key))
    if n < dp:
        raise ExperimentConfigError(
            f"{train_key}={path!r} has {n} usable sample(s), fewer than the data-parallel size {dp} of MFC "
            f"{dp_mfc!r}; each data-parallel rank needs at least one sample per batch: use a larger file or "
            f"a layout with data_parallel_size <= {n}."
        )
    last = n % batch_size
    if 0 < last < dp:
        from realhf.base import logging

        logging.getLogger("data_checks").warning(
            f"{train_key}={path!r} has {n} usable samples, so with {batch_key}={batch_size} the last batch of "
            f"each epoch would hold {last}, fewer than the data-parallel size {dp} of MFC {dp_mfc!r}; those "
            f"{last} samples are skipped each epoch (a different {batch_key} keeps them).")
    if valid is None:
        return
    vpath = valid.args.get("dataset_path")
    n_valid = _n_records(valid)
    if n_valid < eval_dp:
        raise ExperimentConfigError(
            f"{valid_key}={vpath!r} has {n_valid} sample(s), fewer than the data-parallel size {eval_dp} of the "
            f"model evaluating it; each data-parallel rank needs at least one: use a larger file or "
            f"data_parallel_size <= {n_valid}."
        )
    for rank in range(eval_dp):
        _build(valid, seed, rank, eval_dp, tok, valid_key or "valid_path", length_key)


def max_dp(allocations) -> tuple:
    """(largest data-parallel size, the MFC that has it) over ``{name: MFCConfig}``."""
    name, alloc = max(allocations.items(), key=lambda kv: kv[1].parallel.data_parallel_size)
    return alloc.parallel.data_parallel_size, name


__all__ = ["check_datasets", "max_dp"]
