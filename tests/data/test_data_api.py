import json
from typing import List

import pytest
import torch

from realhf.api.core import data_api
from realhf.api.core.config import DataLoaderAbstraction, DatasetAbstraction
from realhf.api.core.data_api import (DataBatchMeta, DatasetUtility, PackedDataLoader, SequenceSample,
                                      load_hf_tokenizer, load_shuffle_split_dataset, make_dataloader,
                                      make_dataset, register_dataset)
from realhf.base.namedarray import NamedArray


# --------------------------------------------------------------------------- #
# Toy datasets
# --------------------------------------------------------------------------- #
class SampleDataset:
    """Items are bs=1 SequenceSamples of varying length."""

    def __init__(self, n: int):
        self.lens = [(i * 7) % 5 + 1 for i in range(n)]

    def __len__(self):
        return len(self.lens)

    def __getitem__(self, i):
        n = self.lens[i]
        return SequenceSample.from_default(seqlens=[n], ids=[i],
                                           data={"packed_input_ids": torch.full((n,), i, dtype=torch.long)})


class NamedArrayDataset:
    """Items are NamedArrays with per-key seqlens metadata, as user datasets return."""

    def __init__(self, n: int, with_ids: bool = False):
        self.n, self.with_ids = n, with_ids

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = NamedArray(packed_input_ids=torch.full((i + 2,), i), rewards=torch.tensor([float(i)]))
        x.register_metadata(seqlens={"packed_input_ids": [i + 2], "rewards": [1]})
        if self.with_ids:
            x.register_metadata(id=f"rank0-{i}")
        return x


class CountingDataset:
    builds = 0

    def __init__(self, util: DatasetUtility, size: int = 3):
        type(self).builds += 1
        self.util, self.size = util, size


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    for name in ("test-counting",):
        data_api.DATASETS.unregister(name)


def epoch_ids(loader) -> List[list]:
    return [b.ids for b in loader]


# --------------------------------------------------------------------------- #
# Registries
# --------------------------------------------------------------------------- #
def test_dataset_registry_and_construction():
    register_dataset("test-counting", CountingDataset)
    ds = make_dataset(DatasetAbstraction("test-counting", args={"size": 9}), seed=3, dp_rank=1,
                      world_size=2, tokenizer_or_tokenizer_name=None)
    assert isinstance(ds, CountingDataset) and ds.size == 9
    assert (ds.util.seed, ds.util.dp_rank, ds.util.world_size, ds.util.tokenizer) == (3, 1, 2, None)
    ds = make_dataset("test-counting", seed=0, dp_rank=0, world_size=1, tokenizer_or_tokenizer_name=None)
    assert ds.size == 3
    with pytest.raises(KeyError) as e:
        make_dataset("no-such-dataset", 0, 0, 1, None)
    assert "no-such-dataset" in str(e.value) and "test-counting" in str(e.value)


def test_dataset_cache(tmp_path):
    register_dataset("test-counting", CountingDataset)
    CountingDataset.builds = 0
    kw = dict(seed=1, dp_rank=0, world_size=1, tokenizer_or_tokenizer_name=None,
              experiment_name="exp", trial_name="t", cache_root=str(tmp_path))
    a = make_dataset(DatasetAbstraction("test-counting", {"size": 4}), **kw)
    b = make_dataset(DatasetAbstraction("test-counting", {"size": 4}), **kw)
    assert CountingDataset.builds == 1 and b.size == 4 and b is not a
    make_dataset(DatasetAbstraction("test-counting", {"size": 5}), **kw)
    assert CountingDataset.builds == 2  # other arguments, other cache entry
    with pytest.raises(ValueError, match="experiment_name"):
        make_dataset("test-counting", 0, 0, 1, None, cache_root=str(tmp_path))


