"""The acceptance matrix of 3D parallelism: every (dp, tp, pp) layout against one process.

For each layout and model family, the same weights and the same global batch
give, on a real gloo mesh:

* forward logits equal to the single-process ReaLModel (1e-5), with one
  micro-batch, several, or a token budget;
* after one optimizer step (AdamW, clipping active, 2 micro-batches per dp
  rank), the same grad norm, gradients and parameters as one process that
  trains on the whole batch;
* greedy generation (several micro-batches, EOS ids that end rows at
  different steps) with the same tokens as one process.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pytest
import torch

import realhf.impl.model  # noqa: F401
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec, ReaLModelConfig, get_hf_family
from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.impl.model.backend.inference import EngineModule, packed_inputs
from realhf.impl.model.backend.optim import OptimizerConfig
from realhf.impl.model.backend.train_engine import TrainModule
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.nn.real_llm_generate import generate
from realhf.impl.model.parallelism.tensor_parallel.cross_entropy import vocab_parallel_packed_shifted_log_probs
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

from tests.parallel._mesh import MODEL, coords, last_stage_outputs, merge_mesh_state, setup_mesh, stage_from_full

pytestmark = pytest.mark.distributed

LENGTHS = [5, 9, 3, 12, 7, 4, 10, 6]
LAYOUTS = [(1, 2, 1), (1, 1, 2), (2, 1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
MB_SPECS = [MicroBatchSpec(n_mbs=1), MicroBatchSpec(n_mbs=3), MicroBatchSpec(n_mbs=2, max_tokens_per_mb=24)]
MAX_NEW = 6


def _config(family: str) -> ReaLModelConfig:
    # Three blocks so that pp=2 splits the blocks, not just embedding and head.
    return dataclasses.replace(get_hf_family(family).real_config_maker(), n_layers=3)


def _full_state(config: ReaLModelConfig) -> Dict[str, torch.Tensor]:
    m = ReaLModel(config).instantiate(init=False)
    m.init_weights(std=0.2, seed=0)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _sample(vocab: int, lengths=LENGTHS) -> SequenceSample:
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, vocab, (sum(lengths),), generator=g)
    return SequenceSample.from_default(lengths, [f"s{i}" for i in range(len(lengths))],
                                       {"packed_input_ids": toks})


def _dp_share(sample: SequenceSample, dp: int, rank: int) -> SequenceSample:
    items = sample.unpack()
    k = len(items) // dp
    return SequenceSample.gather(items[rank * k:(rank + 1) * k])


def _loss(logits: torch.Tensor, mb: SequenceSample):
    """Mean next-token NLL of the micro-batch (vocab-parallel when tp > 1)."""
    ids, cu, _ = packed_inputs(mb)
    tp_scope = constants.has_model_name(MODEL) and constants.in_model_scope() and constants.tensor_parallel_world_size() > 1
    if tp_scope:
        lp = vocab_parallel_packed_shifted_log_probs(logits, cu, ids, constants.tensor_parallel_group())
    else:
        lp = gather_packed_shifted_log_probs(logits, cu, ids)
    return -lp.mean(), {"n_pred": float(lp.numel())}


def _n_pred(mb: SequenceSample) -> float:
    return float(sum(n - 1 for item in mb.seqlens["packed_input_ids"] for n in item))


def _optimizer() -> OptimizerConfig:
    # Adam divides by sqrt(v) + eps. Some gradients are zero in exact
    # arithmetic (a key bias shifts all scores of a query alike, which softmax
    # ignores), so they hold rounding noise whose direction a tiny eps would
    # turn into full-size steps; eps=1e-3 keeps the step a smooth function of
    # the gradient while larger gradients still take near-sign steps.
    return OptimizerConfig(type="adam", lr=1e-2, eps=1e-3, weight_decay=0.05, lr_scheduler_type="constant",
                           warmup_steps_proportion=0.0)


def _gconfig() -> GenerationHyperparameters:
    return GenerationHyperparameters(max_new_tokens=MAX_NEW, min_new_tokens=1, greedy=True)


def _worker(rank: int, world: int, family: str, dp: int, tp: int, pp: int, eos: List[int], zero: bool,
            sp: bool = False):
    config = _config(family)
    full = _full_state(config)
    setup_mesh(dp, tp, pp, sequence_parallel=sp, gradient_checkpointing=sp)
    out: Dict = {}
    with constants.model_scope(MODEL):
        out["coords"] = coords()
        local = _dp_share(_sample(config.vocab_size), dp, constants.data_parallel_rank())
        model = stage_from_full(config, full)
        engine = EngineModule(model)
        out["logits"] = [engine.forward(local, spec) for spec in MB_SPECS]
        out["gen"] = engine.generate(local, MicroBatchSpec(n_mbs=2), _gconfig(), eos_token_id=eos)

        trainer = TrainModule(model, _optimizer(), total_steps=10, use_zero_optimization=zero)
        out["stats"] = trainer.train_batch(local, MicroBatchSpec(n_mbs=2), _loss, _n_pred)
        out["params"] = {k: v.clone() for k, v in model.state_dict().items()}
        out["grads"] = {k: model.get_param(k).grad.clone() for k in model.param_spec}
    return out


def _reference(family: str, eos: List[int]):
    config = _config(family)
    model = ReaLModel(config).instantiate(init=False)
    model.load_state_dict(_full_state(config))
    sample = _sample(config.vocab_size)
    ids, cu, max_len = packed_inputs(sample)
    with torch.no_grad():
        logits = model(ids, cu, max_len)
    gen = generate(model.eval(), ids, cu, _gconfig(), eos_token_id=eos)
    trainer = TrainModule(model, _optimizer(), total_steps=10)
    stats = trainer.train_batch(sample, MicroBatchSpec(n_mbs=1), _loss, _n_pred)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: model.get_param(k).grad.clone() for k in model.param_spec}
    return logits, gen, stats, params, grads


def _eos_ids(family: str) -> List[int]:
    """Tokens the greedy reference emits early in some rows, so rows end at different steps."""
    config = _config(family)
    model = ReaLModel(config).instantiate(init=False)
    model.load_state_dict(_full_state(config))
    ids, cu, _ = packed_inputs(_sample(config.vocab_size))
    free = generate(model.eval(), ids, cu, _gconfig(), eos_token_id=None)
    rows = free.sequences
    return sorted({int(rows[0][1]), int(rows[3][2])})


_REFS: Dict[str, tuple] = {}


def _ref(family: str):
    if family not in _REFS:
        eos = _eos_ids(family)
        _REFS[family] = (eos, _reference(family, eos))
    return _REFS[family]


def _rows(sample: SequenceSample, dp: int, rank: int) -> slice:
    lens = [sum(s) for s in sample.seqlens["packed_input_ids"]]
    k = len(lens) // dp
    return slice(sum(lens[:rank * k]), sum(lens[:(rank + 1) * k]))


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel: float, scale: float = 0.0) -> None:
    """Max error relative to ``scale`` (default: the largest entry of ``expected``)."""
    scale = scale or float(expected.abs().max()) or 1.0
    err = float((actual - expected).abs().max()) / scale
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert err <= rel, f"{name}: max error {err:.2e} (relative to max {scale:.3g}) > {rel:.0e}"


CASES = [(f, *layout, False) for f in ("llama", "qwen2") for layout in LAYOUTS]
CASES += [("gpt2", 1, 1, 2, False), ("gpt2", 2, 2, 2, False)]
# Sequence parallelism and gradient checkpointing, switched on by the mesh's topology.
CASES += [("llama", 1, 2, 2, True), ("qwen2", 2, 2, 1, True), ("gpt2", 2, 2, 2, True)]


@pytest.mark.parametrize("family,dp,tp,pp,sp", CASES,
                         ids=[f"{f}-dp{d}tp{t}pp{p}{'-sp' if sp else ''}" for f, d, t, p, sp in CASES])
def test_layout_matches_single_process(family: str, dp: int, tp: int, pp: int, sp: bool):
    eos, (ref_logits, ref_gen, ref_stats, ref_params, ref_grads) = _ref(family)
    zero = dp > 1 and tp > 1  # ZeRO-1 in the mixed layouts
    results = run_distributed(_worker, dp * tp * pp, timeout=120, args=(family, dp, tp, pp, eos, zero, sp))
    config = _config(family)
    sample = _sample(config.vocab_size)

    # Forward: every micro-batch spec, every dp rank, tp shards concatenated over the vocabulary.
    for d in range(dp):
        last = last_stage_outputs(results, "logits", dp_rank=d)
        expected = ref_logits[_rows(sample, dp, d)]
        for i, spec in enumerate(MB_SPECS):
            got = torch.cat([r["logits"][i] for r in last], dim=-1)
            _assert_close(f"logits dp{d} {spec}", got, expected, 1e-5)
    # Stages other than the last return nothing.
    assert all(r["logits"][0] is None for r in results if r["coords"]["pp"] != pp - 1)

    # Greedy generation: same tokens, lengths, EOS flags; close log-probs.
    k = len(LENGTHS) // dp
    for r in last_stage_outputs(results, "gen"):
        d = r["coords"]["dp"]
        gen = r["gen"]
        ref_rows = slice(d * k, (d + 1) * k)
        ref_seqs = ref_gen.sequences[ref_rows]
        assert [s.tolist() for s in gen.sequences] == [s.tolist() for s in ref_seqs]
        assert torch.equal(gen.no_eos, ref_gen.no_eos[ref_rows])
        ref_lp = torch.cat(ref_gen.logprobs_per_row[ref_rows])
        assert float((gen.logprobs - ref_lp).abs().max()) < 1e-4
    assert len(set(ref_gen.gen_lengths.tolist())) > 1, "EOS ids should end rows at different steps"

    # One optimizer step: stats, gradients and parameters equal one process.
    for r in results:
        s = r["stats"]
        assert s["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
        assert s["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-5)
    assert ref_stats["grad_norm"] > 1.0, "clipping should be active"
    for d in range(dp):
        grads = merge_mesh_state(results, "grads", config, dp_rank=d)
        params = merge_mesh_state(results, "params", config, dp_rank=d)
        assert set(params) <= set(ref_params) and set(ref_params) - set(params) <= {"0.wte.weight", f"{config.n_layers + 1}.weight"}
        # Compared on the scale of the whole model: biases start at zero, so
        # their own scale is one step of rounding noise.
        grad_scale = max(float(g.abs().max()) for g in ref_grads.values())
        param_scale = max(float(p.abs().max()) for p in ref_params.values())
        for key in params:
            _assert_close(f"grad {key} dp{d}", grads[key], ref_grads[key], 1e-5, grad_scale)
            _assert_close(f"param {key} dp{d}", params[key], ref_params[key], 1e-5, param_scale)
