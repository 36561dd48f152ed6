"""Reading and writing Hugging Face checkpoint directories.

A Hugging Face checkpoint is a directory holding ``config.json`` plus the
weights in one of four layouts (checked in this order, which is also the order
``transformers`` prefers):

* ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``,
* ``model.safetensors``,
* ``pytorch_model.bin.index.json`` + ``pytorch_model-0000k-of-0000n.bin``,
* ``pytorch_model.bin``.

Loading is selective: with a ``key_filter`` only the accepted tensors are read
and only the shard files that hold them are opened, so a pipeline stage or a
tensor-parallel rank never pays for the whole model.  Saving always writes
safetensors in the same layout ``transformers`` uses, so the output loads with
``AutoModelForCausalLM.from_pretrained``.  Files are first written to a
temporary directory next to the target and moved in afterwards (index last),
so an interrupted save never leaves a truncated file or an index that points at
missing shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]
KeyFilter = Callable[[str], bool]

CONFIG_NAME = "config.json"
SAFE_INDEX_NAME = "model.safetensors.index.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"

# Layout kinds returned by ``list_checkpoint_files``.
KIND_SAFE_SHARDED = "safetensors_sharded"
KIND_SAFE = "safetensors"
KIND_BIN_SHARDED = "pytorch_sharded"
KIND_BIN = "pytorch"

# Files that travel with a checkpoint but are not weights or the model config.
AUX_FILE_NAMES: Tuple[str, ...] = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

DEFAULT_MAX_SHARD_BYTES = int(os.environ.get("REAL_SAVE_MAX_SHARD_SIZE_BYTE", 10**10))


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and, where known, the tensor."""


def _dir_listing(path: Path) -> str:
    """Directory content for error messages, so users see what is actually there."""
    if not path.is_dir():
        return f"(directory {str(path)!r} does not exist)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names) if names else "(empty directory)"


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def read_hf_config(load_dir: PathLike) -> dict:
    """Return the parsed ``config.json`` of a checkpoint directory."""
    path = Path(load_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in checkpoint directory {str(load_dir)!r}; "
            f"found: {_dir_listing(Path(load_dir))}"
        )
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling + rename so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_hf_config(config: dict, save_dir: PathLike) -> Path:
    """Write ``config`` as ``save_dir/config.json`` (atomically)."""
    path = Path(save_dir) / CONFIG_NAME
    _atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def copy_hf_aux_files(src_dir: PathLike, dst_dir: PathLike,
                      names: Sequence[str] = AUX_FILE_NAMES) -> List[str]:
    """Copy tokenizer and generation-config files so a saved model stays usable.

    Only files that exist in ``src_dir`` are copied.  Returns the copied names.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return []
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------
# Discovering and loading weights
# ---------------------------------------------------------------------------


def _read_index(index_path: Path) -> Dict[str, str]:
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a readable JSON index ({e}).") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no 'weight_map' dictionary.")
    return dict(weight_map)


def list_checkpoint_files(
        load_dir: PathLike) -> Tuple[str, List[str], Optional[Dict[str, str]]]:
    """Find the weight files of a checkpoint.

    Returns ``(kind, files, weight_map)``: ``kind`` is one of
    ``"safetensors_sharded"``, ``"safetensors"``, ``"pytorch_sharded"`` or
    ``"pytorch"``; ``files`` are absolute paths in shard order; ``weight_map``
    maps each tensor name to its file's base name for sharded layouts and is
    ``None`` for single-file ones (every key lives in the one file).
    """
    root = Path(load_dir)
    for index_name, kind in ((SAFE_INDEX_NAME, KIND_SAFE_SHARDED),
                             (None, KIND_SAFE),
                             (BIN_INDEX_NAME, KIND_BIN_SHARDED),
                             (None, KIND_BIN)):
        if index_name is not None:
            index_path = root / index_name
            if not index_path.is_file():
                continue
            weight_map = _read_index(index_path)
            shard_names = sorted(set(weight_map.values()))
            missing = [n for n in shard_names if not (root / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index_path} refers to missing shard files {missing}; "
                    f"found in {str(load_dir)!r}: {_dir_listing(root)}"
                )
            return kind, [str(root / n) for n in shard_names], weight_map
        single = SAFE_WEIGHTS_NAME if kind == KIND_SAFE else BIN_WEIGHTS_NAME
        if (root / single).is_file():
            return kind, [str(root / single)], None
    raise FileNotFoundError(
        f"No Hugging Face weights in {str(load_dir)!r} (looked for {SAFE_INDEX_NAME}, "
        f"{SAFE_WEIGHTS_NAME}, {BIN_INDEX_NAME}, {BIN_WEIGHTS_NAME}); "
        f"found: {_dir_listing(root)}"
    )


def _torch_load(path: str) -> Dict[str, torch.Tensor]:
    """Memory-map a ``.bin`` file so unused tensors are never read from disk."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Files from the legacy (non-zip) serializer cannot be memory-mapped.
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e}).") from e


