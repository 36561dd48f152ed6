"""Pipeline runner: pp=2 forward and 1F1B training match one process."""

import pytest
import torch
import torch.distributed as dist

import realhf.impl.model  # noqa: F401
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec
from realhf.api.from_hf.llama import LLAMA
from realhf.base.testing import DistributedRunError, run_distributed
from realhf.impl.model.nn.real_llm_api import ReaLModel
from realhf.impl.model.parallelism.pipeline_parallel.runner import PipelineRunner
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

pytestmark = pytest.mark.distributed

LENGTHS = [5, 9, 3, 12, 7, 4, 10]
VOCAB = 128


def _config():
    return LLAMA.config_from_hf(
        dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
             intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
             hidden_act="silu", tie_word_embeddings=False)
    )


def _whole(seed: int = 0) -> ReaLModel:
    m = ReaLModel(_config()).instantiate(init=False)
    m.init_weights(std=0.2, seed=seed)
    return m


def _sample(lengths=LENGTHS, seed: int = 1) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, VOCAB, (sum(lengths),), generator=g)
    return SequenceSample.from_default(lengths, [f"s{i}" for i in range(len(lengths))],
                                       {"packed_input_ids": toks})


def _cu(lengths):
    return torch.tensor([0] + list(lengths)).cumsum(0)


def _stage(rank: int, seed: int = 0):
    """This rank's stage, loaded from the single-process model's state dict."""
    sd = _whole(seed).state_dict()
    stage = ReaLModel(_config(), pp_size=2, pp_rank=rank).instantiate(init=False)
    stage.load_state_dict({k: v for k, v in sd.items() if k in stage.param_spec})
    group = dist.new_group([0, 1])
    return stage, PipelineRunner(stage, group, [0, 1], stage_id=rank, n_stages=2)


def _token_loss(logits: torch.Tensor, mb: SequenceSample):
    """Per-token mean over every token of the micro-batch."""
    ids = mb.data["packed_input_ids"]
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    loss = -lp.mean()
    return loss, {"n_tokens": float(ids.numel())}


def _logprob_hook(logits: torch.Tensor, mb: SequenceSample):
    cu = _cu([n for item in mb.seqlens["packed_input_ids"] for n in item])
    return gather_packed_shifted_log_probs(logits, cu, mb.data["packed_input_ids"])


# ----------------------------------------------------------------- forward
def _forward(rank, world, mb_specs):
    _, runner = _stage(rank)
    sample = _sample()
    outs = []
    for spec in mb_specs:
        outs.append(runner.forward(sample, spec))
        outs.append(runner.forward(sample, spec, post_hook=_logprob_hook))
    return outs


def test_forward_matches_single_process():
    specs = [MicroBatchSpec(n_mbs=1), MicroBatchSpec(n_mbs=3), MicroBatchSpec(n_mbs=3, max_tokens_per_mb=20)]
    res = run_distributed(_forward, 2, timeout=60, args=(specs,))
    assert all(o is None for o in res[0])
    sample = _sample()
    with torch.no_grad():
        ref = _whole()(sample.data["packed_input_ids"], _cu(LENGTHS), max(LENGTHS))
    ref_lp = gather_packed_shifted_log_probs(ref, _cu(LENGTHS), sample.data["packed_input_ids"])
    for i in range(len(specs)):
        logits, lp = res[1][2 * i], res[1][2 * i + 1]
        assert logits.shape == ref.shape and lp.shape == ref_lp.shape
        assert (logits - ref).abs().max().item() <= 1e-5
        assert (lp - ref_lp).abs().max().item() <= 1e-5


# ------------------------------------------------------------------- train
def _grads(model: ReaLModel):
    return {k: model.get_param(k).grad.clone() for k in model.param_spec}


def _train(rank, world, n_mbs, repeats):
    stage, runner = _stage(rank)
    sample = _sample()
    stats = [runner.train_batch(sample, MicroBatchSpec(n_mbs=n_mbs), _token_loss) for _ in range(repeats)]
    return stats, _grads(stage)


