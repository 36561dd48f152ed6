"""Packed data containers, datasets and data loaders.

Variable-length data never gets padded in realhf. A batch is a
:class:`SequenceSample`: for every key one 1-D packed tensor holding the
sequences of all items back to back, plus per-item sequence lengths. Items
are the unit of data parallelism and of micro-batching, so splitting and
gathering work on whole items and never cut a sequence.

Datasets are registered by name (:func:`register_dataset`) and built with a
:class:`DatasetUtility` (seed, data-parallel rank, tokenizer). Data loaders
are registered the same way; the default ``"packed"`` loader yields gathered
``SequenceSample`` batches with a resumable, seeded order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import os
import pickle
import threading
from typing import (Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Set,
                    Tuple, Union)

import numpy as np
import torch

from realhf.api.core.config import DataLoaderAbstraction, DatasetAbstraction
from realhf.base import datapack
from realhf.base.json_records import load_rank_shard
from realhf.base.namedarray import NamedArray
from realhf.base.registry import Registry

# --------------------------------------------------------------------------- #
# Sequence-length rules of the built-in keys
# --------------------------------------------------------------------------- #
# One value per item (e.g. a scalar reward or an "ended without EOS" flag).
PER_ITEM_KEYS = frozenset([
    "seq_no_eos_mask", "greedy_seq_no_eos_mask", "loss_mask", "rewards", "greedy_rewards",
])
# One value per token.
FULL_LENGTH_KEYS = frozenset([
    "input_ids", "packed_seq", "seq", "packed_logits_mask", "logits_mask", "prompt_mask",
    "greedy_prompt_mask", "packed_input_ids", "greedy_packed_input_ids", "values", "packed_prompts",
])
# One value per next-token prediction, i.e. one fewer than the tokens.
SHIFTED_KEYS = frozenset([
    "packed_logprobs", "logprobs", "packed_ref_logprobs", "ref_logprobs", "old_logp", "ref_logp",
    "advantages", "ppo_loss_mask", "kl_rewards", "returns",
])


def default_seqlen(key: str, seqlen: int) -> int:
    """Length of ``key``'s sequence for an item with ``seqlen`` tokens."""
    if key in PER_ITEM_KEYS:
        return 1
    if key in FULL_LENGTH_KEYS:
        return seqlen
    if key in SHIFTED_KEYS:
        return seqlen - 1
    raise ValueError(
        f"Cannot infer the sequence length of key '{key}'. Known keys with length 1: "
        f"{sorted(PER_ITEM_KEYS)}; with the full length: {sorted(FULL_LENGTH_KEYS)}; "
        f"with length-1: {sorted(SHIFTED_KEYS)}. Build the SequenceSample explicitly instead."
    )


# --------------------------------------------------------------------------- #
# Validation switch
# --------------------------------------------------------------------------- #
_validation_state = threading.local()


def _validation_enabled() -> bool:
    return getattr(_validation_state, "disabled", 0) == 0


@contextlib.contextmanager
def disable_validation() -> Iterator[None]:
    """Skip ``SequenceSample`` checks in this thread (hot paths with trusted data)."""
    _validation_state.disabled = getattr(_validation_state, "disabled", 0) + 1
    try:
        yield
    finally:
        _validation_state.disabled -= 1


