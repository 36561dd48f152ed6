"""The ``generation`` interface: JSONL records, appending, path resolution, dp/tp/pp writers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from realhf.api.core.config import ModelInterfaceAbstraction
from realhf.api.core.data_api import DatasetUtility, SequenceSample, load_hf_tokenizer
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec, Model, make_interface
from realhf.assets import dataset_path, tokenizer_path
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.impl.dataset.prompt_dataset import PromptDataset
from realhf.impl.model.interface.gen_interface import GenerationInterface

from tests.interface._sft_utils import full_state, tiny_config, whole_model
from tests.parallel._mesh import MODEL, setup_mesh, stage_from_full

GCONFIG = GenerationHyperparameters(max_new_tokens=6, min_new_tokens=2, greedy=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_hf_tokenizer(tokenizer_path())


def prompts(tokenizer, n: int, offset: int = 0, pad_to: int = 0) -> SequenceSample:
    util = DatasetUtility(seed=1, dp_rank=0, world_size=1, tokenizer=tokenizer)
    ds = PromptDataset(util, max_length=pad_to or 40, dataset_path=dataset_path("prompt-valid"),
                       pad_to_max_length=bool(pad_to))
    return SequenceSample.gather([ds[i] for i in range(offset, offset + n)])


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def test_registered():
    iface = make_interface(ModelInterfaceAbstraction("generation", args=dict(output_file="x.jsonl")))
    assert isinstance(iface, GenerationInterface)
    d = GenerationInterface(generation_config={"max_new_tokens": 3, "min_new_tokens": 0})
    assert d.generation_config.max_new_tokens == 3


def test_writes_and_appends_jsonl(tokenizer, tmp_path):
    config = tiny_config(vocab_size=len(tokenizer))
    net = whole_model(config, full_state(config, std=0.2))
    model = Model("default", net, tokenizer=tokenizer)
    out = tmp_path / "gen.jsonl"
    iface = GenerationInterface(generation_config=GCONFIG, output_file=str(out))
    first = prompts(tokenizer, 3)
    assert iface.generate(model, first, MicroBatchSpec(n_mbs=2)) is None
    lines = read_lines(out)
    assert [l["id"] for l in lines] == first.ids
    for l, p in zip(lines, first.unpack()):
        assert set(l) == {"id", "prompt", "answer", "seq"}
        assert l["prompt"] == tokenizer.decode(p.data["packed_prompts"].tolist(), skip_special_tokens=True)
        assert l["prompt"].startswith("Question:") and l["prompt"].endswith("Answer:")
        assert l["seq"].startswith(l["prompt"]) and len(l["answer"]) > 0
    # Greedy decoding is deterministic: a second call appends the same answers for the same prompts,
    # and left padding of prompts does not show up in the text.
    second = prompts(tokenizer, 2, offset=3)
    iface.generate(model, SequenceSample.gather([first.unpack()[0], *second.unpack()]))
    lines2 = read_lines(out)
    assert len(lines2) == 6 and lines2[:3] == lines
    assert [l["id"] for l in lines2[3:]] == [first.ids[0], *second.ids]
    assert lines2[3] == lines[0]
    padded = prompts(tokenizer, 1, pad_to=48)
    assert int(padded.data["packed_prompts"][0]) == tokenizer.pad_token_id
    rec = GenerationInterface.records(tokenizer, padded, [torch.tensor([5, 6])])[0]
    assert rec["prompt"] == lines[0]["prompt"]


def test_relative_path_resolves_under_log_path(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(constants.FILEROOT_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(constants, "_experiment_name", "exp")
    monkeypatch.setattr(constants, "_trial_name", "trial")
    config = tiny_config(vocab_size=len(tokenizer))
    model = Model("default", whole_model(config, full_state(config, std=0.2)), tokenizer=tokenizer)
    iface = GenerationInterface(generation_config=GCONFIG, output_file="sub/answers.jsonl")
    iface.generate(model, prompts(tokenizer, 2))
    path = os.path.join(constants.get_log_path(), "sub", "answers.jsonl")
    assert path.startswith(str(tmp_path)) and iface.output_path() == path
    assert len(read_lines(path)) == 2


# --------------------------------------------------------------- dp2 / tp2 / pp2
def _worker(rank: int, world: int, dp: int, tp: int, pp: int, path: str):
    tok = load_hf_tokenizer(tokenizer_path())
    config = tiny_config(vocab_size=len(tok))
    full = full_state(config, std=0.2)
    setup_mesh(dp, tp, pp)
    with constants.model_scope(MODEL):
        d = constants.data_parallel_rank()
        net = stage_from_full(config, full)
        sample = prompts(tok, 2, offset=2 * d)
        GenerationInterface(generation_config=GCONFIG, output_file=path).generate(
            Model("default", net, tokenizer=tok), sample)
    return d


@pytest.mark.distributed
@pytest.mark.parametrize("dp,tp,pp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_one_writer_per_dp_rank(tokenizer, tmp_path, dp, tp, pp):
    path = str(tmp_path / "gen.jsonl")
    run_distributed(_worker, dp * tp * pp, timeout=120, args=(dp, tp, pp, path))
    lines = read_lines(path)
    ids = prompts(tokenizer, 2 * dp).ids
    assert sorted(l["id"] for l in lines) == sorted(ids)  # exactly one line per item
    # Same greedy answers as one process.
    config = tiny_config(vocab_size=len(tokenizer))
    model = Model("default", whole_model(config, full_state(config, std=0.2)), tokenizer=tokenizer)
    ref_path = tmp_path / "ref.jsonl"
    GenerationInterface(generation_config=GCONFIG, output_file=str(ref_path)).generate(
        model, prompts(tokenizer, 2 * dp))
    ref = {l["id"]: l for l in read_lines(ref_path)}
    for l in lines:
        assert l == ref[l["id"]]
