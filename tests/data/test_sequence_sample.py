import dataclasses
import itertools
import random
from typing import List

import numpy as np
import pytest
import torch

from realhf.api.core.data_api import SequenceSample, SequenceSplitSpec, disable_validation
from realhf.base.namedarray import NamedArray

VOCAB = 11


# --------------------------------------------------------------------------- #
# Sample builders
# --------------------------------------------------------------------------- #
def sft_sample(bs: int, seed: int = 0) -> SequenceSample:
    rng = random.Random(seed)
    seqlens = [rng.randint(2, 40) for _ in range(bs)]
    total = sum(seqlens)
    prompt_mask = torch.zeros(total, dtype=torch.bool)
    off = 0
    for n in seqlens:
        prompt_mask[off:off + rng.randint(1, n - 1)] = True
        off += n
    return SequenceSample.from_default(
        seqlens=seqlens,
        ids=[f"sft{seed}-{i}" for i in range(bs)],
        data={"packed_input_ids": torch.randint(0, 1000, (total,), generator=torch.Generator().manual_seed(seed)),
              "prompt_mask": prompt_mask},
        metadata={"source": [f"s{i}" for i in range(bs)]},
    )


def rw_sample(bs: int, seed: int = 0) -> SequenceSample:
    rng = random.Random(seed)
    seqlens = [[rng.randint(1, 20) for _ in range(2 * rng.randint(1, 2))] for _ in range(bs)]
    total = sum(map(sum, seqlens))
    n_pairs = [len(x) // 2 for x in seqlens]
    return SequenceSample(
        keys={"packed_input_ids", "group_factor"},
        trailing_shapes={"packed_input_ids": (), "group_factor": ()},
        dtypes={"packed_input_ids": torch.int64, "group_factor": torch.float32},
        ids=list(range(100 * seed, 100 * seed + bs)),
        seqlens={"packed_input_ids": seqlens, "group_factor": [[1] for _ in range(bs)]},
        data={"packed_input_ids": torch.arange(total),
              "group_factor": torch.tensor([1.0 / n for n in n_pairs])},
    )


def ppo_sample(bs: int, seed: int = 0) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    seqlens = torch.randint(2, 30, (bs,), generator=g).tolist()
    total = sum(seqlens)
    data = {
        "packed_input_ids": torch.randint(0, VOCAB, (total,), generator=g),
        "packed_logits_mask": torch.rand(total, VOCAB, generator=g) > 0.5,
        "prompt_mask": torch.rand(total, generator=g) > 0.5,
        "values": torch.randn(total, generator=g),
        "packed_logprobs": torch.randn(total - bs, generator=g),
        "packed_ref_logprobs": torch.randn(total - bs, generator=g),
        "advantages": torch.randn(total - bs, generator=g),
        "ppo_loss_mask": torch.rand(total - bs, generator=g) > 0.2,
        "rewards": torch.randn(bs, generator=g),
        "seq_no_eos_mask": torch.rand(bs, generator=g) > 0.5,
    }
    return SequenceSample.from_default(seqlens=seqlens, ids=[("ppo", seed, i) for i in range(bs)], data=data,
                                       metadata={"version": list(range(bs)), "tag": ["x"] * bs})


def meta_only_sample(bs: int, seed: int = 0) -> SequenceSample:
    return ppo_sample(bs, seed).meta()


BUILDERS = {"sft": sft_sample, "rw": rw_sample, "ppo": ppo_sample, "meta": meta_only_sample}


def assert_same(a: SequenceSample, b: SequenceSample) -> None:
    assert a.ids == b.ids
    assert a.keys == b.keys
    assert a.seqlens == b.seqlens
    assert a.trailing_shapes == b.trailing_shapes
    assert a.dtypes == b.dtypes
    assert a.metadata == b.metadata
    assert (a.data is None) == (b.data is None)
    if a.data is not None:
        for k in a.keys:
            assert (a.data[k] is None) == (b.data[k] is None), k
            if a.data[k] is not None:
                assert a.data[k].dtype == b.data[k].dtype, k
                assert torch.equal(a.data[k], b.data[k]), k


def brute_force_best_max(lens: List[int], k: int) -> int:
    """Smallest achievable largest part over all contiguous k-splits (parts >= 1 item)."""
    n, best = len(lens), None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(lens[bounds[i]:bounds[i + 1]]) for i in range(k))
        best = worst if best is None else min(best, worst)
    return best


