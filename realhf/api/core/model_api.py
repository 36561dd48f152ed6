"""Contracts for models, backends and interfaces, and their registries.

* A :class:`Model` is what a model worker holds for one model replica: the
  module (or ``None``), its tokenizer, device and parameter version.
* A :class:`ModelBackend` turns a freshly built model into one that can run:
  it wraps the module into a training or inference engine.
* A :class:`ModelInterface` is the algorithm a model function call runs
  (``generate``, ``inference``, ``train_step``, ``evaluate``, ``save``).

All three are selected by registered names (``{type_, args}`` abstractions in
:mod:`realhf.api.core.config`), so users add their own by registering them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from realhf.api.core.config import (
    ModelAbstraction,
    ModelBackendAbstraction,
    ModelInterfaceAbstraction,
    ModelName,
    ModelWrapperAbstraction,
)
from realhf.base.registry import Registry


# --------------------------------------------------------------------------- #
# Hyperparameters shared by interfaces and engines
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class GenerationHyperparameters:
    """Sampling options for generation (PPO rollouts and the ``gen`` experiment).

    :param max_new_tokens: maximum number of generated tokens.
    :param min_new_tokens: EOS is masked until this many tokens were generated.
    :param greedy: argmax decoding (ignores temperature, top-k, top-p).
    :param top_p: nucleus sampling threshold in (0, 1].
    :param top_k: keep the k most likely tokens (>= 1).
    :param temperature: softmax temperature; 0 means greedy.
    :param use_cuda_graph: capture the decoding step in a CUDA graph; not supported (decoding runs
        eagerly), so the quickstart configs refuse True.
    :param force_cudagraph_recapture: recapture on every call, freeing the KV cache in between.
    :param force_no_logits_mask: do not return the mask of tokens removed by top-k/top-p.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 256
    greedy: bool = False
    top_p: float = 0.9
    top_k: int = 200
    temperature: float = 1.0
    use_cuda_graph: bool = False
    force_cudagraph_recapture: bool = True
    force_no_logits_mask: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.temperature == 0:
            self.greedy = True


@dataclasses.dataclass
class MicroBatchSpec:
    """How a model function call splits its batch into micro-batches.

    :param n_mbs: number of micro-batches (sequences are never split).
    :param max_tokens_per_mb: token budget of one micro-batch; when set, the
        number of micro-batches is at least what the budget requires.
    """

    n_mbs: int = 1
    max_tokens_per_mb: Optional[int] = None

    def __post_init__(self):
        if self.n_mbs < 1:
            raise ValueError(f"n_mbs must be >= 1, got {self.n_mbs}.")
        if self.max_tokens_per_mb is not None and self.max_tokens_per_mb < 1:
            raise ValueError(f"max_tokens_per_mb must be >= 1 or None, got {self.max_tokens_per_mb}.")


@dataclasses.dataclass
class ModelVersion:
    """Parameter version of a model: how many optimizer steps it has taken."""

    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0


