"""Tests for reading and writing Hugging Face checkpoint directories."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from realhf.impl.model.conversion import hf_io


def _random_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
        "model.layers.1.self_attn.q_proj.bias": torch.randn(16, generator=g).half(),
        "model.norm.weight": torch.randn(16, generator=g),
        "lm_head.weight": torch.randn(64, 16, generator=g),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False)


# ---------------------------------------------------------------------------
# Config and auxiliary files
# ---------------------------------------------------------------------------


def test_config_round_trip(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "hidden_size": 32, "rope_theta": 10000.0}
    hf_io.save_hf_config(cfg, tmp_path / "ckpt")
    assert hf_io.read_hf_config(tmp_path / "ckpt") == cfg


def test_missing_config_names_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        hf_io.read_hf_config(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "tokenizer.json" in str(e.value)


def test_copy_aux_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "config.json", "model.safetensors"):
        (src / name).write_text(name)
    copied = hf_io.copy_hf_aux_files(src, dst)
    assert sorted(copied) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json"
    assert hf_io.copy_hf_aux_files(src, src) == []


# ---------------------------------------------------------------------------
# Save / load round trips
# ---------------------------------------------------------------------------


def test_single_file_round_trip(tmp_path: Path) -> None:
    sd = _random_state_dict()
    written = hf_io.save_hf_state_dict(sd, tmp_path / "ckpt")
    assert written == ["model.safetensors"]
    kind, files, weight_map = hf_io.list_checkpoint_files(tmp_path / "ckpt")
    assert kind == "safetensors" and weight_map is None
    assert [Path(f).name for f in files] == ["model.safetensors"]
    _assert_same(sd, hf_io.load_hf_state_dict(tmp_path / "ckpt"))
    assert sorted(hf_io.list_hf_keys(tmp_path / "ckpt")) == sorted(sd)
    # No temporary directories are left next to the checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sharded_round_trip(tmp_path: Path) -> None:
    sd = _random_state_dict()
    written = hf_io.save_hf_state_dict(sd, tmp_path / "ckpt", max_shard_bytes=3000)
    kind, files, weight_map = hf_io.list_checkpoint_files(tmp_path / "ckpt")
    assert kind == "safetensors_sharded"
    n = len(files)
    assert n > 2
    assert [Path(f).name for f in files] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors.index.json" in written
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd) == set(weight_map)
    _assert_same(sd, hf_io.load_hf_state_dict(tmp_path / "ckpt"))
    assert sorted(hf_io.list_hf_keys(tmp_path / "ckpt")) == sorted(sd)


def test_shard_size_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAL_SAVE_MAX_SHARD_SIZE_BYTE", "5000")
    hf_io.save_hf_state_dict(_random_state_dict(), tmp_path / "ckpt")
    assert hf_io.list_checkpoint_files(tmp_path / "ckpt")[0] == "safetensors_sharded"


def test_oversized_tensor_gets_own_shard(tmp_path: Path) -> None:
    sd = {"a": torch.zeros(10), "big": torch.zeros(1000), "c": torch.zeros(10)}
    hf_io.save_hf_state_dict(sd, tmp_path / "ckpt", max_shard_bytes=100)
    _, files, weight_map = hf_io.list_checkpoint_files(tmp_path / "ckpt")
    assert len(files) == 3
    assert len(set(weight_map.values())) == 3
    _assert_same(sd, hf_io.load_hf_state_dict(tmp_path / "ckpt"))


def test_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    flat = torch.arange(48, dtype=torch.float32)
    sd = {"a": flat[:24].view(4, 6), "b": flat[24:].view(6, 4).t(), "c": flat[:24].view(4, 6)}
    hf_io.save_hf_state_dict(sd, tmp_path / "ckpt")
    loaded = hf_io.load_hf_state_dict(tmp_path / "ckpt")
    for k in sd:
        assert torch.equal(loaded[k], sd[k])


def test_overwrite_switches_layout(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    hf_io.save_hf_config({"model_type": "llama"}, ckpt)
    (ckpt / "tokenizer.json").write_text("{}")
    first = _random_state_dict(0)
    hf_io.save_hf_state_dict(first, ckpt, max_shard_bytes=3000)
    second = _random_state_dict(1)
    hf_io.save_hf_state_dict(second, ckpt)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    _assert_same(second, hf_io.load_hf_state_dict(ckpt))
    third = _random_state_dict(2)
    hf_io.save_hf_state_dict(third, ckpt, max_shard_bytes=4000)
    _assert_same(third, hf_io.load_hf_state_dict(ckpt))
    assert "model.safetensors" not in {p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    old = _random_state_dict(0)
    hf_io.save_hf_state_dict(old, ckpt, max_shard_bytes=3000)
    before = sorted(p.name for p in ckpt.iterdir())

    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls: List[str] = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf_io.save_hf_state_dict(_random_state_dict(1), ckpt, max_shard_bytes=3000)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    _assert_same(old, hf_io.load_hf_state_dict(ckpt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------
# Selective loading
# ---------------------------------------------------------------------------


def _spy_safe_open(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    import safetensors

    opened: List[str] = []
    real = safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(str(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    return opened


def test_key_filter_opens_only_needed_shards(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sd = _random_state_dict()
    hf_io.save_hf_state_dict(sd, tmp_path / "ckpt", max_shard_bytes=3000)
    _, files, weight_map = hf_io.list_checkpoint_files(tmp_path / "ckpt")
    assert len(files) > 2

    opened = _spy_safe_open(monkeypatch)
    want = {"model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.bias"}
    loaded = hf_io.load_hf_state_dict(tmp_path / "ckpt", key_filter=lambda k: k in want)
    _assert_same({k: sd[k] for k in want}, loaded)
    assert sorted(opened) == sorted({weight_map[k] for k in want})
    assert len(opened) < len(files)

    opened.clear()
    assert hf_io.load_hf_state_dict(tmp_path / "ckpt", key_filter=lambda k: False) == {}
    assert opened == []


def test_key_filter_single_file_reads_only_matching(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sd = _random_state_dict()
    hf_io.save_hf_state_dict(sd, tmp_path / "ckpt")
    import safetensors

    real = safetensors.safe_open
    fetched: List[str] = []

    class Handle:
        def __init__(self, inner):
            self._inner = inner

        def __enter__(self):
            self._f = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, k):
            fetched.append(k)
            return self._f.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **kw: Handle(real(*a, **kw)))
    loaded = hf_io.load_hf_state_dict(tmp_path / "ckpt",
                                      key_filter=lambda k: k.startswith("model.layers.0."))
    expected = {k: v for k, v in sd.items() if k.startswith("model.layers.0.")}
    _assert_same(expected, loaded)
    assert sorted(fetched) == sorted(expected)


# ---------------------------------------------------------------------------
# Interoperability with transformers
# ---------------------------------------------------------------------------


def test_read_transformers_safetensors(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config())
    model.save_pretrained(tmp_path / "hf")
    assert hf_io.read_hf_config(tmp_path / "hf")["model_type"] == "llama"
    _assert_same(model.state_dict(), hf_io.load_hf_state_dict(tmp_path / "hf"))

    # Sharded output of save_pretrained.
    model.save_pretrained(tmp_path / "hf_sharded", max_shard_size=20_000)
    kind, files, _ = hf_io.list_checkpoint_files(tmp_path / "hf_sharded")
    assert kind == "safetensors_sharded" and len(files) > 1
    _assert_same(model.state_dict(), hf_io.load_hf_state_dict(tmp_path / "hf_sharded"))


def test_read_pytorch_bin(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config())
    sd = model.state_dict()
    single = tmp_path / "single"
    single.mkdir()
    torch.save(sd, single / "pytorch_model.bin")
    kind, _, weight_map = hf_io.list_checkpoint_files(single)
    assert kind == "pytorch" and weight_map is None
    _assert_same(sd, hf_io.load_hf_state_dict(single))
    loaded = hf_io.load_hf_state_dict(single, key_filter=lambda k: k.endswith("norm.weight"))
    assert set(loaded) == {k for k in sd if k.endswith("norm.weight")}

    # Sharded .bin with an index, written the way older transformers did.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, sharded / name)
        weight_map.update((k, name) for k in part)
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    kind, files, _ = hf_io.list_checkpoint_files(sharded)
    assert kind == "pytorch_sharded" and len(files) == 2
    _assert_same(sd, hf_io.load_hf_state_dict(sharded))

    loads: List[str] = []
    real_load = torch.load

    def spy(path, *a, **kw):
        loads.append(os.path.basename(str(path)))
        return real_load(path, *a, **kw)

    first_key = halves[1][0]
    import unittest.mock

    with unittest.mock.patch.object(torch, "load", spy):
        loaded = hf_io.load_hf_state_dict(sharded, key_filter=lambda k: k == first_key)
    assert list(loaded) == [first_key]
    assert loads == ["pytorch_model-00002-of-00002.bin"]


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    sd = _random_state_dict()
    hf_io.save_hf_state_dict(sd, tmp_path)
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert hf_io.list_checkpoint_files(tmp_path)[0] == "safetensors"
    _assert_same(sd, hf_io.load_hf_state_dict(tmp_path))


def test_tied_gpt2_saves(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=16,
                                       n_layer=2, n_head=2))
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    hf_io.save_hf_state_dict(sd, tmp_path / "single")
    _assert_same(sd, hf_io.load_hf_state_dict(tmp_path / "single"))
    hf_io.save_hf_state_dict(sd, tmp_path / "sharded", max_shard_bytes=8000)
    _assert_same(sd, hf_io.load_hf_state_dict(tmp_path / "sharded"))
    # The caller's tensors are untouched and still tied.
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("max_shard_bytes", [None, 30_000])
def test_saved_checkpoint_loads_in_transformers(tmp_path: Path, max_shard_bytes) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = _tiny_llama_config()
    model = LlamaForCausalLM(cfg).eval()
    hf_io.save_hf_state_dict(model.state_dict(), tmp_path / "ckpt",
                             max_shard_bytes=max_shard_bytes)
    hf_io.save_hf_config(cfg.to_dict(), tmp_path / "ckpt")
    if max_shard_bytes is not None:
        assert hf_io.list_checkpoint_files(tmp_path / "ckpt")[0] == "safetensors_sharded"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_missing_weights_lists_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.pt").write_text("")
    with pytest.raises(FileNotFoundError) as e:
        hf_io.list_checkpoint_files(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "config.json" in msg and "weights.pt" in msg
    with pytest.raises(FileNotFoundError):
        hf_io.load_hf_state_dict(tmp_path / "does_not_exist")


def test_index_with_missing_shard(tmp_path: Path) -> None:
    hf_io.save_hf_state_dict(_random_state_dict(), tmp_path / "ckpt", max_shard_bytes=3000)
    victim = sorted((tmp_path / "ckpt").glob("model-00002-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        hf_io.load_hf_state_dict(tmp_path / "ckpt")


def test_rejects_non_tensor(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        hf_io.save_hf_state_dict({"a": [1, 2]}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
