"""``allocation_mode=heuristic``: the (dp, tp, pp) rule and its use by every experiment."""

import os

import pytest

from realhf.api.core.model_api import ReaLModelConfig
from realhf.api.quickstart.allocation import check_parallel_fits
from realhf.api.quickstart.entrypoint import parse_quickstart
from realhf.api.quickstart.heuristic import (
    DEFAULT_GPU_MEMORY,
    choose_layout,
    count_params,
    device_memory_bytes,
)
from realhf.assets import DATA_DIR

GB = 1024**3


def llama(n_layers, hidden, inter, heads, kv, vocab=32000):
    return ReaLModelConfig(n_layers=n_layers, n_kv_heads=kv, n_q_heads=heads, hidden_dim=hidden,
                           intermediate_dim=inter, vocab_size=vocab, mlp_type="llama", layer_norm_type="rms",
                           apply_rotary=True, use_attention_bias=False, use_attn_proj_bias=False)


TINY = llama(2, 64, 128, 4, 2, vocab=256)
L7B = llama(32, 4096, 11008, 32, 32)
L70B = llama(80, 8192, 28672, 64, 8)


def test_param_counts_match_known_sizes():
    assert 6.5e9 < count_params(L7B) < 7.0e9
    assert 68e9 < count_params(L70B) < 70e9


def test_tiny_model_on_cpu_is_data_parallel():
    p = choose_layout(TINY, 2, 2, train=True, gpu=False, memory_per_device=device_memory_bytes(2, gpu=False))
    assert (p.data_parallel_size, p.model_parallel_size, p.pipeline_parallel_size) == (2, 1, 1)


def test_7b_trains_with_tp_and_generates_data_parallel():
    train = choose_layout(L7B, 8, 8, train=True, gpu=True, memory_per_device=DEFAULT_GPU_MEMORY)
    assert train.model_parallel_size == 2 and train.pipeline_parallel_size == 1 and train.data_parallel_size == 4
    gen = choose_layout(L7B, 8, 8, train=False, gpu=True, memory_per_device=DEFAULT_GPU_MEMORY)
    assert gen.model_parallel_size == 1 and gen.data_parallel_size == 8


def test_70b_uses_tp_inside_node_then_pp_across_nodes():
    gen = choose_layout(L70B, 8, 8, train=False, gpu=True, memory_per_device=DEFAULT_GPU_MEMORY)
    assert (gen.model_parallel_size, gen.pipeline_parallel_size, gen.data_parallel_size) == (4, 1, 2)
    train = choose_layout(L70B, 32, 8, train=True, gpu=True, memory_per_device=DEFAULT_GPU_MEMORY)
    assert train.model_parallel_size == 8 and train.pipeline_parallel_size == 4
    assert L70B.n_layers % train.pipeline_parallel_size == 0


def test_tp_divides_heads_and_stays_in_node():
    odd = llama(6, 768, 3072, 12, 12)  # 12 heads: tp 8 is impossible
    p = choose_layout(odd, 16, 8, train=True, gpu=True, memory_per_device=count_params(odd) * 2)
    assert odd.n_q_heads % p.model_parallel_size == 0 and p.model_parallel_size <= 8
    assert p.model_parallel_size * p.pipeline_parallel_size >= 8
    assert odd.n_layers % p.pipeline_parallel_size == 0


@pytest.mark.parametrize("model", [TINY, L7B, L70B, llama(6, 768, 3072, 12, 12), llama(30, 5120, 13824, 40, 40)])
@pytest.mark.parametrize("n_nodes,gpn", [(1, 1), (1, 2), (1, 8), (2, 8), (4, 8), (3, 4)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("memory", [8 * GB, 80 * GB])
def test_every_layout_passes_validation(model, n_nodes, gpn, train, memory):
    n = n_nodes * gpn
    p = choose_layout(model, n, gpn, train=train, gpu=True, memory_per_device=memory)
    assert p.world_size == n
    assert gpn % p.model_parallel_size == 0
    assert model.n_layers % p.pipeline_parallel_size == 0
    check_parallel_fits(p, model, "heuristic")


def test_no_config_means_data_parallel():
    p = choose_layout(None, 4, 4, train=True, gpu=True, memory_per_device=GB)
    assert p.data_parallel_size == 4


TINY_DIR = os.path.join(DATA_DIR, "..", "models", "tiny-llama")


def _models(*roles):
    return [a for r in roles for a in (f"{r}.path={TINY_DIR}", f"{r}.init_from_scratch=True")]


BASE = {
    "sft": _models("model") + [f"dataset.train_path={DATA_DIR}/sft-train.jsonl", "dataset.train_bs_n_seqs=8"],
    "rw": _models("model") + [f"dataset.train_path={DATA_DIR}/rw_pair-train.jsonl", "dataset.train_bs_n_seqs=8"],
    "dpo": _models("actor", "ref") + [f"dataset.train_path={DATA_DIR}/rw_pair-train.jsonl",
                                      "dataset.train_bs_n_seqs=8"],
    "gen": _models("model") + [f"dataset.path={DATA_DIR}/prompt-train.jsonl", "dataset.max_prompt_len=32",
                               "dataset.train_bs_n_seqs=8", "gen.max_new_tokens=8", "gen.min_new_tokens=0"],
    "ppo": _models("actor", "critic", "ref", "rew") + [f"dataset.path={DATA_DIR}/prompt-train.jsonl",
                                                        "dataset.max_prompt_len=32", "dataset.train_bs_n_seqs=8",
                                                        "ppo.gen.max_new_tokens=8", "ppo.gen.min_new_tokens=0"],
}


@pytest.mark.parametrize("exp", sorted(BASE))
def test_every_experiment_accepts_heuristic(exp):
    import realhf.experiments  # noqa: F401  (registers rw, dpo, gen, ppo)

    cfg = parse_quickstart(exp, ["experiment_name=h", "trial_name=t", "n_gpus_per_node=2",
                                 "allocation_mode=heuristic"] + BASE[exp])
    allocs = cfg.resolved_allocations()
    assert set(allocs) == set(cfg.mfc_names)
    for a in allocs.values():  # the tiny model on CPU: pure data parallelism
        assert a.parallel.model_parallel_size == 1 and a.parallel.pipeline_parallel_size == 1
    if exp != "ppo":
        assert all(a.parallel.data_parallel_size == 2 for a in allocs.values())
