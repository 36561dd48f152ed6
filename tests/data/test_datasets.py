"""Bundled assets, the three built-in datasets, and dataset file validation."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sys

import pytest
import torch

import realhf.impl.dataset  # noqa: F401  (registers the datasets)
from realhf.api.core import data_api
from realhf.api.core.config import DatasetAbstraction
from realhf.assets import dataset_path, list_datasets, tokenizer_path
from realhf.base.json_records import DatasetFormatError, load_json_records, shuffle_and_shard
from realhf.impl.dataset.prompt_answer_dataset import PromptAnswerDataset
from realhf.impl.dataset.prompt_dataset import PromptDataset
from realhf.impl.dataset.rw_paired_dataset import RewardModelingPairedDataset

VOCAB_SIZE = 4096
EQUATION = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


@pytest.fixture(scope="module")
def tokenizer():
    return data_api.load_hf_tokenizer(tokenizer_path())


def read_jsonl(name: str) -> list[dict]:
    with open(dataset_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def util(tokenizer, seed: int = 1, dp_rank: int = 0, world_size: int = 1) -> data_api.DatasetUtility:
    return data_api.DatasetUtility(seed=seed, dp_rank=dp_rank, world_size=world_size, tokenizer=tokenizer)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def equations_hold(cot: str) -> bool:
    """Every ``a op b = c`` step is right and the final line repeats the last result."""
    steps = EQUATION.findall(cot)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a // b}
    ok = all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in steps)
    final = re.search(r"#### (-?\d+)$", cot)
    return bool(steps) and ok and final is not None and final.group(1) == steps[-1][3]


# --------------------------------------------------------------------------
# Tokenizer and asset files
# --------------------------------------------------------------------------


def test_tokenizer_asset_loads_and_round_trips():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    assert len(tok) == VOCAB_SIZE
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife.\nQuestion: What is 17 * 23?\nAnswer: 391 — café ü 😀\n#### 391")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # No BOS/EOS is added implicitly; the datasets append EOS themselves.
    assert tok.eos_token_id not in ids and tok.bos_token_id not in ids
    raw = Tokenizer.from_file(os.path.join(tokenizer_path(), "tokenizer.json"))
    assert raw.encode(text).ids == ids
    # Common words of the training text are single tokens.
    assert len(tok.tokenize(" acknowledged")) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<s>user\nHi</s>\n<s>assistant\n"


def test_asset_registry_and_file_contents():
    names = list_datasets()
    assert names == ["prompt-train", "prompt-valid", "rw_pair-train", "rw_pair-valid",
                     "sft-train", "sft-valid"]
    with pytest.raises(ValueError, match="sft-train"):
        dataset_path("no-such-set")
    total = sum(os.path.getsize(dataset_path(n)) for n in names)
    assert total < 3_000_000

    sft = read_jsonl("sft-train")
    assert len(sft) == 2000 and len(read_jsonl("sft-valid")) == 200
    math = [r for r in sft if r["prompt"].startswith("Question: ")]
    assert 0.4 < len(math) / len(sft) < 0.8
    assert all(r["prompt"].endswith("\nAnswer:") and equations_hold(r["answer"]) for r in math)

    rw = read_jsonl("rw_pair-train")
    assert len(rw) == 1500
    for r in rw:
        assert 1 <= len(r["pos_answers"]) == len(r["neg_answers"]) <= 2
        assert all(p != n for p, n in zip(r["pos_answers"], r["neg_answers"]))
        if r["prompt"].startswith("Question: "):
            assert all(equations_hold(p) for p in r["pos_answers"])
            # A rejected answer is unfinished (no final line) or ends with another number.
            final = r["pos_answers"][0].rsplit("#### ", 1)[1]
            for n in r["neg_answers"]:
                assert "#### " not in n or n.rsplit("#### ", 1)[1] != final
                assert "#### " in n or r["pos_answers"][0].startswith(n)
        else:
            # Austen: the true sentence shuffled or cut off.
            pos = r["pos_answers"][0]
            assert all(sorted(n.split()) == sorted(pos.split()) or pos.startswith(n) for n in r["neg_answers"])

    prompts = read_jsonl("prompt-train")
    assert len(prompts) == 2000
    assert all(re.fullmatch(r"\d+", r["answer"]) for r in prompts)

    # Nothing leaks between train and valid.
    for kind in ("sft", "rw_pair", "prompt"):
        train = {r["prompt"] for r in read_jsonl(f"{kind}-train")}
        valid = {r["prompt"] for r in read_jsonl(f"{kind}-valid")}
        assert not train & valid


def test_problem_generator_is_seeded_and_correct():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "build_tools", "make_assets.py")
    spec = importlib.util.spec_from_file_location("make_assets_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    a = mod.draw_problems(random.Random(7), 200, (1, 2, 3))
    b = mod.draw_problems(random.Random(7), 200, (1, 2, 3))
    assert [d.render() for d in a] == [d.render() for d in b]
    for d in a:
        p = d.render()
        assert equations_hold(p.cot) and p.cot.endswith(f"#### {p.answer}")
        assert d.level <= p.n_steps <= d.level + 1


# --------------------------------------------------------------------------
# prompt_answer
# --------------------------------------------------------------------------


def test_prompt_answer_on_assets(tokenizer):
    records = {r["id"]: r for r in read_jsonl("sft-train")}
    ds = data_api.make_dataset(
        DatasetAbstraction("prompt_answer", args=dict(max_length=128, dataset_path=dataset_path("sft-train"))),
        seed=1, dp_rank=0, world_size=1, tokenizer_or_tokenizer_name=tokenizer,
    )
    assert isinstance(ds, PromptAnswerDataset) and len(ds) == 2000
    for i in range(0, len(ds), 40):
        s = ds[i]
        assert s.keys == {"packed_input_ids", "prompt_mask"}
        assert s.dtypes == {"packed_input_ids": torch.int64, "prompt_mask": torch.bool}
        tokens, mask = s.data["packed_input_ids"], s.data["prompt_mask"]
        L = tokens.shape[0]
        assert s.seqlens == {"packed_input_ids": [[L]], "prompt_mask": [[L]]} and L <= 128
        rec = records[s.ids[0]]
        n_prompt = len(encode(tokenizer, rec["prompt"]))
        assert int(mask.sum()) == n_prompt and bool(mask[:n_prompt].all())
        full = encode(tokenizer, rec["prompt"] + rec["answer"]) + [tokenizer.eos_token_id]
        assert tokens.tolist() == full[:128]


def test_prompt_answer_truncation_and_padding(tokenizer):
    path = dataset_path("sft-valid")
    ds = PromptAnswerDataset(util(tokenizer), max_length=24, dataset_path=path)
    n_long_prompts = sum(len(encode(tokenizer, r["prompt"])) >= 24 for r in read_jsonl("sft-valid"))
    assert n_long_prompts > 0 and len(ds) == 200 - n_long_prompts
    for i in range(len(ds)):
        s = ds[i]
        L = s.data["packed_input_ids"].shape[0]
        assert L <= 24 and int((~s.data["prompt_mask"]).sum()) >= 1

    padded = PromptAnswerDataset(util(tokenizer), max_length=96, dataset_path=path, pad_to_max_length=True)
    s = padded[0]
    assert s.seqlens["packed_input_ids"] == [[96]]
    assert s.data["packed_input_ids"][-1].item() == tokenizer.pad_token_id
    assert bool(s.data["prompt_mask"][-1])

    with pytest.raises(DatasetFormatError, match=r"sft-valid\.jsonl.*max_length=3"):
        PromptAnswerDataset(util(tokenizer), max_length=3, dataset_path=path)


def test_prompt_answer_from_builder(tokenizer):
    def builder():
        return [{"prompt": "Question: What is 2 + 2?\nAnswer:", "answer": " 4"},
                {"id": "b", "prompt": "Once", "answer": " upon a time"}]

    ds = PromptAnswerDataset(util(tokenizer), max_length=32, dataset_builder=builder)
    assert sorted(map(str, ds.ids)) == ["0", "b"]
    with pytest.raises(ValueError, match="exactly one"):
        PromptAnswerDataset(util(tokenizer), max_length=32)


# --------------------------------------------------------------------------
# rw_pair
# --------------------------------------------------------------------------


def test_rw_pair_on_assets(tokenizer):
    records = {r["id"]: r for r in read_jsonl("rw_pair-valid")}
    ds = RewardModelingPairedDataset(util(tokenizer), max_length=128, dataset_path=dataset_path("rw_pair-valid"))
    assert len(ds) == 200
    n_seqs = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s.keys == {"packed_input_ids", "prompt_lens"}
        assert s.dtypes == {"packed_input_ids": torch.int64, "prompt_lens": torch.int32}
        lens = s.seqlens["packed_input_ids"][0]
        assert s.seqlens["prompt_lens"] == [[1]] and len(lens) % 2 == 0 and 2 <= len(lens) <= 4
        assert all(n <= 128 for n in lens) and sum(lens) == s.data["packed_input_ids"].shape[0]
        n_seqs.add(len(lens))
        rec = records[s.ids[0]]
        assert s.data["prompt_lens"].tolist() == [len(encode(tokenizer, rec["prompt"]))]
        seqs = s.data["packed_input_ids"].split(lens)
        eos = [tokenizer.eos_token_id]
        pos = [(encode(tokenizer, rec["prompt"] + a) + eos)[:128] for a in rec["pos_answers"]]
        neg = [(encode(tokenizer, rec["prompt"] + a) + eos)[:128] for a in rec["neg_answers"]]
        for j, idx in enumerate(ds.pair_indices(i)):
            assert seqs[2 * j].tolist() == pos[idx]  # chosen first ...
            assert seqs[2 * j + 1].tolist() == neg[idx]  # ... then its rejected answer
    assert n_seqs == {2, 4}


def test_rw_pair_selection_is_reproducible(tokenizer):
    rows = [{"id": f"r{i}", "prompt": f"P{i}:", "pos_answers": [f" good{k}" for k in range(5)],
             "neg_answers": [f" bad{k}" for k in range(5)]} for i in range(40)]
    make = lambda seed, m: RewardModelingPairedDataset(  # noqa: E731
        util(tokenizer, seed=seed), max_length=16, dataset_builder=lambda: rows, max_pairs_per_prompt=m)
    a, b = make(3, 2), make(3, 2)
    for i in range(len(a)):
        assert torch.equal(a[i].data["packed_input_ids"], b[i].data["packed_input_ids"])
        assert torch.equal(a[i].data["packed_input_ids"], a[i].data["packed_input_ids"])
        picks = a.pair_indices(i)
        assert len(picks) == 2 and len(set(picks)) == 2
    assert len({tuple(a.pair_indices(i)) for i in range(len(a))}) > 1
    one = make(3, 1)
    assert all(len(one[i].seqlens["packed_input_ids"][0]) == 2 for i in range(len(one)))

    short = RewardModelingPairedDataset(util(tokenizer), max_length=40, dataset_path=dataset_path("rw_pair-valid"))
    lens = [n for i in range(len(short)) for n in short[i].seqlens["packed_input_ids"][0]]
    assert max(lens) == 40 and 0 < len(short) < 200


# --------------------------------------------------------------------------
# prompt
# --------------------------------------------------------------------------


def test_prompt_dataset_on_assets(tokenizer):
    records = {r["id"]: r for r in read_jsonl("prompt-train")}
    ds = PromptDataset(util(tokenizer), max_length=64, dataset_path=dataset_path("prompt-train"))
    assert len(ds) == 2000
    for i in range(0, len(ds), 50):
        s = ds[i]
        assert s.keys == {"packed_prompts"} and s.dtypes["packed_prompts"] == torch.int64
        rec = records[s.ids[0]]
        assert s.data["packed_prompts"].tolist() == encode(tokenizer, rec["prompt"])
        assert s.seqlens["packed_prompts"] == [[len(encode(tokenizer, rec["prompt"]))]]
        assert s.metadata == {"answer": [rec["answer"]]}
    batch = data_api.SequenceSample.gather([ds[0], ds[1], ds[2]])
    assert batch.bs == 3 and len(batch.metadata["answer"]) == 3


def test_prompt_dataset_left_truncation_and_padding(tokenizer):
    rows = [{"prompt": "Long ago and far away. Question: What is 3 + 4?", "answer": "7"},
            {"prompt": "Hi", "level": 1}]
    ds = PromptDataset(util(tokenizer), max_length=6, dataset_builder=lambda: rows)
    by_id = {ds.ids[i]: ds[i] for i in range(len(ds))}
    full = encode(tokenizer, rows[0]["prompt"])
    assert len(full) > 6 and by_id[0].data["packed_prompts"].tolist() == full[-6:]
    assert tokenizer.decode(full[-6:]).endswith("3 + 4?")
    assert by_id[0].metadata == {"answer": ["7"], "level": [None]}
    assert by_id[1].metadata == {"answer": [None], "level": [1]}
    padded = PromptDataset(util(tokenizer), max_length=6, dataset_builder=lambda: rows, pad_to_max_length=True)
    s = padded[padded.ids.index(1)]
    hi = encode(tokenizer, "Hi")
    assert s.data["packed_prompts"].tolist() == [tokenizer.pad_token_id] * (6 - len(hi)) + hi


def test_prompt_that_encodes_to_no_tokens_is_refused(tokenizer):
    rows = [{"prompt": "Hi", "id": "a"}, {"prompt": "", "id": "b"}]
    with pytest.raises(DatasetFormatError, match=r"record 'b': the prompt '' encodes to no tokens"):
        PromptDataset(util(tokenizer), max_length=6, dataset_builder=lambda: rows)


# --------------------------------------------------------------------------
# Data-parallel sharding
# --------------------------------------------------------------------------


def test_shuffle_and_shard_disjoint_equal():
    records = list(range(103))
    shards = [shuffle_and_shard(records, seed=5, dp_rank=r, world_size=4) for r in range(4)]
    assert all(len(s) == 25 for s in shards)
    flat = [x for s in shards for x in s]
    assert len(set(flat)) == 100 and set(flat) <= set(records)
    assert shards[0] == shuffle_and_shard(records, seed=5, dp_rank=0, world_size=4)
    assert shards[0] != shuffle_and_shard(records, seed=6, dp_rank=0, world_size=4)
    with pytest.raises(ValueError, match="3 records cannot be split over 4"):
        shuffle_and_shard(records[:3], seed=0, dp_rank=0, world_size=4)


def test_dataset_shards_across_ranks(tokenizer):
    path = dataset_path("prompt-valid")
    shards = [PromptDataset(util(tokenizer, seed=9, dp_rank=r, world_size=3), max_length=64, dataset_path=path)
              for r in range(3)]
    ids = [set(s.ids) for s in shards]
    assert [len(s) for s in shards] == [66, 66, 66]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


# --------------------------------------------------------------------------
# Malformed files
# --------------------------------------------------------------------------

SFT_FIELDS = {"prompt": str, "answer": str}
RW_ROW = {"prompt": "p", "pos_answers": [" a"], "neg_answers": [" b"]}


def _lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# name, file content, dataset kind, expected fragments (besides the file name)
MALFORMED = [
    ("missing_field.jsonl", _lines({"prompt": "a", "answer": "b"}, {"prompt": "c"}), "sft",
     ["line 2", "'answer'", "missing"]),
    ("wrong_type.jsonl", _lines({"prompt": "a", "answer": "b"}, {"prompt": "a", "answer": "b"},
                                {"prompt": 5, "answer": "b"}), "sft",
     ["line 3", "'prompt'", "expected str, got int"]),
    ("invalid_json.jsonl", _lines({"prompt": "a", "answer": "b"}, b"", b'{"prompt": "x", "answer": }'), "sft",
     ["line 3", "invalid JSON", "Expecting value"]),
    ("not_utf8.jsonl", _lines({"prompt": "a", "answer": "b"}, b'{"prompt": "caf\xe9", "answer": "b"}'), "sft",
     ["line 2", "UTF-8", "0xe9", "column 16", "byte offset 46"]),
    ("not_object.jsonl", _lines({"prompt": "a", "answer": "b"}, ["prompt"]), "sft",
     ["line 2", "expected a JSON object", "'answer'"]),
    ("duplicate_id.jsonl", _lines({"id": "x", "prompt": "a", "answer": "b"}, {"id": "y", "prompt": "a", "answer": "b"},
                                  {"id": "x", "prompt": "a", "answer": "b"}), "sft",
     ["line 3", "'id'", "duplicate id 'x'", "line 1"]),
    ("pos_neg_mismatch.jsonl", _lines(RW_ROW, {**RW_ROW, "neg_answers": [" b", " c"]}), "rw",
     ["line 2", "'neg_answers'", "2 answers", "pos_answers has 1"]),
    ("empty_pos.jsonl", _lines(RW_ROW, RW_ROW, {**RW_ROW, "pos_answers": []}), "rw",
     ["line 3", "'pos_answers'", "empty"]),
    ("pos_not_str.jsonl", _lines({**RW_ROW, "pos_answers": [" a", 3], "neg_answers": [" b", " c"]}), "rw",
     ["line 1", "'pos_answers'", "element 1", "expected str, got int"]),
    ("pos_is_string.jsonl", _lines(RW_ROW, {**RW_ROW, "pos_answers": " a"}), "rw",
     ["line 2", "'pos_answers'", "expected list[str], got str"]),
]


@pytest.mark.parametrize("fname,content,kind,fragments", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_located(tmp_path, tokenizer, fname, content, kind, fragments):
    path = tmp_path / fname
    path.write_bytes(content)
    cls = PromptAnswerDataset if kind == "sft" else RewardModelingPairedDataset
    with pytest.raises(DatasetFormatError) as err:
        cls(util(tokenizer), max_length=32, dataset_path=str(path))
    msg = str(err.value)
    assert fname in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    with pytest.raises(DatasetFormatError, match=r"empty\.jsonl: file is empty or contains no records"):
        load_json_records(str(empty), SFT_FIELDS)
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(DatasetFormatError, match=r"absent\.jsonl: dataset file does not exist"):
        load_json_records(str(missing), SFT_FIELDS)
    other = tmp_path / "data.csv"
    other.write_text("prompt,answer\n")
    with pytest.raises(DatasetFormatError, match=r"data\.csv.*expected \.json or \.jsonl"):
        load_json_records(str(other), SFT_FIELDS)


def test_json_list_files(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"prompt": "a", "answer": "b"}, {"id": 7, "prompt": "c", "answer": "d"}]))
    records = load_json_records(str(good), SFT_FIELDS)
    assert [r["id"] for r in records] == [0, 7]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": ["d"]}]))
    with pytest.raises(DatasetFormatError, match=r"bad\.json: record 1: field 'answer': expected str, got list"):
        load_json_records(str(bad), SFT_FIELDS)

    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a", "answer": "b"},\n  {"prompt": "c" "answer": "d"}\n]')
    with pytest.raises(DatasetFormatError, match=r"broken\.json: line 3: invalid JSON"):
        load_json_records(str(broken), SFT_FIELDS)

    top = tmp_path / "top.json"
    top.write_text(json.dumps({"prompt": "a", "answer": "b"}))
    with pytest.raises(DatasetFormatError, match=r"top\.json: expected a JSON list"):
        load_json_records(str(top), SFT_FIELDS)
