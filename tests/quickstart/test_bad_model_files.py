"""Bad model files fail at parse time with one line naming the role, the file and the problem."""

import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import realhf
from realhf.api.quickstart import ConfigError
from realhf.api.quickstart.entrypoint import main
from realhf.assets import ASSETS_DIR, dataset_path, tokenizer_path
from realhf.impl.model.conversion.hf_io import CheckpointError
from realhf.impl.model.conversion.preflight import preflight_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(realhf.__file__)))
TINY = os.path.join(ASSETS_DIR, "models", "tiny-llama")
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    """tiny-llama's config and tokenizer plus weights written by transformers."""
    d = tmp_path_factory.mktemp("good") / "ckpt"
    shutil.copytree(TINY, d)
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.from_pretrained(d)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


@pytest.fixture
def ckpt(good_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, d)
    return d


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def _truncate(d):
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


# id -> (corruption, substrings of the error line)
CASES = {
    "heads-not-dividing-hidden": (lambda d: _edit_config(d, num_attention_heads=3),
                                  ["num_attention_heads=3 does not divide hidden_size=128", "config.json"]),
    "kv-heads-not-dividing-heads": (lambda d: _edit_config(d, num_key_value_heads=3),
                                    ["num_key_value_heads=3 does not divide num_attention_heads=4"]),
    "vocab-smaller-than-tokenizer": (lambda d: _edit_config(d, vocab_size=1000),
                                     ["vocab_size=1000", "4096 tokens", "config.json"]),
    "truncated-safetensors": (_truncate, ["model.safetensors", "truncated"]),
    "empty-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b""), ["model.safetensors", "empty"]),
    "garbage-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"),
                            ["model.safetensors", "corrupt"]),
    "missing-tensor": (lambda d: _edit_weights(d, lambda sd: sd.pop(UP)), [repr(UP), "missing", "model.safetensors"]),
    "misshaped-tensor": (lambda d: _edit_weights(d, lambda sd: sd.update({UP: torch.zeros(256, 64)})),
                         [repr(UP), "model.safetensors", "[256, 64]", "[256, 128]"]),
    "corrupt-tokenizer": (lambda d: (d / "tokenizer.json").write_text("{broken"), ["cannot load the tokenizer"]),
    "bad-config-json": (lambda d: (d / "config.json").write_text("{"), ["config.json", "not valid JSON"]),
    "no-weight-files": (lambda d: (d / "model.safetensors").unlink(),
                        ["holds no weight files", "model.init_from_scratch=True"]),
}


def _overrides(path):
    return ["experiment_name=bad-files", "trial_name=t1", f"model.path={path}",
            f"dataset.train_path={dataset_path('sft-train')}", f"dataset.valid_path={dataset_path('sft-valid')}",
            "n_gpus_per_node=1", "allocation_mode=d1p1m1"]


@pytest.fixture
def no_launch(monkeypatch):
    """A launcher that records instead of starting workers."""
    started = []
    mod = types.ModuleType("realhf.apps.main")
    mod.main_start = lambda cfg: started.append(cfg)
    monkeypatch.setitem(sys.modules, "realhf.apps.main", mod)
    return started


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_file_fails_before_launch(case, ckpt, no_launch, capsys):
    corrupt, needles = CASES[case]
    corrupt(ckpt)
    assert main(["sft", *_overrides(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"model.path='{ckpt}'" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not no_launch


def test_good_checkpoint_passes_preflight(ckpt, no_launch):
    assert main(["sft", *_overrides(ckpt)]) == 0
    assert len(no_launch) == 1


def test_init_from_scratch_checks_only_config_and_tokenizer(ckpt):
    _truncate(ckpt)
    preflight_model("model", "llama", str(ckpt), is_critic=False, init_from_scratch=True)
    _edit_config(ckpt, vocab_size=10)
    with pytest.raises(ConfigError, match="vocab_size=10"):
        preflight_model("model", "llama", str(ckpt), is_critic=False, init_from_scratch=True)


def test_tokenizer_path_without_tokenizer(ckpt, tmp_path):
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer files"):
        preflight_model("actor", "llama", str(ckpt), is_critic=False, init_from_scratch=False,
                        tokenizer_path=str(empty))
    preflight_model("actor", "llama", str(ckpt), is_critic=False, init_from_scratch=False,
                    tokenizer_path=tokenizer_path())


def test_critic_from_actor_needs_no_head(ckpt):
    _edit_weights(ckpt, lambda sd: sd.pop("lm_head.weight"))
    preflight_model("critic", "llama", str(ckpt), is_critic=True, init_from_scratch=False,
                    init_critic_from_actor=True)
    with pytest.raises(ConfigError) as e:
        preflight_model("actor", "llama", str(ckpt), is_critic=False, init_from_scratch=False)
    assert "actor.path=" in str(e.value) and "'lm_head.weight' is missing" in str(e.value)


def test_sharded_index_pointing_at_missing_tensor(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    os.unlink(ckpt / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks if k != UP}, str(ckpt / name), metadata={"format": "pt"})
    weight_map = {k: n for n, ks in shards.items() for k in ks}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError) as e:
        preflight_model("ref", "llama", str(ckpt), is_critic=False, init_from_scratch=False)
    assert "ref.path=" in str(e.value) and repr(UP) in str(e.value) and weight_map[UP] in str(e.value)


@pytest.mark.parametrize("family,cfg", [
    ("gpt2", transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)),
    ("qwen2", transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                       tie_word_embeddings=True)),
    ("mixtral", transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                           num_local_experts=4, num_experts_per_tok=2)),
])
def test_valid_checkpoints_of_other_families_pass(family, cfg, tmp_path):
    from realhf.api.core.model_api import get_hf_family

    cfg.architectures = [get_hf_family(family).hf_cls_name]
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    preflight_model("model", family, str(tmp_path), is_critic=False, init_from_scratch=False)


# ---------------------------------------------------------------------------- worker side
def test_worker_loader_names_file_and_key(ckpt):
    """A file that changes after launch still fails with the file and the HF key named."""
    from realhf.impl.model.nn.real_llm_hf import load_from_hf

    _edit_weights(ckpt, lambda sd: sd.pop(UP))
    with pytest.raises(CheckpointError) as e:
        load_from_hf("llama", str(ckpt))
    assert repr(UP) in str(e.value) and "model.safetensors" in str(e.value)
    _edit_weights(ckpt, lambda sd: sd.update({UP: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"has shape \[3, 3\]"):
        load_from_hf("llama", str(ckpt))
    _truncate(ckpt)
    with pytest.raises(CheckpointError) as e:
        load_from_hf("llama", str(ckpt))
    assert str(ckpt / "model.safetensors") in str(e.value) and "truncated" in str(e.value)


# ---------------------------------------------------------------------------- the real command line
def _cli(args):
    env = dict(os.environ, REAL_FORCE_CPU="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "realhf.apps.quickstart", "sft", *args], capture_output=True,
                       text=True, cwd=REPO_ROOT, env=env, timeout=120)
    return p, time.monotonic() - t0


@pytest.mark.parametrize("case", ["truncated-safetensors",
                                  pytest.param("missing-tensor", marks=pytest.mark.slow),
                                  pytest.param("corrupt-tokenizer", marks=pytest.mark.slow)])
def test_cli_exit_2_one_line(case, ckpt):
    corrupt, needles = CASES[case]
    corrupt(ckpt)
    p, dt = _cli(_overrides(ckpt))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("error: ") and f"model.path='{ckpt}'" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "worker" not in p.stdout.lower()
    assert dt < 60, dt  # parsing and header reads only
