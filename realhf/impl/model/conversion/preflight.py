"""Checks of a model's files in the launching process, before any worker starts.

A bad checkpoint otherwise surfaces minutes later as a traceback in some
model worker. :func:`preflight_model` reads only ``config.json``, the
tokenizer and the weight files' headers (never the tensors), and raises a
one-line :class:`~realhf.api.quickstart.base.ConfigError` that names the
role's key (``actor.path=...``), the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from realhf.api.quickstart.base import ConfigError

# Files whose presence means a directory is meant to hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "vocab.json", "vocab.txt")
_MAX_DETAIL = 300


def _one_line(e: BaseException) -> str:
    """An exception's message on one (bounded) line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


def _read_config(role: str, cfg_file: str) -> Dict[str, Any]:
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"{role}: {cfg_file} does not exist; a Hugging Face checkpoint directory needs config.json.")
    try:
        with open(cfg_file, "r", encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{role}: {cfg_file} is not valid JSON ({_one_line(e)}).") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{role}: {cfg_file} must hold a JSON object, got {type(d).__name__}.")
    return d


def _first(d: Dict[str, Any], *names: str) -> Tuple[Optional[str], Any]:
    for n in names:
        if d.get(n) is not None:
            return n, d[n]
    return None, None


def _check_heads(role: str, cfg_file: str, d: Dict[str, Any]) -> None:
    """Attention heads must split the hidden size, and KV heads the query heads."""
    hk, heads = _first(d, "num_attention_heads", "n_head")
    sk, hidden = _first(d, "hidden_size", "n_embd")
    kk, kv = _first(d, "num_key_value_heads")
    if hk is None or sk is None:
        return  # the family converter reports missing fields
    for name, value in ((hk, heads), (sk, hidden)) + (((kk, kv),) if kk else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{role}: {cfg_file}: {name}={value!r} must be a positive integer.")
    if hidden % heads != 0:
        raise ConfigError(f"{role}: {cfg_file}: {hk}={heads} does not divide {sk}={hidden}.")
    if kk is not None and heads % kv != 0:
        raise ConfigError(f"{role}: {cfg_file}: {kk}={kv} does not divide {hk}={heads}.")


def _has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)


def _check_tokenizer(role: str, path: str, tokenizer_path: Optional[str], vocab_size: int, cfg_file: str) -> None:
    """The tokenizer must load, and every token id must have an embedding row."""
    tok_dir = tokenizer_path if tokenizer_path else (path if _has_tokenizer_files(path) else None)
    if tok_dir is None:
        return
    if not os.path.isdir(tok_dir):
        raise ConfigError(f"{role}: tokenizer directory {tok_dir!r} does not exist.")
    if not _has_tokenizer_files(tok_dir):
        raise ConfigError(f"{role}: tokenizer directory {tok_dir!r} holds no tokenizer files "
                          f"(looked for {', '.join(TOKENIZER_FILES)}).")
    from realhf.api.core.data_api import load_hf_tokenizer

    try:
        tok = load_hf_tokenizer(tok_dir)
    except Exception as e:
        raise ConfigError(f"{role}: cannot load the tokenizer in {tok_dir!r} "
                          f"({type(e).__name__}: {_one_line(e)}).") from None
    n = len(tok)
    if vocab_size < n:
        raise ConfigError(f"{role}: {cfg_file}: vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({n} tokens in {tok_dir!r}); token ids >= {vocab_size} have no embedding row.")


def _has_weight_files(path: str) -> bool:
    return any(n.endswith((".safetensors", ".bin", ".index.json")) for n in os.listdir(path))


def _check_weights(role: str, family: Any, config: Any, path: str, cfg_file: str, with_head: bool) -> None:
    """Every tensor the family's converter reads is present with the shape the config implies."""
    from realhf.impl.model.conversion import hf_io
    from realhf.impl.model.nn.real_llm_hf import expected_hf_shapes

    try:
        kind, files, weight_map = hf_io.list_checkpoint_files(path)
        found = hf_io.read_tensor_shapes(path)
    except (hf_io.CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"{role}: {_one_line(e)}") from None
    found = {family.normalize_hf_key(k): v for k, v in found.items()}
    expected = expected_hf_shapes(family, config, range(config.n_layers + 2), with_head=with_head)
    index = hf_io.SAFE_INDEX_NAME if kind == hf_io.KIND_SAFE_SHARDED else hf_io.BIN_INDEX_NAME
    where = os.path.join(path, index) if weight_map is not None else files[0]
    for k, shape in expected.items():
        if k not in found:
            raise ConfigError(f"{role}: tensor {k!r} is missing from {where} "
                              f"(family {family.name!r} needs it).")
        got, file = found[k]
        if tuple(got) != tuple(shape):
            raise ConfigError(f"{role}: tensor {k!r} in {file} has shape {list(got)}, but {cfg_file} "
                              f"(family {family.name!r}) needs {list(shape)}.")


def preflight_model(
    key: str,
    family: str,
    path: str,
    *,
    is_critic: bool,
    init_from_scratch: bool,
    init_critic_from_actor: bool = False,
    tokenizer_path: Optional[str] = None,
) -> None:
    """Raise a one-line ConfigError if the model files of role ``key`` cannot be used.

    Checks config.json (heads dividing the hidden size, KV heads dividing the
    heads), the tokenizer (``tokenizer_path``, or ``path`` when it holds
    tokenizer files: it must load and fit in ``vocab_size``) and, unless
    ``init_from_scratch``, the weight files: readable safetensors headers and
    every tensor the family's converter needs, with the expected shape (a
    directory without any weight file is refused unless ``init_from_scratch``).
    """
    import realhf.api.from_hf  # noqa: F401  (registers the families)
    from realhf.api.core.model_api import get_hf_family

    role = f"{key}.path={path!r}"
    if not os.path.isdir(path):
        raise ConfigError(f"{role} is not an existing local directory.")
    cfg_file = os.path.join(path, "config.json")
    d = _read_config(role, cfg_file)
    _check_heads(role, cfg_file, d)
    fam = get_hf_family(family)
    ckpt_is_critic = is_critic and not init_critic_from_actor
    try:
        config = fam.config_from_hf_converter(d, is_critic=ckpt_is_critic)
    except Exception as e:
        raise ConfigError(f"{role}: {cfg_file} cannot be read as family {key}.type._class={family!r} "
                          f"({type(e).__name__}: {_one_line(e)}); does the family match the checkpoint?") from None
    _check_tokenizer(role, path, tokenizer_path, config.vocab_size, cfg_file)
    if init_from_scratch:
        return
    if not _has_weight_files(path):
        raise ConfigError(f"{role} holds no weight files (*.safetensors, a safetensors index or "
                          f"pytorch_model.bin); pass {key}.init_from_scratch=True to start from random weights.")
    _check_weights(role, fam, config, path, cfg_file, with_head=not init_critic_from_actor)


__all__ = ["preflight_model", "TOKENIZER_FILES"]