def _safe_open(path: str):
    """``safe_open`` whose failures (empty, truncated, corrupt file) name the file."""
    from safetensors import safe_open

    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the safetensors file is empty.")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e}).") from e


def read_tensor_shapes(load_dir: PathLike) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """HF key -> (shape, file) of every stored tensor, without reading tensor data.

    safetensors shapes come from the file headers; ``.bin`` files are
    memory-mapped. A key the index lists but its shard lacks raises
    :class:`CheckpointError`.
    """
    kind, files, weight_map = list_checkpoint_files(load_dir)
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for path in files:
        if kind in (KIND_SAFE, KIND_SAFE_SHARDED):
            with _safe_open(path) as f:
                try:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                except Exception as e:
                    raise CheckpointError(f"{path}: corrupt safetensors header ({e}).") from e
        else:
            shapes = {k: tuple(v.shape) for k, v in _torch_load(path).items()}
        out.update((k, (shape, path)) for k, shape in shapes.items())
    if weight_map is not None:
        root = Path(load_dir)
        for k, fname in weight_map.items():
            if k not in out or Path(out[k][1]).name != fname:
                raise CheckpointError(f"{root / fname}: tensor {k!r} listed in the index is missing from the file.")
    return out


def _load_file(path: str, kind: str,
               wanted: Optional[Iterable[str]],
               key_filter: Optional[KeyFilter]) -> Dict[str, torch.Tensor]:
    """Read from one file either the ``wanted`` keys or all keys accepted by the filter."""
    out: Dict[str, torch.Tensor] = {}
    if kind in (KIND_SAFE, KIND_SAFE_SHARDED):
        with _safe_open(path) as f:
            present = set(f.keys())
            keys = list(wanted) if wanted is not None else [
                k for k in present if key_filter is None or key_filter(k)
            ]
            for k in keys:
                if k not in present:
                    raise CheckpointError(f"{path}: tensor {k!r} listed in the index is missing from the file.")
                try:
                    out[k] = f.get_tensor(k)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {k!r} ({e}).") from e
        return out
    sd = _torch_load(path)
    keys = list(wanted) if wanted is not None else [
        k for k in sd if key_filter is None or key_filter(k)
    ]
    for k in keys:
        if k not in sd:
            raise CheckpointError(f"{path}: tensor {k!r} listed in the index is missing from the file.")
        out[k] = sd[k]
    return out


def load_hf_state_dict(load_dir: PathLike,
                       key_filter: Optional[KeyFilter] = None) -> Dict[str, torch.Tensor]:
    """Load the tensors of a checkpoint whose names ``key_filter`` accepts (all if None).

    For sharded checkpoints the index decides which files to open, so shards
    without any accepted key are never touched.  Tensors are returned on the
    CPU in their stored dtype.
    """
    kind, files, weight_map = list_checkpoint_files(load_dir)
    if weight_map is None:
        return _load_file(files[0], kind, None, key_filter)
    per_file: Dict[str, List[str]] = {}
    for key, fname in weight_map.items():
        if key_filter is None or key_filter(key):
            per_file.setdefault(fname, []).append(key)
    state_dict: Dict[str, torch.Tensor] = {}
    root = Path(load_dir)
    for fname in sorted(per_file):
        state_dict.update(_load_file(str(root / fname), kind, per_file[fname], None))
    return state_dict


def list_hf_keys(load_dir: PathLike) -> List[str]:
    """Tensor names of a checkpoint without reading tensor data where the format allows."""
    kind, files, weight_map = list_checkpoint_files(load_dir)
    if weight_map is not None:
        return list(weight_map)
    if kind == KIND_SAFE:
        with _safe_open(files[0]) as f:
            return list(f.keys())
    return list(_torch_load(files[0]))