# --------------------------------------------------------------------------- #
# Split specification
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class SequenceSplitSpec:
    """Contiguous item ranges ``[start, end)`` to split a batch into.

    Give either ``partitions`` or ``sizes`` (or both, consistent); the other
    is derived. Partitions must start at 0 and be back to back.
    """

    partitions: Optional[List[Tuple[int, int]]] = None
    sizes: Optional[List[int]] = None

    def __post_init__(self):
        if self.partitions is None and self.sizes is None:
            raise ValueError("SequenceSplitSpec needs partitions or sizes.")
        if self.sizes is not None:
            if any(int(s) < 0 for s in self.sizes):
                raise ValueError(f"Split sizes must be >= 0, got {self.sizes}.")
            offsets = [0] + list(itertools.accumulate(int(s) for s in self.sizes))
            derived = [(offsets[i], offsets[i + 1]) for i in range(len(self.sizes))]
            if self.partitions is not None and [tuple(p) for p in self.partitions] != derived:
                raise ValueError(f"partitions {self.partitions} do not match sizes {self.sizes}.")
            self.partitions = derived
            self.sizes = [int(s) for s in self.sizes]
        else:
            self.partitions = [(int(s), int(e)) for s, e in self.partitions]
            expected_start = 0
            for i, (s, e) in enumerate(self.partitions):
                if s != expected_start or e < s:
                    raise ValueError(
                        f"Partitions must be contiguous ranges starting at 0; "
                        f"partition {i} is [{s}, {e}) in {self.partitions}."
                    )
                expected_start = e
            self.sizes = [e - s for s, e in self.partitions]
        if not self.partitions:
            raise ValueError("SequenceSplitSpec needs at least one partition.")

    @property
    def total(self) -> int:
        """Number of items covered."""
        return self.partitions[-1][1]


# --------------------------------------------------------------------------- #
# SequenceSample
# --------------------------------------------------------------------------- #
def _key_diff(name: str, got: Set[str], keys: Set[str]) -> str:
    return (f"{name} has keys {sorted(got)} but the sample's keys are {sorted(keys)} "
            f"(missing {sorted(keys - got)}, extra {sorted(got - keys)}).")