def test_dataloader_registry():
    ds = SampleDataset(4)
    assert isinstance(make_dataloader("packed", ds), PackedDataLoader)
    loader = make_dataloader(DataLoaderAbstraction("packed_eval", {"batch_size": 3}), ds)
    assert epoch_ids(loader) == [[0, 1, 2], [3]]
    with pytest.raises(KeyError) as e:
        make_dataloader("padded", ds)
    assert "packed" in str(e.value) and "packed_eval" in str(e.value)


def test_dataset_utility_and_batch_meta():
    with pytest.raises(ValueError, match="dp_rank"):
        DatasetUtility(seed=0, dp_rank=2, world_size=2, tokenizer=None)
    meta = DataBatchMeta(dp_rank=0, meta_sample=SampleDataset(1)[0].meta(), epoch=2, is_final_batch=True)
    assert meta.meta_sample.data is None and meta.is_final_batch


# --------------------------------------------------------------------------- #
# PackedDataLoader
# --------------------------------------------------------------------------- #
def test_loader_epoch_covers_every_item_once_without_padding():
    ds = SampleDataset(23)
    loader = PackedDataLoader(ds, batch_size=5, seed=1)
    assert len(loader) == 5
    batches = list(loader)
    assert [b.bs for b in batches] == [5, 5, 5, 5, 3]
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == list(range(23)) and ids != list(range(23))
    for b in batches:
        t = b.data["packed_input_ids"]
        assert t.shape[0] == b.total_tokens("packed_input_ids")
        assert t.tolist() == [i for i in b.ids for _ in range(ds.lens[i])]
    assert loader.epoch == 1


def test_loader_is_reproducible_and_epochs_differ():
    ds = SampleDataset(30)
    a, b = PackedDataLoader(ds, batch_size=4, seed=7), PackedDataLoader(ds, batch_size=4, seed=7)
    first_a, first_b = epoch_ids(a), epoch_ids(b)
    assert first_a == first_b
    second_a = epoch_ids(a)
    assert second_a != first_a and sorted(sum(second_a, [])) == list(range(30))
    assert epoch_ids(PackedDataLoader(ds, batch_size=4, seed=8)) != first_a
    c = PackedDataLoader(ds, batch_size=4, seed=7)
    c.set_epoch(1)
    assert epoch_ids(c) == second_a
    c.set_epoch(0)
    assert epoch_ids(c) == first_a


def test_loader_drop_last_and_eval_order():
    ds = SampleDataset(10)
    loader = PackedDataLoader(ds, batch_size=4, seed=0, drop_last=True)
    assert len(loader) == 2
    assert [b.bs for b in loader] == [4, 4]
    ev = data_api.packed_eval_dataloader(ds, batch_size=4)
    assert epoch_ids(ev) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert epoch_ids(ev) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_loader_skips_a_trailing_batch_smaller_than_min_last_batch():
    ds = SampleDataset(11)
    # 11 = 4 + 4 + 3: a last batch of 3 feeds 3 data-parallel ranks, not 4.
    assert [b.bs for b in PackedDataLoader(ds, batch_size=4, min_last_batch=3)] == [4, 4, 3]
    loader = PackedDataLoader(ds, batch_size=4, seed=2, min_last_batch=4)
    assert loader.items_per_epoch() == 8 and len(loader) == 2
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert [len(b) for b in first] == [4, 4] and [len(b) for b in second] == [4, 4]
    assert first != second and loader.epoch == 2  # each epoch skips other items of its own order
    assert PackedDataLoader(SampleDataset(12), batch_size=4, min_last_batch=4).items_per_epoch() == 12


@pytest.mark.parametrize("stop_after", [0, 2, 4, 5, 7])
def test_loader_resumes_exactly(stop_after):
    ds = SampleDataset(17)
    ref = PackedDataLoader(ds, batch_size=4, seed=3)
    expected = epoch_ids(ref) + epoch_ids(ref)  # two epochs of 5 batches

    run = PackedDataLoader(ds, batch_size=4, seed=3)
    seen, it = [], iter(run)
    while len(seen) < stop_after:
        try:
            seen.append(next(it).ids)
        except StopIteration:
            it = iter(run)
    state = run.state_dict()

    resumed = PackedDataLoader(ds, batch_size=4, seed=99)  # the seed comes from the state
    resumed.load_state_dict(state)
    while len(seen) < len(expected):
        seen.extend(epoch_ids(resumed))
    assert seen[:len(expected)] == expected


