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
from typing import Any, Callable, Dict, Optional, Union

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
    :param use_cuda_graph: capture the decoding step in a CUDA graph (GPU only).
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

__all__ = [
    "BACKENDS", "FinetuneSpec", "GenerationHyperparameters", "INTERFACES", "MODELS", "MODEL_WRAPPERS",
    "MicroBatchSpec", "Model", "ModelBackend", "ModelInterface", "ModelVersion", "NullBackend",
    "make_backend", "make_interface", "make_model", "register_backend", "register_interface",
    "register_model", "register_wrapper",
]
