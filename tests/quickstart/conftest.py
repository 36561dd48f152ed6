import json

import pytest

from realhf.api.quickstart import base as qs_base
from realhf.assets import dataset_path

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


@pytest.fixture(autouse=True)
def force_cpu(monkeypatch):
    """Behave as on a CPU-only machine (fp16 refused) even where a GPU exists."""
    monkeypatch.setenv("REAL_FORCE_CPU", "1")
    qs_base.cuda_available.cache_clear()
    yield
    qs_base.cuda_available.cache_clear()


@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


@pytest.fixture
def good_overrides(tiny_model_dir):
    """A valid SFT command line on 2 CPU workers."""
    return [
        "experiment_name=qs-test",
        "trial_name=t1",
        f"model.path={tiny_model_dir}",
        "model.init_from_scratch=True",  # the directory holds a config only
        f"dataset.train_path={dataset_path('sft-train')}",
        f"dataset.valid_path={dataset_path('sft-valid')}",
        "n_gpus_per_node=2",
        "allocation_mode=d2p1m1",
    ]