# --------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("dp", [1, 2, 3, 4, 8])
def test_split_gather_round_trip(kind, dp):
    for bs, seed in ((dp, 1), (dp + 3, 2), (17, 3)):
        x = BUILDERS[kind](bs, seed)
        parts = x.split(dp)
        assert len(parts) == dp
        assert all(p.bs >= 1 for p in parts)
        # Contiguous: the parts' ids, in order, are exactly x's ids.
        assert [i for p in parts for i in p.ids] == x.ids
        assert_same(SequenceSample.gather(parts), x)
        pieces = x.unpack()
        assert len(pieces) == x.bs and all(p.bs == 1 for p in pieces)
        assert_same(SequenceSample.gather(pieces), x)


def test_unpacked_pieces_hold_their_own_tokens():
    x = ppo_sample(5, seed=7)
    off = 0
    for piece, n in zip(x.unpack(), [s[0] for s in x.seqlens["packed_input_ids"]]):
        assert torch.equal(piece.data["packed_input_ids"], x.data["packed_input_ids"][off:off + n])
        assert piece.data["packed_logprobs"].shape == (n - 1,)
        assert piece.data["rewards"].shape == (1,)
        assert piece.data["packed_logits_mask"].shape == (n, VOCAB)
        off += n


def test_split_is_balanced_like_brute_force():
    rng = random.Random(0)
    for trial in range(40):
        bs = rng.randint(1, 9)
        k = rng.randint(1, bs)
        x = sft_sample(bs, seed=trial)
        lens = x.item_lengths("packed_input_ids")
        parts = x.split(k)
        got = max(p.total_tokens("packed_input_ids") for p in parts)
        assert got == brute_force_best_max(lens, k), (lens, k)


def test_split_spec_balances_the_requested_key():
    # Two keys with opposite length profiles: the chosen key drives the split.
    x = SequenceSample(
        keys={"a", "b"}, trailing_shapes={"a": (), "b": ()}, dtypes={"a": torch.float32, "b": torch.float32},
        ids=[0, 1, 2, 3],
        seqlens={"a": [[9], [1], [1], [1]], "b": [[1], [1], [1], [30]]},
        data={"a": torch.zeros(12), "b": torch.zeros(33)},
    )
    assert x.get_split_spec(2).partitions == [(0, 3), (3, 4)]  # default: key "b" (more tokens)
    assert x.get_split_spec(2, key="a").partitions == [(0, 1), (1, 4)]
    spec = x.get_split_spec(2, key="a", min_size=2)
    assert spec.partitions == [(0, 2), (2, 4)] and spec.sizes == [2, 2]
    with pytest.raises(ValueError):
        x.get_split_spec(5)


def test_split_views_share_storage():
    x = sft_sample(6)
    parts = x.split(2)
    parts[1].data["packed_input_ids"][0] = -5
    assert (x.data["packed_input_ids"] == -5).sum() == 1


def test_split_accepts_micro_batch_spec():
    @dataclasses.dataclass
    class MBSpec:
        n_mbs: int = 1
        max_tokens_per_mb: int = None

    x = SequenceSample.from_default(seqlens=[10] * 8, ids=list(range(8)),
                                    data={"packed_input_ids": torch.zeros(80, dtype=torch.long)})
    assert len(x.split(MBSpec(n_mbs=2))) == 2
    parts = x.split(MBSpec(n_mbs=1, max_tokens_per_mb=25))
    assert len(parts) == 4 and all(p.total_tokens("packed_input_ids") <= 25 for p in parts)
    # A budget below one item cannot be met: every item becomes its own part.
    assert len(x.split(MBSpec(n_mbs=1, max_tokens_per_mb=5))) == 8


