"""The ``sft`` interface on (dp, tp, pp) meshes against one process, and saving from tp2 x pp2.

One run per layout: the same weights and global batch give the same
train_step stats and updated parameters, and ``evaluate`` over a validation
set whose dp shards hold different numbers of batches gives the single
process numbers on every rank. The tp2 x pp2 run also saves an HF
checkpoint (loaded back with transformers) and checks that a failure
injected while writing leaves neither a partial nor a damaged checkpoint.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import pytest
import torch

from realhf.api.core.model_api import MicroBatchSpec
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.interface.sft_interface import SFTInterface

from tests.interface._sft_utils import batches, full_state, items_of, sft_batch, tiny_config, train_model, whole_model
from tests.parallel._mesh import MODEL, coords, merge_mesh_state, setup_mesh, stage_from_full

pytestmark = pytest.mark.distributed

LENGTHS = [5, 9, 3, 12, 7, 4, 10, 6]
PROMPTS = [2, 4, 1, 5, 3, 4, 2, 3]  # the sixth sequence has no answer token
EVAL_LENGTHS = [6, 8, 5, 11, 4, 9, 7, 3, 10]
EVAL_PROMPTS = [1, 3, 2, 4, 1, 5, 2, 1, 6]
EVAL_BS = 2
MB = MicroBatchSpec(n_mbs=2)
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 2, 2)]


def _train_sample():
    return sft_batch(tiny_config().vocab_size, LENGTHS, PROMPTS, seed=1)


def _eval_sample():
    return sft_batch(tiny_config().vocab_size, EVAL_LENGTHS, EVAL_PROMPTS, seed=2, prefix="v")


def _save_checks(save_root: str) -> Dict:
    """Save twice (the second replaces the first), then inject failures."""
    from realhf.impl.model.conversion import parallel_save

    out = {}
    target = os.path.join(save_root, "ckpt")
    SFTInterface(hf_family="llama").save(_SAVE_MODEL[0], target)
    SFTInterface(hf_family="llama").save(_SAVE_MODEL[0], target)
    before = {n: open(os.path.join(target, n), "rb").read() for n in sorted(os.listdir(target))}

    real = parallel_save.save_hf_state_dict

    def half_written(sd, out_dir, *a, **k):  # writes the weights, then dies
        real(sd, out_dir, *a, **k)
        raise OSError("killed mid-write (injected)")

    parallel_save.save_hf_state_dict = half_written
    errors = []
    try:
        for dst in (target, os.path.join(save_root, "fresh")):
            try:
                SFTInterface(hf_family="llama").save(_SAVE_MODEL[0], dst)
                errors.append(None)
            except Exception as e:  # every rank must raise
                errors.append(type(e).__name__)
    finally:
        parallel_save.save_hf_state_dict = real
    after = {n: open(os.path.join(target, n), "rb").read() for n in sorted(os.listdir(target))}
    out["save_errors"] = errors
    out["untouched"] = before == after
    out["listing"] = sorted(os.listdir(save_root))
    return out


_SAVE_MODEL = []


def _worker(rank: int, world: int, dp: int, tp: int, pp: int, save_root: Optional[str]):
    torch.manual_seed(0)
    config = tiny_config()
    full = full_state(config)
    setup_mesh(dp, tp, pp)
    out: Dict = {}
    with constants.model_scope(MODEL):
        out["coords"] = coords()
        d = constants.data_parallel_rank()
        net = stage_from_full(config, full)
        model = train_model(net)
        iface = SFTInterface()
        if save_root is not None:
            _SAVE_MODEL[:] = [model]
            out.update(_save_checks(save_root))
        # Uneven dp shards of the validation set: ranks run different numbers of batches.
        eval_idx = list(range(d, len(EVAL_LENGTHS), dp))
        out["eval_before"] = iface.evaluate(model, batches(_eval_sample(), eval_idx, EVAL_BS))
        k = len(LENGTHS) // dp
        local = items_of(_train_sample(), range(d * k, (d + 1) * k))
        out["stats"] = iface.train_step(model, local, MB)
        out["eval_after"] = iface.evaluate(model, batches(_eval_sample(), eval_idx, EVAL_BS))
        out["params"] = {k_: v.clone() for k_, v in net.state_dict().items()}
    return out


_REF = {}


def _reference():
    if not _REF:
        config = tiny_config()
        net = whole_model(config, full_state(config))
        model = train_model(net)
        iface = SFTInterface()
        eval_list = batches(_eval_sample(), range(len(EVAL_LENGTHS)), EVAL_BS)
        _REF["eval_before"] = iface.evaluate(model, eval_list)
        _REF["stats"] = iface.train_step(model, _train_sample(), MB)
        _REF["eval_after"] = iface.evaluate(model, eval_list)
        _REF["params"] = {k: v.clone() for k, v in net.state_dict().items()}
    return _REF


def _check_close_params(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    scale = max(float(p.abs().max()) for p in ref.values())
    for k in ref:
        err = float((got[k] - ref[k]).abs().max()) / scale
        assert err <= 1e-5, f"param {k}: error {err:.2e}"


@pytest.mark.parametrize("dp,tp,pp", LAYOUTS, ids=[f"dp{d}tp{t}pp{p}" for d, t, p in LAYOUTS])
def test_layout_matches_single_process(dp: int, tp: int, pp: int, tmp_path):
    ref = _reference()
    save_root = str(tmp_path) if (tp, pp) == (2, 2) else None
    results = run_distributed(_worker, dp * tp * pp, timeout=120, args=(dp, tp, pp, save_root))
    for r in results:
        s, rs = r["stats"], ref["stats"]
        assert s["loss"] == pytest.approx(rs["loss"], rel=1e-5)
        assert s["ppl"] == pytest.approx(rs["ppl"], rel=1e-5)
        assert s["grad_norm"] == pytest.approx(rs["grad_norm"], rel=1e-5)
        assert (s["n_tokens"], s["n_seqs"], s["lr"]) == (rs["n_tokens"], rs["n_seqs"], rs["lr"])
        for key in ("eval_before", "eval_after"):
            assert r[key]["loss"] == pytest.approx(ref[key]["loss"], rel=1e-5), key
            assert r[key]["ppl"] == pytest.approx(ref[key]["ppl"], rel=1e-5), key
            assert r[key]["n_tokens"] == ref[key]["n_tokens"]
    assert ref["eval_after"]["loss"] != pytest.approx(ref["eval_before"]["loss"], rel=1e-4)
    for d in range(dp):
        _check_close_params(merge_mesh_state(results, "params", tiny_config(), dp_rank=d), ref["params"])
    if save_root is not None:
        _check_saved(results, save_root)


def _check_saved(results, save_root: str) -> None:
    import transformers

    for r in results:
        assert r["save_errors"] == ["OSError" if r["coords"] == dict(dp=0, tp=0, pp=0) else "RuntimeError"] * 2
        assert r["untouched"]
    assert results[0]["listing"] == ["ckpt"]  # no partial "fresh", no temporary siblings
    assert sorted(os.listdir(save_root)) == ["ckpt"]
    config = tiny_config()
    net = whole_model(config, full_state(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(save_root, "ckpt")).eval()
    sample = _train_sample()
    ids, cu, max_len = packed_inputs(sample)
    with torch.no_grad():
        ref = net(ids, cu, max_len)
        for i in range(len(LENGTHS)):
            a, b = int(cu[i]), int(cu[i + 1])
            got = hf(ids[a:b][None]).logits[0]
            assert float((got - ref[a:b]).abs().max()) < 1e-4


def _save_worker(rank: int, world: int, family: str, dp: int, tp: int, pp: int, save_dir: str):
    config = tiny_config(family=family)
    full = full_state(config)
    setup_mesh(dp, tp, pp)
    with constants.model_scope(MODEL):
        net = stage_from_full(config, full)
        net.hf_family = family  # as set by ReaLModel.from_<family>
        SFTInterface().save(train_model(net), save_dir)
        return sorted(os.listdir(save_dir))


SAVE_CASES = [("qwen2", 1, 2, 2), ("gpt2", 2, 1, 2)]


@pytest.mark.parametrize("family,dp,tp,pp", SAVE_CASES, ids=[f"{f}-dp{d}tp{t}pp{p}" for f, d, t, p in SAVE_CASES])
def test_save_tied_embedding_family(family: str, dp: int, tp: int, pp: int, tmp_path):
    """Tied embeddings live on the first and the last stage; the checkpoint holds them once."""
    import transformers

    save_dir = str(tmp_path / "ckpt")
    listings = run_distributed(_save_worker, dp * tp * pp, timeout=120, args=(family, dp, tp, pp, save_dir))
    assert all(l == listings[0] for l in listings) and "model.safetensors" in listings[0]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    config = tiny_config(family=family)
    net = whole_model(config, full_state(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(save_dir).eval()
    ids = _train_sample().data["packed_input_ids"][:12]
    with torch.no_grad():
        ref = net(ids, torch.tensor([0, 12], dtype=torch.int32), 12)
        got = hf(ids[None]).logits[0]
    assert float((got - ref).abs().max()) < 1e-4