@dataclasses.dataclass
class FinetuneSpec:
    """Training length, known once the dataset size is known.

    :param total_train_epochs: number of passes over the dataset.
    :param dataset_size: number of items (sequences or prompts) in the dataset.
    :param train_batch_size: items per training step.
    """

    total_train_epochs: int
    dataset_size: int
    train_batch_size: int

    def __post_init__(self):
        for f in ("total_train_epochs", "dataset_size", "train_batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"FinetuneSpec.{f} must be >= 1, got {getattr(self, f)}.")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.dataset_size / self.train_batch_size)

    @property
    def total_train_steps(self) -> int:
        return self.total_train_epochs * self.steps_per_epoch


# --------------------------------------------------------------------------- #
# Model, backend, interface
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Model:
    """A model replica as held by a model worker.

    ``module`` is ``None`` for models that only carry a tokenizer (e.g. a
    rule-based reward) or whose parameters live on another mesh right now.
    """

    name: ModelName
    module: Optional[torch.nn.Module]
    tokenizer: Any
    device: Union[str, torch.device] = "cpu"
    dtype: Optional[torch.dtype] = None
    version: ModelVersion = dataclasses.field(default_factory=ModelVersion)
    ft_spec: Optional[FinetuneSpec] = None

    def __post_init__(self):
        if isinstance(self.name, str):
            self.name = ModelName.parse(self.name)
        if self.dtype is None and self.module is not None:
            p = next(iter(self.module.parameters()), None)
            self.dtype = p.dtype if p is not None else torch.float32

    def inc_version(self) -> None:
        """Advance the parameter version after an optimizer step."""
        self.version.global_step += 1
        self.version.epoch_step += 1
        if self.ft_spec is not None and self.version.epoch_step >= self.ft_spec.steps_per_epoch:
            self.version.epoch_step = 0
            self.version.epoch += 1


class ModelBackend(abc.ABC):
    """Wraps a model's module into an engine (training, inference, or none)."""

    def initialize(self, model: Model, spec: FinetuneSpec) -> Model:
        model.ft_spec = spec
        return self._initialize(model, spec)

    @abc.abstractmethod
    def _initialize(self, model: Model, spec: FinetuneSpec) -> Model:
        ...

    def destroy(self, model: Model) -> None:
        """Release engine resources (optimizer states, buffers)."""

    def save(self, model: Model, save_dir: str) -> None:
        """Save engine states (optimizer, LR schedule) for recovery."""

    def load(self, model: Model, load_dir: str) -> None:
        """Load engine states saved by :meth:`save`."""


class NullBackend(ModelBackend):
    """Leaves the model as it is: for frozen rule-based or tokenizer-only models."""

    def _initialize(self, model: Model, spec: FinetuneSpec) -> Model:
        return model


@dataclasses.dataclass
class ModelInterface(abc.ABC):
    """The algorithm a model function call runs on a model.

    Subclasses are usually dataclasses whose fields are the algorithm's
    hyperparameters (they come from ``ModelInterfaceAbstraction.args``).
    ``input_`` is a ``SequenceSample`` (or a ``NamedArray`` for interfaces that
    prefer it); outputs are of the same kind. Only the methods used by the
    dataflow graph need to be implemented.
    """

    def __post_init__(self):
        pass

    def save(self, model: Model, save_dir: str) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        """The algorithm's running state that a resumed run needs (an adaptive KL coefficient, a value
        normalizer's statistics); written with the recover state. Stateless interfaces keep none."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no running state but was given {sorted(state)}.")

    def prepare_evaluation(self, model: Model, eval_dataloader: Any) -> None:
        """Called once on every rank of the model's mesh after the model is initialized
        and before any step (a baseline the later :meth:`evaluate` calls compare with)."""

    def evaluate(self, model: Model, eval_dataloader: Any) -> Dict[str, float]:
        return {}

    def inference(self, model: Model, input_: Any, mb_spec: Optional[MicroBatchSpec] = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement inference.")

    def generate(self, model: Model, input_: Any, mb_spec: Optional[MicroBatchSpec] = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement generate.")

    def train_step(self, model: Model, input_: Any, mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not implement train_step.")


# --------------------------------------------------------------------------- #
# Registries
# --------------------------------------------------------------------------- #
MODELS: Registry[Callable[..., Model]] = Registry("model")
MODEL_WRAPPERS: Registry[Callable[..., Model]] = Registry("model wrapper")
BACKENDS: Registry[type] = Registry("model backend")
INTERFACES: Registry[type] = Registry("model interface")
ITEM_FILTERS: Registry[Callable[..., Any]] = Registry("item filter")


def register_model(name: str, factory: Callable[..., Model]) -> None:
    """Register ``factory(name: ModelName, device, **args) -> Model``."""
    MODELS.register(name, factory)


def register_wrapper(name: str, wrapper: Callable[..., Model]) -> None:
    """Register ``wrapper(model: Model, **args) -> Model``."""
    MODEL_WRAPPERS.register(name, wrapper)


def register_backend(name: str, cls: type) -> None:
    BACKENDS.register(name, cls)


def register_interface(name: str, cls: type) -> None:
    INTERFACES.register(name, cls)


def register_item_filter(name: str, fn: Callable[..., Any]) -> None:
    """Register ``fn(sample: SequenceSample, **args) -> one bool per item`` (True = keep) under ``name``:
    the filter of ``MFCDef.input_filter`` (:class:`realhf.api.core.dfg.ItemFilter`)."""
    ITEM_FILTERS.register(name, fn)


def apply_item_filter(name: str, sample: Any, args: Optional[Dict[str, Any]] = None) -> List[bool]:
    """Run the registered filter ``name`` on ``sample``; one bool per item, checked."""
    keep = ITEM_FILTERS.get(name)(sample, **(args or {}))
    keep = [bool(k) for k in (keep.tolist() if isinstance(keep, torch.Tensor) else keep)]
    if len(keep) != sample.bs:
        raise ValueError(f"Item filter {name!r} returned {len(keep)} decisions for {sample.bs} items.")
    return keep


def _as(cfg: Any, cls: type) -> Any:
    return cls(cfg) if isinstance(cfg, str) else cfg


def make_model(cfg: Union[str, ModelAbstraction], name: Union[str, ModelName],
               device: Union[str, torch.device] = "cpu") -> Model:
    cfg = _as(cfg, ModelAbstraction)
    model = MODELS.make(cfg.type_, name=ModelName.parse(name), device=device, **cfg.args)
    for w in cfg.wrappers:
        w = _as(w, ModelWrapperAbstraction)
        model = MODEL_WRAPPERS.make(w.type_, model, **w.args)
    return model


def make_backend(cfg: Union[str, ModelBackendAbstraction]) -> ModelBackend:
    cfg = _as(cfg, ModelBackendAbstraction)
    return BACKENDS.make(cfg.type_, **cfg.args)


def make_interface(cfg: Union[str, ModelInterfaceAbstraction]) -> ModelInterface:
    cfg = _as(cfg, ModelInterfaceAbstraction)
    return INTERFACES.make(cfg.type_, **cfg.args)


# --------------------------------------------------------------------------- #
# Built-ins
# --------------------------------------------------------------------------- #
def _null_model(name: ModelName, device: Union[str, torch.device] = "cpu", **_: Any) -> Model:
    return Model(name=name, module=None, tokenizer=None, device=device)


def _tokenizer_model(name: ModelName, tokenizer_path: str, device: Union[str, torch.device] = "cpu") -> Model:
    """A model that is only a tokenizer: for rewards computed from decoded text."""
    from realhf.api.core.data_api import load_hf_tokenizer

    return Model(name=name, module=None, tokenizer=load_hf_tokenizer(tokenizer_path), device=device)


register_model("null", _null_model)
register_model("tokenizer", _tokenizer_model)
register_backend("null", NullBackend)


# --------------------------------------------------------------------------- #
# ReaLModel configuration and HuggingFace model families
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class ReaLMoEConfig:
    """Mixture-of-experts options of a ``mlp_type="moe"`` model (Megatron-style router)."""

    num_experts: int = 8
    top_k: int = 2
    routing_type: str = "aux_loss"  # aux_loss | sinkhorn | none
    aux_loss_coeff: float = 1e-3
    capacity_factor: Optional[float] = None
    pad_to_capacity: bool = False
    token_drop_policy: str = "probs"
    z_loss_coeff: float = 0.0
    input_jitter_eps: float = 0.0
    use_grouped_gemm: bool = False


@dataclasses.dataclass
class ReaLModelConfig:
    """Architecture of a ReaLModel: one config covers every supported family.

    Layer indices: 0 is the embedding, 1..n_layers the transformer blocks and
    n_layers + 1 the output head (vocab logits, or one scalar if ``is_critic``).

    Fields beyond the reference set: ``qk_layernorm`` (per-head RMS norm of
    queries and keys, qwen3), ``mlp_bias`` (biases of a gated MLP),
    ``rotary_scaling_extra`` (llama3 rope parameters), ``base_model_path``
    (where the weights came from, used to copy tokenizer files on save).
    """

    n_layers: int
    n_kv_heads: int
    n_q_heads: int
    hidden_dim: int
    intermediate_dim: int
    vocab_size: int
    head_dim: Optional[int] = None
    n_positions: Optional[int] = None
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu"
    scale_attn_by_inverse_layer_idx: bool = True
    scale_attn_weights: bool = True
    use_attention_bias: bool = True
    use_attn_proj_bias: bool = True
    layer_norm_type: Optional[str] = None  # None (LayerNorm) | "rms" | "gemma"
    mlp_type: Optional[str] = None  # None (plain) | "llama" (gated) | "moe"
    apply_rotary: bool = False
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    rotary_scaling: Optional[float] = None
    rotary_scaling_type: Optional[str] = None  # None | "linear" | "llama3"
    rotary_scaling_extra: Optional[Dict[str, float]] = None
    normalize_embed: bool = False
    abs_position_embedding_offset: int = 0
    do_layernorm_before: bool = True
    tied_embedding: bool = False
    sliding_window: Optional[int] = None
    # 0-based blocks that use ``sliding_window``; None: every block (Qwen applies it to some only).
    sliding_window_layers: Optional[List[int]] = None
    qk_layernorm: bool = False
    mlp_bias: bool = False
    moe: Optional[ReaLMoEConfig] = None
    is_critic: bool = False
    base_model_path: Optional[str] = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_dim // self.n_q_heads
        if self.n_q_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_q_heads={self.n_q_heads} is not a multiple of n_kv_heads={self.n_kv_heads}.")
        if self.is_critic and self.tied_embedding:
            raise ValueError("A critic has a scalar head and cannot tie it to the embedding.")
        if self.mlp_type == "moe" and self.moe is None:
            self.moe = ReaLMoEConfig()
        if isinstance(self.moe, dict):
            self.moe = ReaLMoEConfig(**self.moe)


@dataclasses.dataclass
class HFModelFamily:
    """Conversions between a HuggingFace architecture and ReaLModel.

    The state-dict converters take ``(state_dict, config)`` and must accept any
    subset of keys, because a pipeline stage only loads and saves its own layers.
    The ``*_param_names`` functions give HF key names so that a stage can read
    only the checkpoint entries it needs (``tblock_param_names(config, i)`` is
    for the 0-based block i; the last block also owns the final norm).
    """

    name: str
    hf_cls_name: str
    config_from_hf_converter: Callable[..., "ReaLModelConfig"]
    config_to_hf_converter: Callable[["ReaLModelConfig"], Any]
    sd_from_hf_converter: Callable[[Dict[str, torch.Tensor], "ReaLModelConfig"], Dict[str, torch.Tensor]]
    sd_to_hf_converter: Callable[[Dict[str, torch.Tensor], "ReaLModelConfig"], Dict[str, torch.Tensor]]
    embedding_param_names: Callable[["ReaLModelConfig"], list]
    tblock_param_names: Callable[["ReaLModelConfig", int], list]
    head_param_names: Callable[["ReaLModelConfig"], list]
    real_config_maker: Optional[Callable[[], "ReaLModelConfig"]] = None
    # Maps a key of another layout of the same architecture (e.g. the hub's
    # unprefixed gpt2 files) to the name the converters use; None: identity.
    hf_key_normalizer: Optional[Callable[[str], str]] = None

    def normalize_hf_key(self, key: str) -> str:
        return key if self.hf_key_normalizer is None else self.hf_key_normalizer(key)


HF_MODEL_FAMILIES: Registry[HFModelFamily] = Registry("HF model family")


def register_hf_family(
    name: str,
    hf_cls_name: str,
    config_from_hf_converter: Callable[..., ReaLModelConfig],
    config_to_hf_converter: Callable[[ReaLModelConfig], Any],
    sd_from_hf_converter: Callable,
    sd_to_hf_converter: Callable,
    embedding_param_names: Callable,
    tblock_param_names: Callable,
    head_param_names: Callable,
    real_config_maker: Optional[Callable[[], ReaLModelConfig]] = None,
    hf_key_normalizer: Optional[Callable[[str], str]] = None,
) -> HFModelFamily:
    """Register a family; ``name`` becomes part of method names (``from_<name>``)."""
    if not name.isidentifier():
        raise ValueError(f"HF model family name must be a Python identifier, got {name!r}.")
    family = HFModelFamily(
        name=name,
        hf_cls_name=hf_cls_name,
        config_from_hf_converter=config_from_hf_converter,
        config_to_hf_converter=config_to_hf_converter,
        sd_from_hf_converter=sd_from_hf_converter,
        sd_to_hf_converter=sd_to_hf_converter,
        embedding_param_names=embedding_param_names,
        tblock_param_names=tblock_param_names,
        head_param_names=head_param_names,
        real_config_maker=real_config_maker,
        hf_key_normalizer=hf_key_normalizer,
    )
    # Re-importing a family module re-registers the same family: allow it.
    override = name in HF_MODEL_FAMILIES and HF_MODEL_FAMILIES.get(name).hf_cls_name == hf_cls_name
    HF_MODEL_FAMILIES.register(name, family, override=override)
    return family


def get_hf_family(name: str) -> HFModelFamily:
    return HF_MODEL_FAMILIES.get(name)

__all__ = [
    "BACKENDS", "FinetuneSpec", "GenerationHyperparameters", "INTERFACES", "MODELS", "MODEL_WRAPPERS",
    "MicroBatchSpec", "Model", "ModelBackend", "ModelInterface", "ModelVersion", "NullBackend",
    "make_backend", "make_interface", "make_model", "register_backend", "register_interface",
    "register_model", "register_wrapper",
    "HF_MODEL_FAMILIES", "HFModelFamily", "ReaLMoEConfig", "ReaLModelConfig", "get_hf_family",
    "register_hf_family",
]