def test_split_with_explicit_spec_and_spec_validation():
    x = rw_sample(5, seed=4)
    parts = x.split_with_spec(SequenceSplitSpec(sizes=[2, 0, 3]))
    assert [p.bs for p in parts] == [2, 0, 3]
    assert_same(SequenceSample.gather([parts[0], parts[2]]), x)
    assert SequenceSplitSpec(sizes=[1, 2]).partitions == [(0, 1), (1, 3)]
    assert SequenceSplitSpec(partitions=[(0, 2), (2, 5)]).sizes == [2, 3]
    with pytest.raises(ValueError, match="contiguous"):
        SequenceSplitSpec(partitions=[(0, 2), (3, 5)])
    with pytest.raises(ValueError, match="contiguous"):
        SequenceSplitSpec(partitions=[(1, 2)])
    with pytest.raises(ValueError):
        SequenceSplitSpec(partitions=[(0, 1)], sizes=[2])
    with pytest.raises(ValueError):
        SequenceSplitSpec()
    with pytest.raises(ValueError, match="covers 4"):
        x.split_with_spec(SequenceSplitSpec(sizes=[4]))


# --------------------------------------------------------------------------- #
# Construction and validation
# --------------------------------------------------------------------------- #
def test_from_default_length_rules():
    x = ppo_sample(3, seed=5)
    L = [s[0] for s in x.seqlens["packed_input_ids"]]
    assert x.seqlens["values"] == [[n] for n in L]
    assert x.seqlens["packed_logprobs"] == [[n - 1] for n in L]
    assert x.seqlens["rewards"] == [[1]] * 3
    assert x.trailing_shapes["packed_logits_mask"] == (VOCAB,)
    assert x.trailing_shapes["values"] == ()
    assert x.dtypes["ppo_loss_mask"] == torch.bool
    assert x.bs == 3


def test_from_default_unknown_key():
    with pytest.raises(ValueError, match="my_key") as e:
        SequenceSample.from_default(seqlens=[3], ids=[0], data={"my_key": torch.zeros(3)})
    assert "packed_input_ids" in str(e.value) and "rewards" in str(e.value) and "advantages" in str(e.value)


def test_validation_errors_name_the_key():
    good = dict(keys={"a"}, trailing_shapes={"a": (2,)}, dtypes={"a": torch.float32}, ids=[0, 1],
                seqlens={"a": [[1], [2, 1]]}, data={"a": torch.zeros(4, 2)})
    SequenceSample(**good)

    def bad(match, **changes):
        with pytest.raises((ValueError, TypeError), match=match):
            SequenceSample(**{**good, **changes})

    bad("unique", ids=[0, 0])
    bad("'a'.*3 items", seqlens={"a": [[1], [2], [1]]})
    bad("'a'.*shape", data={"a": torch.zeros(5, 2)})
    bad("'a'.*shape", data={"a": torch.zeros(4, 3)})
    bad("'a'.*dtype", data={"a": torch.zeros(4, 2, dtype=torch.float64)})
    bad("trailing_shapes.*missing", trailing_shapes={})
    bad("dtypes.*extra.*'b'", dtypes={"a": torch.float32, "b": torch.int32})
    bad("data.*missing", data={"b": torch.zeros(4, 2)})
    bad("'a'.*invalid sequence length", seqlens={"a": [[1], [-1, 4]]})
    bad("Metadata 'm'", metadata={"m": [1]})
    with disable_validation():
        broken = SequenceSample(**{**good, "ids": [0, 0]})
    assert broken.ids == [0, 0]
    with pytest.raises(ValueError):
        broken.validate()
    with pytest.raises(ValueError):  # switched back on after the block
        SequenceSample(**{**good, "ids": [0, 0]})


def test_gather_rejects_inconsistent_inputs():
    a, b = sft_sample(2, seed=1), sft_sample(2, seed=1)
    with pytest.raises(ValueError, match="unique"):
        SequenceSample.gather([a, b])
    c = sft_sample(2, seed=2)
    c.metadata["extra"] = [0, 0]
    with pytest.raises(ValueError, match="metadata"):
        SequenceSample.gather([a, c])
    with pytest.raises(ValueError, match="metadata-only"):
        SequenceSample.gather([a, sft_sample(2, seed=3).meta()])
    with pytest.raises(KeyError, match="prompt_mask"):
        SequenceSample.gather([a, sft_sample(2, seed=4).select(["packed_input_ids"])])
    sub = SequenceSample.gather([a, sft_sample(2, seed=5)], keys=["packed_input_ids"])
    assert sub.keys == {"packed_input_ids"} and sub.bs == 4