def test_loader_state_checks_dataset_size():
    state = PackedDataLoader(SampleDataset(5), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="5 items"):
        PackedDataLoader(SampleDataset(6), batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError):
        PackedDataLoader(SampleDataset(6), batch_size=0)


def test_loader_accepts_namedarray_items():
    loader = PackedDataLoader(NamedArrayDataset(6), batch_size=3, shuffle=False)
    b0, b1 = list(loader)
    assert b0.ids == [0, 1, 2]
    assert b0.seqlens["packed_input_ids"] == [[2], [3], [4]]
    assert b0.data["rewards"].tolist() == [0.0, 1.0, 2.0]
    assert b1.data["packed_input_ids"].tolist() == [3] * 5 + [4] * 6 + [5] * 7
    with_ids = list(PackedDataLoader(NamedArrayDataset(4, with_ids=True), batch_size=4, shuffle=False))
    assert with_ids[0].ids == ["rank0-0", "rank0-1", "rank0-2", "rank0-3"]
    assert with_ids[0].metadata == {}
    with pytest.raises(TypeError, match="dict"):
        next(iter(PackedDataLoader([{"a": 1}], batch_size=1)))


# --------------------------------------------------------------------------- #
# Files and tokenizers
# --------------------------------------------------------------------------- #
def test_load_shuffle_split_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"i": i}) for i in range(11)) + "\n")
    shares = [load_shuffle_split_dataset(DatasetUtility(5, r, 3, None), str(path)) for r in range(3)]
    got = [x["i"] for s in shares for x in s]
    # Equal shares (remainder dropped), disjoint.
    assert [len(s) for s in shares] == [3, 3, 3] and len(set(got)) == 9 and set(got) <= set(range(11))
    again = load_shuffle_split_dataset(DatasetUtility(5, 1, 3, None), str(path))
    assert again == shares[1]
    other_seed = load_shuffle_split_dataset(DatasetUtility(6, 0, 1, None), str(path))
    assert [x["i"] for x in other_seed] != [x["i"] for s in shares for x in s]
    jpath = tmp_path / "d.json"
    jpath.write_text(json.dumps([{"i": i} for i in range(4)]))
    assert len(load_shuffle_split_dataset(DatasetUtility(0, 0, 2, None), str(jpath))) == 2
    with pytest.raises(ValueError, match="d.csv"):
        load_shuffle_split_dataset(DatasetUtility(0, 0, 1, None), str(tmp_path / "d.csv"))
    with pytest.raises(ValueError, match="line 2.*field 'i'"):
        (tmp_path / "bad.jsonl").write_text('{"i": 1}\n{"j": 2}\n')
        load_shuffle_split_dataset(DatasetUtility(0, 0, 1, None), str(tmp_path / "bad.jsonl"), required={"i": int})


def _save_tiny_tokenizer(path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "hello there world", "packed not padded"],
                            trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    assert fast.pad_token is None
    fast.save_pretrained(str(path))


def test_load_hf_tokenizer_pads_with_eos(tmp_path):
    _save_tiny_tokenizer(tmp_path)
    tok = load_hf_tokenizer(str(tmp_path), padding_side="left")
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    assert len(tok("hello world")["input_ids"]) >= 2
    # A tokenizer path given by name is loaded for the dataset.
    register_dataset("test-counting", CountingDataset)
    ds = make_dataset("test-counting", 0, 0, 1, str(tmp_path))
    assert ds.util.tokenizer.pad_token == "</s>"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_hf_tokenizer(str(tmp_path / "does-not-exist"))