# ---------------------------------------------------------------------------
# Saving weights
# ---------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _prepare_for_save(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors that each own their storage.

    safetensors refuses tensors that share memory (tied embeddings, views of a
    flat parameter buffer), so any tensor that is a view, non-contiguous, or
    shares its storage with an earlier tensor is copied.
    """
    seen = set()
    out: Dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"State dict entry {name!r} is a {type(t).__name__}, not a tensor.")
        t = t.detach()
        key = _storage_key(t)
        owns = (t.is_contiguous() and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        if key in seen or not owns:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(_storage_key(t))
        out[name] = t.cpu() if t.device.type != "cpu" else t
    return out


def _plan_shards(state_dict: Dict[str, torch.Tensor], max_shard_bytes: int) -> List[List[str]]:
    """Greedily group keys (in order) into shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own, as in ``transformers``.
    """
    shards: List[List[str]] = [[]]
    current = 0
    for name, t in state_dict.items():
        size = t.numel() * t.element_size()
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _is_weight_file(name: str) -> bool:
    return ((name.startswith("model") and name.endswith(".safetensors"))
            or (name.startswith("pytorch_model") and name.endswith(".bin"))
            or name in (SAFE_INDEX_NAME, BIN_INDEX_NAME))


def save_hf_state_dict(state_dict: Dict[str, torch.Tensor], save_dir: PathLike,
                       max_shard_bytes: Optional[int] = None) -> List[str]:
    """Save ``state_dict`` as a safetensors checkpoint in ``save_dir``.

    Writes ``model.safetensors`` when everything fits in ``max_shard_bytes``
    (default: ``$REAL_SAVE_MAX_SHARD_SIZE_BYTE`` or 10 GB), else numbered
    shards plus ``model.safetensors.index.json``.  Weight files of an earlier
    checkpoint in ``save_dir`` are replaced; other files are left alone.
    Returns the base names of the written files.
    """
    from safetensors.torch import save_file

    if max_shard_bytes is None:
        max_shard_bytes = int(os.environ.get("REAL_SAVE_MAX_SHARD_SIZE_BYTE",
                                             DEFAULT_MAX_SHARD_BYTES))
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    save_dir = Path(save_dir)
    tensors = _prepare_for_save(state_dict)
    shards = _plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = ([SAFE_WEIGHTS_NAME] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])

    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=save_dir.parent, prefix=f".{save_dir.name}.tmp-"))
    try:
        weight_map: Dict[str, str] = {}
        for fname, keys in zip(names, shards):
            save_file({k: tensors[k] for k in keys}, str(tmp_dir / fname),
                      metadata={"format": "pt"})
            weight_map.update((k, fname) for k in keys)
        written = list(names)
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp_dir / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            written.append(SAFE_INDEX_NAME)

        if not save_dir.exists():
            # Fresh target: a single rename publishes everything at once.
            os.rename(tmp_dir, save_dir)
            return written
        _publish_into(tmp_dir, save_dir, names, written)
        return written
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _publish_into(tmp_dir: Path, save_dir: Path, data_names: List[str],
                  written: List[str]) -> None:
    """Move finished files into an existing directory in a crash-safe order.

    Old index files go first (so no index ever points at a shard that is being
    replaced), then the new data files, then the new index, and finally stale
    weight files of the previous layout.  A crash at any point leaves either a
    complete checkpoint or one that fails to load loudly, never a silent mix.
    """
    for index_name in (SAFE_INDEX_NAME, BIN_INDEX_NAME):
        if (save_dir / index_name).exists() and index_name not in written:
            os.unlink(save_dir / index_name)
    # An old index whose name we reuse must also go before its shards change.
    if SAFE_INDEX_NAME in written and (save_dir / SAFE_INDEX_NAME).exists():
        os.unlink(save_dir / SAFE_INDEX_NAME)
    for fname in data_names:
        os.replace(tmp_dir / fname, save_dir / fname)
    for fname in written:
        if fname not in data_names:
            os.replace(tmp_dir / fname, save_dir / fname)
    keep = set(written)
    for p in save_dir.iterdir():
        if p.is_file() and _is_weight_file(p.name) and p.name not in keep:
            os.unlink(p)