def test_from_namedarray():
    x = NamedArray(packed_input_ids=np.arange(7), rewards=torch.tensor([0.5]), mask=None)
    x.register_metadata(seqlens={"packed_input_ids": [3, 4], "rewards": 1}, origin="file")
    s = SequenceSample.from_namedarray(x, id="item")
    assert s.keys == {"packed_input_ids", "rewards"}
    assert s.seqlens == {"packed_input_ids": [[3, 4]], "rewards": [[1]]}
    assert s.ids == ["item"] and s.metadata == {"origin": ["file"]}
    assert s.dtypes["packed_input_ids"] == torch.int64

    y = NamedArray(a=torch.zeros(5, 2), b=torch.ones(5))
    y.register_metadata(seqlens=[2, 3])
    s = SequenceSample.from_namedarray(y, id=0)
    assert s.seqlens == {"a": [[2, 3]], "b": [[2, 3]]} and s.trailing_shapes["a"] == (2,)

    z = SequenceSample.from_namedarray(NamedArray(a=torch.zeros(4)), id=1)
    assert z.seqlens == {"a": [[4]]}
    bad = NamedArray(a=torch.zeros(4))
    bad.register_metadata(seqlens=[3])
    with pytest.raises(ValueError, match="'a'"):
        SequenceSample.from_namedarray(bad, id=0)


# --------------------------------------------------------------------------- #
# Key manipulation and copies
# --------------------------------------------------------------------------- #
def test_select_shares_tensors():
    x = ppo_sample(4)
    s = x.select(["packed_input_ids", "rewards"])
    assert s.keys == {"packed_input_ids", "rewards"}
    assert s.data["rewards"] is x.data["rewards"]
    assert s.ids == x.ids and s.metadata == x.metadata
    with pytest.raises(KeyError, match="nope"):
        x.select(["nope"])


def test_remap_keys_in_place():
    x = sft_sample(3)
    before = x.data["packed_input_ids"]
    out = x.remap_keys_({"packed_input_ids": "input"})
    assert out is x
    assert x.keys == {"input", "prompt_mask"}
    assert x.data["input"] is before and "packed_input_ids" not in x.seqlens
    assert set(x.trailing_shapes) == set(x.dtypes) == x.keys
    x.validate()
    with pytest.raises(KeyError):
        x.remap_keys_({"packed_input_ids": "other"})
    with pytest.raises(ValueError, match="collide"):
        x.remap_keys_({"input": "prompt_mask"})


def test_update_adds_and_overwrites():
    x = ppo_sample(4, seed=1)
    base = x.select(["packed_input_ids"])
    base.update_(x.select(["rewards", "values"]))
    assert base.keys == {"packed_input_ids", "rewards", "values"}
    assert base.data["rewards"] is x.data["rewards"]
    new_rewards = dataclasses.replace(x.select(["rewards"]), data={"rewards": torch.zeros(4)})
    base.update_(new_rewards)
    assert torch.equal(base.data["rewards"], torch.zeros(4))
    other = ppo_sample(4, seed=2)
    with pytest.raises(ValueError, match="ids"):
        base.update_(other.select(["rewards"]))
    meta = x.meta().select(["packed_input_ids"])
    meta.update_(x.select(["rewards"]))
    assert meta.data == {"packed_input_ids": None, "rewards": x.data["rewards"]}


def test_meta_and_device_copies():
    x = ppo_sample(3)
    m = x.meta()
    assert m.data is None and m.ids == x.ids and m.seqlens == x.seqlens
    m.seqlens["values"][0][0] = 999
    assert x.seqlens["values"][0][0] != 999
    y = x.to("cpu")
    assert_same(x, y)
    assert y.data is not x.data
    assert_same(x.cpu(), x)
    assert m.to("cpu").data is None
    assert "bs=3" in repr(x)
