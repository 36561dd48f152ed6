import random

import pytest
import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec
from realhf.base import datapack
from realhf.impl.model.parallelism.micro_batch import concat_outputs_in_order, split_packed_batch


def _sample(lens, with_meta=True):
    n = sum(lens)
    data = {
        "packed_input_ids": torch.arange(n),
        "packed_logprobs": torch.randn(n - len(lens)),
        "rewards": torch.arange(len(lens), dtype=torch.float32),
    }
    meta = {"tag": [f"t{i}" for i in range(len(lens))]} if with_meta else None
    return SequenceSample.from_default(lens, [f"id{i}" for i in range(len(lens))], data, meta)


def _paired(seed):
    # Items holding several sequences per key (e.g. paired comparisons).
    rng = random.Random(seed)
    bs = rng.randint(1, 12)
    seqlens = [[rng.randint(1, 20) for _ in range(rng.choice([1, 2, 4]))] for _ in range(bs)]
    total = sum(sum(x) for x in seqlens)
    return SequenceSample(
        keys={"packed_input_ids", "rewards"},
        trailing_shapes={"packed_input_ids": (), "rewards": ()},
        dtypes={"packed_input_ids": torch.int64, "rewards": torch.float32},
        ids=list(range(100, 100 + bs)),
        seqlens={"packed_input_ids": seqlens, "rewards": [[1] * len(x) for x in seqlens]},
        data={"packed_input_ids": torch.arange(total),
              "rewards": torch.randn(sum(len(x) for x in seqlens))},
    )


def _check_items_preserved(sample, split):
    items = {it.ids[0]: it for it in sample.unpack()}
    got = [i for mb in split.micro_batches for i in mb.ids]
    assert sorted(got, key=str) == sorted(sample.ids, key=str)
    assert len(set(got)) == len(got)
    assert got == [sample.ids[i] for i in split.forward_indices]
    for mb in split.micro_batches:
        for it in mb.unpack():
            ref = items[it.ids[0]]
            assert it.seqlens == ref.seqlens
            for k in sample.keys:
                assert torch.equal(it.data[k], ref.data[k])
            assert it.metadata == ref.metadata


def _check_round_trip(sample, split, key="packed_input_ids"):
    bwd = split.backward_indices
    assert sorted(bwd) == list(range(sample.bs))
    assert [split.forward_indices[j] for j in bwd] == list(range(sample.bs))
    packed = concat_outputs_in_order([mb.data[key] for mb in split.micro_batches], bwd,
                                     sample.item_lengths(key))
    assert torch.equal(packed, sample.data[key])
    per_item = concat_outputs_in_order(
        [torch.tensor([sample.ids.index(i) for i in mb.ids]) for mb in split.micro_batches], bwd)
    assert per_item.tolist() == list(range(sample.bs))
    back = concat_outputs_in_order(split.micro_batches, bwd)
    assert back.ids == sample.ids
    for k in sample.keys:
        assert torch.equal(back.data[k], sample.data[k])


@pytest.mark.parametrize("seed", range(40))
def test_token_budget_random(seed):
    rng = random.Random(seed)
    bs = rng.randint(1, 40)
    lens = [rng.randint(2, 64) for _ in range(bs)]
    sample = _sample(lens)
    for budget in sorted({max(lens), max(lens) + 1, 2 * max(lens), rng.randint(max(lens), 400), sum(lens), 10**6}):
        n_mbs = rng.randint(1, 6)
        split = split_packed_batch(sample, MicroBatchSpec(n_mbs=n_mbs, max_tokens_per_mb=budget))
        loads = [mb.total_tokens("packed_input_ids") for mb in split.micro_batches]
        assert max(loads) <= budget
        assert len(split.micro_batches) >= min(n_mbs, bs)
        # Never more micro-batches than first-fit decreasing needs.
        ffd = datapack.ffd_allocate(lens, budget, min_groups=min(n_mbs, bs))
        assert len(split.micro_batches) == len(ffd)
        assert max(loads) <= max(sum(lens[i] for i in g) for g in ffd)
        _check_items_preserved(sample, split)
        _check_round_trip(sample, split)


@pytest.mark.parametrize("seed", range(15))
def test_multi_sequence_items(seed):
    sample = _paired(seed)
    lens = sample.item_lengths("packed_input_ids")
    for budget in (max(lens), max(lens) * 2, sum(lens)):
        split = split_packed_batch(sample, MicroBatchSpec(n_mbs=2, max_tokens_per_mb=budget))
        assert max(mb.total_tokens("packed_input_ids") for mb in split.micro_batches) <= budget
        _check_items_preserved(sample, split)
        _check_round_trip(sample, split)
    split = split_packed_batch(sample, MicroBatchSpec(n_mbs=3))
    _check_items_preserved(sample, split)
    _check_round_trip(sample, split)


@pytest.mark.parametrize("seed", range(20))
def test_n_mbs_split_exact_and_balanced(seed):
    rng = random.Random(seed)
    bs = rng.randint(1, 30)
    lens = [rng.randint(2, 100) for _ in range(bs)]
    sample = _sample(lens)
    for n_mbs in range(1, bs + 1, max(1, bs // 6)):
        split = split_packed_batch(sample, MicroBatchSpec(n_mbs=n_mbs))
        assert len(split.micro_batches) == n_mbs
        assert all(mb.bs >= 1 for mb in split.micro_batches)
        assert split.forward_indices == list(range(bs)) == split.backward_indices
        loads = [mb.total_tokens("packed_input_ids") for mb in split.micro_batches]
        best = max(datapack.partition_sums(lens, datapack.partition_balanced(lens, n_mbs)))
        assert max(loads) == best
        _check_items_preserved(sample, split)
        _check_round_trip(sample, split)


def test_more_mbs_than_items_is_clamped():
    sample = _sample([3, 4])
    assert len(split_packed_batch(sample, MicroBatchSpec(n_mbs=5)).micro_batches) == 2
    assert len(split_packed_batch(sample, MicroBatchSpec(n_mbs=5, max_tokens_per_mb=100)).micro_batches) == 2


def test_budget_is_balanced_not_first_fit():
    lens = [10] * 6
    split = split_packed_batch(_sample(lens), MicroBatchSpec(max_tokens_per_mb=40))
    assert sorted(mb.total_tokens("packed_input_ids") for mb in split.micro_batches) == [30, 30]


def test_too_long_item_error_names_it():
    sample = _sample([5, 50, 7])
    with pytest.raises(ValueError, match=r"Item 1 \(id 'id1'\) has 50 tokens.*max_tokens_per_mb=20"):
        split_packed_batch(sample, MicroBatchSpec(n_mbs=1, max_tokens_per_mb=20))


def test_explicit_key_and_metadata_only():
    sample = _sample([5, 9, 3, 8])
    split = split_packed_batch(sample.meta(), MicroBatchSpec(max_tokens_per_mb=8), key="packed_logprobs")
    assert all(mb.data is None for mb in split.micro_batches)
    assert max(mb.total_tokens("packed_logprobs") for mb in split.micro_batches) <= 8


def test_concat_errors():
    with pytest.raises(ValueError):
        concat_outputs_in_order([], [])
    with pytest.raises(ValueError):
        concat_outputs_in_order([torch.zeros(3)], [0, 1])
    with pytest.raises(ValueError):
        concat_outputs_in_order([torch.zeros(3)], [1, 0], item_lengths=[1, 1])