@pytest.mark.parametrize("n_mbs", [1, 3, 4])
def test_train_batch_gradients_match_single_process(n_mbs):
    repeats = 2 if n_mbs == 3 else 1  # gradients accumulate over calls
    res = run_distributed(_train, 2, timeout=60, args=(n_mbs, repeats))
    sample = _sample()
    whole = _whole()
    ref_loss, _ = _token_loss(whole(sample.data["packed_input_ids"], _cu(LENGTHS), max(LENGTHS)), sample)
    ref_loss.backward()
    ref_loss = float(ref_loss.detach())
    ref = _grads(whole)
    (stats0, g0), (stats1, g1) = res
    assert stats0 == stats1
    for s in stats0:
        assert abs(s["loss"] - ref_loss) <= 1e-5
        assert s["n_tokens"] == pytest.approx(sum(n * n for n in _split_lens(n_mbs)) / sum(LENGTHS))
    assert set(g0) | set(g1) == set(ref) and not set(g0) & set(g1)
    for k, g in {**g0, **g1}.items():
        expect = ref[k] * repeats
        rel = (g - expect).norm() / expect.norm().clamp_min(1e-12)
        assert rel.item() <= 1e-5, (k, rel.item())


def _split_lens(n_mbs):
    """Token counts of the micro-batches a counting split makes."""
    return [mb.total_tokens("packed_input_ids") for mb in _sample().split(min(n_mbs, len(LENGTHS)))]


# ------------------------------------------------------------------ errors
def _failing(rank, world):
    _, runner = _stage(rank)

    def bad_loss(logits, mb):
        raise RuntimeError("loss exploded")

    return runner.train_batch(_sample(), MicroBatchSpec(n_mbs=3), bad_loss)


def test_stage_failure_surfaces():
    with pytest.raises(DistributedRunError) as err:
        run_distributed(_failing, 2, timeout=30)
    assert err.value.rank == 1 and "loss exploded" in str(err.value)


def test_single_stage_runner_matches_model():
    model = _whole()
    runner = PipelineRunner(model, None, [0], stage_id=0, n_stages=1)
    sample = _sample()
    out = runner.forward(sample, MicroBatchSpec(n_mbs=3))
    with torch.no_grad():
        ref = model(sample.data["packed_input_ids"], _cu(LENGTHS), max(LENGTHS))
    assert (out - ref).abs().max().item() <= 1e-5
    stats = runner.train_batch(sample, MicroBatchSpec(n_mbs=2), _token_loss)
    ref_model = _whole()
    loss, _ = _token_loss(ref_model(sample.data["packed_input_ids"], _cu(LENGTHS), max(LENGTHS)), sample)
    loss.backward()
    assert abs(stats["loss"] - loss.item()) <= 1e-5
    for k in model.param_spec:
        a, b = model.get_param(k).grad, ref_model.get_param(k).grad
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_rejects_mismatched_ranks():
    with pytest.raises(ValueError):
        PipelineRunner(_whole(), None, [0, 1], stage_id=0, n_stages=3)
    with pytest.raises(ValueError):
        PipelineRunner(_whole(), None, [0, 1], stage_id=2, n_stages=2)


# -------------------------------------------------------------- generation
def _gen_worker(rank, world, specs, eos):
    from realhf.api.core.model_api import GenerationHyperparameters

    sd = _whole().state_dict()
    stage = ReaLModel(_config(), pp_size=world, pp_rank=rank).instantiate(init=False)
    stage.load_state_dict({k: v for k, v in sd.items() if k in stage.param_spec})
    runner = PipelineRunner(stage, dist.new_group(list(range(world))), list(range(world)), rank, world)
    g = GenerationHyperparameters(max_new_tokens=7, min_new_tokens=1, greedy=True)
    return [runner.generate(_sample(), spec, g, eos_token_id=eos) for spec in specs]


@pytest.mark.parametrize("n_stages", [2, 3])
def test_pipelined_greedy_generation_matches_single_process(n_stages):
    from realhf.api.core.model_api import GenerationHyperparameters
    from realhf.impl.model.nn.real_llm_generate import generate

    g = GenerationHyperparameters(max_new_tokens=7, min_new_tokens=1, greedy=True)
    ids, cu = _sample().data["packed_input_ids"], _cu(LENGTHS)
    free = generate(_whole().eval(), ids, cu, g, eos_token_id=None).sequences
    eos = sorted({int(free[0][2]), int(free[4][1])})  # rows end at different steps
    ref = generate(_whole().eval(), ids, cu, g, eos_token_id=eos)
    assert len(set(ref.gen_lengths.tolist())) > 1
    specs = [MicroBatchSpec(n_mbs=1), MicroBatchSpec(n_mbs=3), MicroBatchSpec(n_mbs=2, max_tokens_per_mb=25)]
    res = run_distributed(_gen_worker, n_stages, timeout=60, args=(specs, eos))
    assert all(o is None for r in res[:-1] for o in r)
    for out in res[-1]:
        assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]
        assert torch.equal(out.no_eos, ref.no_eos)
        assert (out.logprobs - ref.logprobs).abs().max().item() < 1e-5