@dataclasses.dataclass(eq=False)
class SequenceSample:
    """A packed batch of items, each holding one or more sequences per key.

    ``seqlens[key][i]`` lists the lengths of the sequences of ``key`` in item
    ``i`` (a paired reward-model item holds e.g. 4 sequences). ``data[key]``
    concatenates all those sequences along dim 0, so its shape is
    ``(sum of all seqlens[key], *trailing_shapes[key])``. ``data`` is None for
    a metadata-only copy (what the master worker routes around), and single
    keys may have None data. ``metadata[name]`` has one entry per item.
    """

    keys: Set[str]
    trailing_shapes: Dict[str, Optional[Tuple[int, ...]]]
    dtypes: Dict[str, Optional[torch.dtype]]
    ids: List[Hashable]
    seqlens: Dict[str, List[List[int]]]
    data: Optional[Dict[str, Optional[torch.Tensor]]] = None
    metadata: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.keys = set(self.keys)
        self.ids = list(self.ids)
        self.trailing_shapes = {
            k: (None if v is None else tuple(int(d) for d in v)) for k, v in self.trailing_shapes.items()
        }
        if self.metadata is None:
            self.metadata = {}
        if _validation_enabled():
            self.validate()

    disable_validation = staticmethod(disable_validation)

    # ------------------------------------------------------------------ #
    # Validation
    # ------------------------------------------------------------------ #
    def validate(self) -> None:
        """Check internal consistency; errors name the offending key."""
        bs = len(self.ids)
        if len(set(self.ids)) != bs:
            seen, dups = set(), []
            for i in self.ids:
                if i in seen:
                    dups.append(i)
                seen.add(i)
            raise ValueError(f"SequenceSample ids must be unique; duplicated: {dups[:10]}.")
        for name, d in (("seqlens", self.seqlens), ("trailing_shapes", self.trailing_shapes),
                        ("dtypes", self.dtypes)):
            if set(d) != self.keys:
                raise ValueError(_key_diff(name, set(d), self.keys))
        if self.data is not None and set(self.data) != self.keys:
            raise ValueError(_key_diff("data", set(self.data), self.keys))
        for k in self.keys:
            sl = self.seqlens[k]
            if len(sl) != bs:
                raise ValueError(f"Key '{k}': seqlens has {len(sl)} items but there are {bs} ids.")
            total = 0
            for i, lens in enumerate(sl):
                if not isinstance(lens, list):
                    raise TypeError(f"Key '{k}': seqlens of item {i} must be a list of ints, got {lens!r}.")
                for n in lens:
                    if not isinstance(n, (int, np.integer)) or n < 0:
                        raise ValueError(f"Key '{k}': item {i} has invalid sequence length {n!r}.")
                    total += n
            if self.data is None or self.data[k] is None:
                continue
            t = self.data[k]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Key '{k}': data must be a torch.Tensor, got {type(t).__name__}.")
            trailing, dtype = self.trailing_shapes[k], self.dtypes[k]
            if trailing is None or dtype is None:
                raise ValueError(f"Key '{k}': has data but its trailing shape or dtype is None.")
            if tuple(t.shape) != (total, *trailing):
                raise ValueError(
                    f"Key '{k}': data shape {tuple(t.shape)} does not match "
                    f"(sum of seqlens={total}, *trailing_shape={trailing})."
                )
            if t.dtype != dtype:
                raise ValueError(f"Key '{k}': data dtype {t.dtype} does not match dtypes entry {dtype}.")
        for name, v in self.metadata.items():
            if not isinstance(v, list) or len(v) != bs:
                n = len(v) if isinstance(v, list) else type(v).__name__
                raise ValueError(f"Metadata '{name}' must be a list with one entry per item ({bs}), got {n}.")

    # ------------------------------------------------------------------ #
    # Construction
    # ------------------------------------------------------------------ #
    @classmethod
    def from_default(cls, seqlens: Sequence[int], ids: Sequence[Hashable],
                     data: Mapping[str, Optional[torch.Tensor]],
                     metadata: Optional[Dict[str, List[Any]]] = None) -> "SequenceSample":
        """Build a sample of one-sequence items from token lengths.

        Each key's per-item length follows its name (see
        :func:`default_seqlen`); unknown key names raise ValueError.
        """
        seqlens = [int(n) for n in seqlens]
        if len(seqlens) != len(ids):
            raise ValueError(f"from_default got {len(seqlens)} seqlens but {len(ids)} ids.")
        keys = set(data)
        return cls(
            keys=keys,
            trailing_shapes={k: (None if v is None else tuple(v.shape[1:])) for k, v in data.items()},
            dtypes={k: (None if v is None else v.dtype) for k, v in data.items()},
            ids=list(ids),
            seqlens={k: [[default_seqlen(k, n)] for n in seqlens] for k in keys},
            data=dict(data),
            metadata=dict(metadata or {}),
        )

    @classmethod
    def from_namedarray(cls, x: NamedArray, id: Hashable) -> "SequenceSample":
        """Turn one dataset item stored as a NamedArray into a bs=1 sample.

        Fields become keys (None fields are dropped). Sequence lengths come
        from metadata ``seqlens``: a list (or int) shared by all keys, or a
        dict keyed by field; without it every field is one sequence spanning
        its dim 0. Other metadata entries become one-entry metadata lists.
        """
        meta = dict(x.metadata)
        raw_seqlens = meta.pop("seqlens", None)
        tensors: Dict[str, torch.Tensor] = {}
        for k, v in x.items():
            if v is None:
                continue
            if isinstance(v, NamedArray):
                raise TypeError(f"Field '{k}': nested NamedArrays cannot be packed into a SequenceSample.")
            t = torch.as_tensor(v)
            tensors[k] = t.reshape(1) if t.ndim == 0 else t
        seqlens: Dict[str, List[List[int]]] = {}
        for k, t in tensors.items():
            if raw_seqlens is None:
                entry: Any = t.shape[0]
            elif isinstance(raw_seqlens, Mapping):
                if k not in raw_seqlens:
                    raise KeyError(f"Field '{k}' has no entry in the 'seqlens' metadata {list(raw_seqlens)}.")
                entry = raw_seqlens[k]
            else:
                entry = raw_seqlens
            seqlens[k] = [_as_int_list(entry, k)]
        return cls(
            keys=set(tensors),
            trailing_shapes={k: tuple(t.shape[1:]) for k, t in tensors.items()},
            dtypes={k: t.dtype for k, t in tensors.items()},
            ids=[id],
            seqlens=seqlens,
            data=tensors,
            metadata={k: [v] for k, v in meta.items()},
        )

    @classmethod
    def gather(cls, samples: Sequence["SequenceSample"],
               keys: Optional[Sequence[str]] = None) -> "SequenceSample":
        """Concatenate the items of several samples (ids must stay unique)."""
        if len(samples) == 0:
            raise ValueError("gather needs at least one SequenceSample.")
        keys = set(samples[0].keys if keys is None else keys)
        first = samples[0]
        for i, s in enumerate(samples):
            missing = keys - s.keys
            if missing:
                raise KeyError(f"Sample {i} lacks keys {sorted(missing)} (has {sorted(s.keys)}).")
            for k in keys:
                if s.trailing_shapes[k] != first.trailing_shapes[k] or s.dtypes[k] != first.dtypes[k]:
                    raise ValueError(
                        f"Key '{k}': sample {i} has trailing shape {s.trailing_shapes[k]} / dtype "
                        f"{s.dtypes[k]}, sample 0 has {first.trailing_shapes[k]} / {first.dtypes[k]}."
                    )
            if set(s.metadata) != set(first.metadata):
                raise ValueError(
                    f"Sample {i} has metadata {sorted(s.metadata)}, sample 0 has {sorted(first.metadata)}."
                )
        with_data = [s.data is not None for s in samples]
        if any(with_data) and not all(with_data):
            raise ValueError("Cannot gather samples with data together with metadata-only samples.")
        data = None
        if all(with_data):
            data = {}
            for k in keys:
                parts = [s.data[k] for s in samples]
                if all(p is None for p in parts):
                    data[k] = None
                elif any(p is None for p in parts):
                    raise ValueError(f"Key '{k}': data is None in some samples but not in others.")
                else:
                    data[k] = torch.cat(parts, dim=0)
        return cls(
            keys=keys,
            trailing_shapes={k: first.trailing_shapes[k] for k in keys},
            dtypes={k: first.dtypes[k] for k in keys},
            ids=[i for s in samples for i in s.ids],
            seqlens={k: [list(x) for s in samples for x in s.seqlens[k]] for k in keys},
            data=data,
            metadata={m: [v for s in samples for v in s.metadata[m]] for m in first.metadata},
        )

    # ------------------------------------------------------------------ #
    # Sizes
    # ------------------------------------------------------------------ #
    @property
    def bs(self) -> int:
        """Number of items."""
        return len(self.ids)

    def item_lengths(self, key: str) -> List[int]:
        """Tokens of ``key`` in each item (sum over the item's sequences)."""
        if key not in self.keys:
            raise KeyError(f"Unknown key '{key}'; keys are {sorted(self.keys)}.")
        return [sum(x) for x in self.seqlens[key]]

    def total_tokens(self, key: str) -> int:
        return sum(self.item_lengths(key))

    def _largest_key(self) -> str:
        if not self.keys:
            raise ValueError("The sample has no keys.")
        return max(sorted(self.keys), key=self.total_tokens)

    # ------------------------------------------------------------------ #
    # Splitting
    # ------------------------------------------------------------------ #
    def get_split_spec(self, k: int, key: Optional[str] = None, min_size: int = 1) -> SequenceSplitSpec:
        """Split items into ``k`` contiguous parts with balanced token counts.

        Balances the tokens of ``key`` (default: the key with the most
        tokens), minimizing the largest part.
        """
        if k < 1:
            raise ValueError(f"Number of parts must be >= 1, got {k}.")
        if k * min_size > self.bs:
            raise ValueError(f"Cannot split {self.bs} items into {k} parts of at least {min_size} items.")
        key = self._largest_key() if key is None else key
        partitions = datapack.partition_balanced(self.item_lengths(key), k, min_size=min_size)
        return SequenceSplitSpec(partitions=[tuple(p) for p in partitions])

    def split_with_spec(self, spec: SequenceSplitSpec) -> List["SequenceSample"]:
        """Cut into the item ranges of ``spec``; data are views, not copies."""
        if spec.total != self.bs:
            raise ValueError(f"Split spec covers {spec.total} items but the sample has {self.bs}.")
        offsets = {k: [0] + list(itertools.accumulate(self.item_lengths(k))) for k in self.keys}
        out = []
        for s, e in spec.partitions:
            data = None
            if self.data is not None:
                data = {k: (None if v is None else v[offsets[k][s]:offsets[k][e]]) for k, v in self.data.items()}
            out.append(SequenceSample(
                keys=set(self.keys),
                trailing_shapes=dict(self.trailing_shapes),
                dtypes=dict(self.dtypes),
                ids=self.ids[s:e],
                seqlens={k: [list(x) for x in v[s:e]] for k, v in self.seqlens.items()},
                data=data,
                metadata={m: v[s:e] for m, v in self.metadata.items()},
            ))
        return out

    def split(self, k: Any, key: Optional[str] = None, min_size: int = 1) -> List["SequenceSample"]:
        """Balanced split into ``k`` parts.

        ``k`` may also be a micro-batch spec (an object with ``n_mbs`` and
        ``max_tokens_per_mb``): then the number of parts is the smallest
        ``>= n_mbs`` whose largest part fits the token budget (or ``bs``).
        """
        if hasattr(k, "n_mbs"):
            k = self._parts_for_budget(k.n_mbs, getattr(k, "max_tokens_per_mb", None), key, min_size)
        return self.split_with_spec(self.get_split_spec(int(k), key=key, min_size=min_size))

    def _parts_for_budget(self, n_mbs: int, budget: Optional[int], key: Optional[str], min_size: int) -> int:
        n = max(1, min(int(n_mbs), self.bs // max(min_size, 1)))
        if budget is None:
            return n
        key = self._largest_key() if key is None else key
        lens = self.item_lengths(key)
        upper = self.bs // max(min_size, 1)
        while n < upper:
            parts = datapack.partition_balanced(lens, n, min_size=min_size)
            if max(sum(lens[s:e]) for s, e in parts) <= budget:
                break
            n += 1
        return n

    def unpack(self) -> List["SequenceSample"]:
        """One bs=1 sample per item."""
        return self.split_with_spec(SequenceSplitSpec(sizes=[1] * self.bs))

    # ------------------------------------------------------------------ #
    # Key manipulation
    # ------------------------------------------------------------------ #
    def select(self, keys: Sequence[str]) -> "SequenceSample":
        """A sample with a subset of keys, sharing the same tensors."""
        keys = set(keys)
        missing = keys - self.keys
        if missing:
            raise KeyError(f"Cannot select missing keys {sorted(missing)}; keys are {sorted(self.keys)}.")
        return SequenceSample(
            keys=keys,
            trailing_shapes={k: self.trailing_shapes[k] for k in keys},
            dtypes={k: self.dtypes[k] for k in keys},
            ids=list(self.ids),
            seqlens={k: [list(x) for x in self.seqlens[k]] for k in keys},
            data=None if self.data is None else {k: self.data[k] for k in keys},
            metadata={m: list(v) for m, v in self.metadata.items()},
        )

    def remap_keys_(self, remap: Mapping[str, str]) -> "SequenceSample":
        """Rename keys in place (e.g. an interface output to a graph input)."""
        missing = set(remap) - self.keys
        if missing:
            raise KeyError(f"Cannot rename missing keys {sorted(missing)}; keys are {sorted(self.keys)}.")
        new_names = [remap.get(k, k) for k in self.keys]
        if len(set(new_names)) != len(new_names):
            raise ValueError(f"Renaming {dict(remap)} makes keys collide: {sorted(new_names)}.")

        def ren(d: Dict[str, Any]) -> Dict[str, Any]:
            return {remap.get(k, k): v for k, v in d.items()}

        self.seqlens = ren(self.seqlens)
        self.trailing_shapes = ren(self.trailing_shapes)
        self.dtypes = ren(self.dtypes)
        if self.data is not None:
            self.data = ren(self.data)
        self.keys = set(new_names)
        return self

    def update_(self, other: "SequenceSample") -> "SequenceSample":
        """Add or overwrite ``other``'s keys and metadata (same ids required)."""
        if list(other.ids) != list(self.ids):
            raise ValueError(f"update_ needs identical ids in the same order: {self.ids[:8]} vs {other.ids[:8]}.")
        if self.data is None and other.data is not None:
            self.data = {k: None for k in self.keys}
        for k in other.keys:
            self.seqlens[k] = [list(x) for x in other.seqlens[k]]
            self.trailing_shapes[k] = other.trailing_shapes[k]
            self.dtypes[k] = other.dtypes[k]
            if self.data is not None:
                self.data[k] = None if other.data is None else other.data[k]
        self.keys = self.keys | other.keys
        self.metadata.update({m: list(v) for m, v in other.metadata.items()})
        if _validation_enabled():
            self.validate()
        return self

    def meta(self) -> "SequenceSample":
        """A copy without data: what is sent around for scheduling."""
        return SequenceSample(
            keys=set(self.keys),
            trailing_shapes=dict(self.trailing_shapes),
            dtypes=dict(self.dtypes),
            ids=list(self.ids),
            seqlens={k: [list(x) for x in v] for k, v in self.seqlens.items()},
            data=None,
            metadata={m: list(v) for m, v in self.metadata.items()},
        )

    # ------------------------------------------------------------------ #
    # Devices
    # ------------------------------------------------------------------ #
    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "SequenceSample":
        """A sample whose tensors live on ``device`` (self is unchanged)."""
        data = None
        if self.data is not None:
            data = {k: (None if v is None else v.to(device, non_blocking=non_blocking))
                    for k, v in self.data.items()}
        return dataclasses.replace(self, keys=set(self.keys), data=data,
                                   metadata={m: list(v) for m, v in self.metadata.items()})

    def cpu(self) -> "SequenceSample":
        return self.to("cpu")

    def cuda(self, non_blocking: bool = False) -> "SequenceSample":
        return self.to("cuda", non_blocking=non_blocking)

    def __repr__(self) -> str:
        shapes = {k: (None if self.data is None or self.data[k] is None else tuple(self.data[k].shape))
                  for k in sorted(self.keys)}
        return (f"SequenceSample(bs={self.bs}, ids={self.ids[:4]}{'...' if self.bs > 4 else ''}, "
                f"data_shapes={shapes}, metadata={sorted(self.metadata)})")


def _as_int_list(entry: Any, key: str) -> List[int]:
    if isinstance(entry, (torch.Tensor, np.ndarray)):
        entry = entry.tolist()
    if isinstance(entry, (int, np.integer)):
        return [int(entry)]
    if isinstance(entry, (list, tuple)) and all(isinstance(n, (int, np.integer)) for n in entry):
        return [int(n) for n in entry]
    raise TypeError(f"Field '{key}': seqlens must be an int or a list of ints, got {entry!r}.")


# --------------------------------------------------------------------------- #
# Worker-facing descriptions
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class DataBatchMeta:
    """What a data worker reports for one loaded batch (data stay local)."""

    dp_rank: int
    meta_sample: Optional[SequenceSample]
    epoch: int
    is_final_batch: bool


@dataclasses.dataclass
class DatasetUtility:
    """What every dataset receives: seed, its data-parallel shard and a tokenizer."""

    seed: int
    dp_rank: int
    world_size: int
    tokenizer: Any

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.world_size:
            raise ValueError(f"dp_rank {self.dp_rank} outside [0, world_size={self.world_size}).")


def load_hf_tokenizer(path: str, fast_tokenizer: bool = True, padding_side: Optional[str] = None):
    """Load a local HuggingFace tokenizer; the pad token falls back to EOS."""
    import transformers

    if not os.path.exists(path):
        raise FileNotFoundError(f"Tokenizer path '{path}' does not exist (only local paths are supported).")
    kwargs: Dict[str, Any] = {"use_fast": fast_tokenizer, "trust_remote_code": True}
    if padding_side is not None:
        kwargs["padding_side"] = padding_side
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_shuffle_split_dataset(util: DatasetUtility, dataset_path: Optional[str] = None,
                               dataset_builder: Optional[Callable[[], List[Dict[str, Any]]]] = None,
                               required: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Load a .json/.jsonl list of records, shuffle by seed, keep this rank's share.

    ``required`` maps field names to types; a bad record fails with the file,
    line and field named. Every rank gets the same number of records (the
    remainder is dropped) so that data-parallel ranks run equal steps.
    """
    records, _ = load_rank_shard(dataset_path, dataset_builder, required or {},
                                 util.seed, util.dp_rank, util.world_size)
    return records


# --------------------------------------------------------------------------- #
# Dataset registry
# --------------------------------------------------------------------------- #
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")


def register_dataset(name: str, cls: Callable[..., Any]) -> None:
    """Register ``cls(util: DatasetUtility, **args)`` under ``name``."""
    DATASETS.register(name, cls)


def make_dataset(cfg: Union[DatasetAbstraction, str], seed: int, dp_rank: int, world_size: int,
                 tokenizer_or_tokenizer_name: Any, experiment_name: Optional[str] = None,
                 trial_name: Optional[str] = None, cache_root: Optional[str] = None) -> Any:
    """Build this rank's dataset.

    With ``cache_root`` the built dataset is pickled under
    ``cache_root/experiment/trial/datasets/`` (keyed by type, arguments,
    seed and rank) and later calls load it instead of rebuilding.
    """
    if isinstance(cfg, str):
        cfg = DatasetAbstraction(cfg)
    factory = DATASETS.get(cfg.type_)
    tokenizer = tokenizer_or_tokenizer_name
    if isinstance(tokenizer, str):
        tokenizer = load_hf_tokenizer(tokenizer)

    def build():
        util = DatasetUtility(seed=seed, dp_rank=dp_rank, world_size=world_size, tokenizer=tokenizer)
        return factory(util=util, **cfg.args)

    if cache_root is None:
        return build()
    if experiment_name is None or trial_name is None:
        raise ValueError("Caching a dataset (cache_root set) needs experiment_name and trial_name.")
    fingerprint = hashlib.sha1(
        repr((sorted(cfg.args.items()), str(tokenizer_or_tokenizer_name) if isinstance(
            tokenizer_or_tokenizer_name, str) else None)).encode()
    ).hexdigest()[:16]
    cache_dir = os.path.join(cache_root, experiment_name, trial_name, "datasets", f"{cfg.type_}-{fingerprint}")
    path = os.path.join(cache_dir, f"seed{seed}-dp{dp_rank}of{world_size}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    dataset = build()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(dataset, f)
    os.replace(tmp, path)
    return dataset


# --------------------------------------------------------------------------- #
# Data loaders
# --------------------------------------------------------------------------- #
def _to_sample(item: Any, index: int) -> SequenceSample:
    if isinstance(item, SequenceSample):
        return item
    if isinstance(item, NamedArray):
        if "id" not in item.metadata:
            return SequenceSample.from_namedarray(item, id=index)
        stripped = NamedArray(**dict(item.items()))
        stripped.register_metadata(**{k: v for k, v in item.metadata.items() if k != "id"})
        return SequenceSample.from_namedarray(stripped, id=item.metadata["id"])
    raise TypeError(f"Dataset item {index} is a {type(item).__name__}; expected SequenceSample or NamedArray.")


class PackedDataLoader:
    """Yields ``SequenceSample`` batches of ``batch_size`` items, never padded.

    The item order of epoch ``e`` is a permutation seeded by ``(seed, e)``,
    so it is reproducible and differs between epochs. Iterating runs the
    rest of the current epoch and then advances to the next one;
    :meth:`state_dict` records the exact position (epoch, items consumed)
    so a restored loader continues with the very next batch.

    Items are SequenceSamples or NamedArrays. A NamedArray item gets the id
    in its ``id`` metadata, or else its dataset index; datasets sharded over
    several data-parallel ranks should set ``id`` so ids are globally unique.
    """

    def __init__(self, dataset: Any, batch_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, min_last_batch: int = 1):
        """``min_last_batch``: a trailing partial batch with fewer items is skipped (a batch
        split over ``k`` data-parallel ranks needs at least ``k`` items)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.min_last_batch = max(1, int(min_last_batch))
        self._epoch = 0
        self._offset = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning at the next iteration."""
        self._epoch = int(epoch)
        self._offset = 0

    def _num_items_per_epoch(self) -> int:
        n = len(self.dataset)
        rest = n % self.batch_size
        return n - rest if self.drop_last or rest < self.min_last_batch else n

    def items_per_epoch(self) -> int:
        """Items one epoch yields (the dataset less a skipped trailing batch)."""
        return self._num_items_per_epoch()

    def __len__(self) -> int:
        return math.ceil(self._num_items_per_epoch() / self.batch_size)

    def epoch_order(self, epoch: int) -> List[int]:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n).tolist()

    def __iter__(self) -> Iterator[SequenceSample]:
        epoch, order = self._epoch, self.epoch_order(self._epoch)
        stop = self._num_items_per_epoch()
        if self._offset >= stop:
            self._epoch, self._offset = epoch + 1, 0
            return
        while self._offset < stop and self._epoch == epoch:
            start = self._offset
            idx = order[start:min(start + self.batch_size, stop)]
            batch = SequenceSample.gather([_to_sample(self.dataset[i], i) for i in idx])
            # Advance before yielding so a state_dict taken right after this
            # batch points at the next one (the next epoch after the last).
            if start + len(idx) >= stop:
                self._epoch, self._offset = epoch + 1, 0
            else:
                self._offset = start + len(idx)
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self._epoch, "offset": self._offset, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size, "num_items": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_items"] != len(self.dataset):
            raise ValueError(f"State was saved for a dataset of {state['num_items']} items, "
                             f"this one has {len(self.dataset)}.")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self._epoch = int(state["epoch"])
        self._offset = int(state["offset"])


def packed_eval_dataloader(dataset: Any, batch_size: int = 1, **kwargs: Any) -> PackedDataLoader:
    """The packed loader in dataset order (evaluation)."""
    return PackedDataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


DATALOADERS: Registry[Callable[..., Any]] = Registry("dataloader")


def register_dataloader(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(dataset, **args)`` under ``name``."""
    DATALOADERS.register(name, factory)


def make_dataloader(name_or_cfg: Union[str, DataLoaderAbstraction], dataset: Any) -> Any:
    if isinstance(name_or_cfg, str):
        name_or_cfg = DataLoaderAbstraction(name_or_cfg)
    return DATALOADERS.make(name_or_cfg.type_, dataset, **name_or_cfg.args)


register_dataloader("packed", PackedDataLoader)
register_dataloader("packed_eval", packed_eval_dataloader)
