"""Model, optimizer and parallelism configs of quickstart experiments.

Field names and defaults follow ReaLHF v0.3 (``realhf-reference.md`` section 2)
with these documented differences:

* ``ModelTrainEvalConfig.backend`` defaults to ``"train"`` (our training
  engine, which runs on CPU and GPU). ``"megatron"`` is accepted as an alias
  of the same engine (it takes the Megatron-style options: ZeRO-1
  distributed optimizer, fp16 loss scaling, gradient clipping);
  ``"deepspeed"`` is refused with a message.
* Precision: ``enable_fp16`` defaults to False and ``enable_bf16`` to None,
  meaning "automatic": bf16 on GPU, fp32 on CPU. fp16 on CPU is refused.
* ``zero_stage`` 2 is run as ZeRO-1 (the engine shards optimizer states and
  master weights); 3 is refused.

Validation lives in one ``validate(prefix)`` method per class; it raises
:class:`ConfigError` naming the dotted key, the bad value and what is allowed.
"""

import dataclasses
import difflib
import os
from typing import Any, Dict, Optional

from realhf.api.core.config import ModelFamily
from realhf.base import cpu_threads
from realhf.api.quickstart.base import (
    ConfigError,
    check_choice,
    check_positive_int,
    check_range,
    cuda_available,
    join_key,
)

OPTIMIZER_TYPES = ("adam", "empty")
LR_SCHEDULER_TYPES = ("linear", "cosine", "constant")
BACKENDS = ("train", "megatron", "deepspeed")


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule of a trainable model.

    :param type: "adam" or "empty" (the training engine always builds AdamW;
        "empty" marks a model that is not meant to be trained).
    :param lr: peak learning rate (>= 0).
    :param weight_decay: decoupled weight decay (>= 0).
    :param beta1: Adam first-moment decay, in [0, 1).
    :param beta2: Adam second-moment decay, in [0, 1).
    :param eps: Adam epsilon (> 0).
    :param min_lr_ratio: final LR of a decaying schedule as a fraction of lr, in [0, 1].
    :param lr_scheduler_type: "linear", "cosine" or "constant" after warmup.
    :param warmup_steps_proportion: fraction of all steps spent warming up, in [0, 1].
    :param offload: keep optimizer states on the host (deepspeed only; refused).
    """

    type: str = "empty"
    lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    min_lr_ratio: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_steps_proportion: float = 0.02
    offload: bool = False

    def validate(self, prefix: str = "optimizer") -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        check_choice(k("type"), self.type, OPTIMIZER_TYPES)
        check_choice(k("lr_scheduler_type"), self.lr_scheduler_type, LR_SCHEDULER_TYPES)
        check_range(k("lr"), self.lr, 0.0)
        check_range(k("weight_decay"), self.weight_decay, 0.0)
        check_range(k("beta1"), self.beta1, 0.0, 1.0, hi_open=True)
        check_range(k("beta2"), self.beta2, 0.0, 1.0, hi_open=True)
        check_range(k("eps"), self.eps, 0.0, lo_open=True)
        check_range(k("min_lr_ratio"), self.min_lr_ratio, 0.0, 1.0)
        check_range(k("warmup_steps_proportion"), self.warmup_steps_proportion, 0.0, 1.0)
        if self.offload:
            raise ConfigError(
                f"{k('offload')}=True needs the deepspeed backend, which is not available; "
                f"set {k('offload')}=False."
            )

    def to_backend(self):
        """The training engine's ``realhf.impl.model.backend.optim.OptimizerConfig`` (imports torch)."""
        from realhf.impl.model.backend import optim

        return optim.OptimizerConfig(**dataclasses.asdict(self))


@dataclasses.dataclass
class LoRAConfig:
    """LoRA adapter settings (accepted by the parser; LoRA training is not available yet)."""

    dim: int = 32
    scaling: float = 32.0


@dataclasses.dataclass
class ModelTrainEvalConfig:
    """One model of an experiment: its family, checkpoint, precision and optimizer.

    :param type: model family (``type._class`` e.g. "llama"), size in billions
        (``type.size``: 0 = unspecified; other than 0 or the default 7 it must
        match the checkpoint's parameter count, see ``checks.check_model_size``) and head
        (``type.is_critic``: scalar value head instead of the LM head).
    :param backend: "train" (default), "megatron" (alias of "train") or
        "deepspeed" (refused: not available).
    :param path: Hugging Face checkpoint directory.
    :param lora: LoRA settings or None (LoRA is not available yet; must be None).
    :param gradient_checkpointing: recompute activations in backward.
    :param enable_fp16: fp16 parameters with dynamic loss scaling (GPU only).
    :param enable_bf16: bf16 parameters; None = automatic (bf16 on GPU, fp32 on CPU).
    :param offload: offload parameters to the host (deepspeed only; refused).
    :param zero_stage: 0 = replicated optimizer; 1 or 2 = optimizer states
        sharded over data parallel ranks (2 runs as 1); 3 is refused.
    :param optimizer: optimizer and LR schedule.
    :param init_from_scratch: random initialization from the checkpoint's config
        instead of loading its weights.
    :param init_critic_from_actor: load an LM checkpoint into a critic (the
        scalar head is freshly initialized).
    """

    type: ModelFamily = dataclasses.field(default_factory=lambda: ModelFamily("llama", 7, False))
    backend: str = "train"
    path: str = ""
    lora: Optional[LoRAConfig] = None
    gradient_checkpointing: bool = True
    enable_fp16: bool = False
    enable_bf16: Optional[bool] = None
    offload: bool = False
    zero_stage: int = 2
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    init_from_scratch: bool = False
    init_critic_from_actor: bool = False

    @property
    def backend_name(self) -> str:
        """The registered backend that runs this model ("train" for both aliases)."""
        return "train"

    @property
    def dtype(self) -> str:
        """Parameter dtype name: "float16", "bfloat16" or "float32" (resolves the automatic bf16)."""
        if self.enable_fp16:
            return "float16"
        bf16 = self.enable_bf16
        if bf16 is None:
            bf16 = cuda_available()
        return "bfloat16" if bf16 else "float32"

    def validate(self, prefix: str = "model", *, check_path: bool = True) -> None:
        k = lambda name: join_key(prefix, name)  # noqa: E731
        check_family(self.type, k("type"))
        check_choice(k("backend"), self.backend, BACKENDS)
        if self.backend == "deepspeed":
            raise ConfigError(
                f"{k('backend')}='deepspeed' is not available in this implementation; use "
                f"{k('backend')}=train (our training engine, CPU and GPU; 'megatron' is an alias of it)."
            )
        if self.lora is not None:
            raise ConfigError(f"{k('lora')} is set but LoRA is not available yet; set {k('lora')}=null.")
        if self.enable_fp16 and self.enable_bf16:
            raise ConfigError(
                f"{k('enable_fp16')}=True and {k('enable_bf16')}=True are mutually exclusive; enable at most one."
            )
        if self.enable_fp16 and not cuda_available():
            raise ConfigError(
                f"{k('enable_fp16')}=True is refused on CPU (no CUDA device): fp16 is GPU-only here; "
                f"use fp32 (the CPU default) or {k('enable_bf16')}=True."
            )
        if self.offload:
            raise ConfigError(
                f"{k('offload')}=True needs the deepspeed backend, which is not available; "
                f"set {k('offload')}=False (frozen models are offloaded by MFC hooks instead)."
            )
        check_choice(k("zero_stage"), self.zero_stage, (0, 1, 2, 3))
        if self.zero_stage == 3:
            raise ConfigError(
                f"{k('zero_stage')}=3 is not supported by the '{self.backend}' backend; use 0, 1 or 2 "
                "(1 and 2 shard optimizer states over data parallel ranks)."
            )
        self.optimizer.validate(k("optimizer"))
        if self.init_critic_from_actor and not self.type.is_critic:
            raise ConfigError(
                f"{k('init_critic_from_actor')}=True needs a critic; set {k('type.is_critic')}=True."
            )
        if check_path:
            if not self.path:
                raise ConfigError(
                    f"{k('path')} is empty; set {k('path')}=<Hugging Face checkpoint directory> "
                    "(its config.json is needed even with init_from_scratch)."
                )
            if not os.path.isdir(self.path):
                raise ConfigError(f"{k('path')}={self.path!r} is not an existing local directory.")
            from realhf.api.quickstart.checks import check_model_size

            check_model_size(prefix, self)

    def backend_args(self) -> Dict[str, Any]:
        """Keyword arguments of the "train" backend (``TrainEngine``) for this model."""
        return dict(
            optimizer=self.optimizer.to_backend(),
            use_zero_optimization=self.zero_stage > 0,
            gradient_checkpointing=self.gradient_checkpointing,
        )


def check_family(family: ModelFamily, key: str = "model.type") -> None:
    """``family._class`` must name a registered Hugging Face family (imports the families)."""
    import realhf.api.from_hf  # noqa: F401  (registers the families)
    from realhf.api.core.model_api import HF_MODEL_FAMILIES

    known = HF_MODEL_FAMILIES.names()
    if family._class not in known:
        msg = f"{key}._class={family._class!r} is not a registered model family; registered: {known}."
        close = difflib.get_close_matches(family._class, known, n=1)
        if close:
            msg += f" Did you mean '{close[0]}'?"
        raise ConfigError(msg)
    check_range(f"{key}.size", family.size, 0)


def load_real_config(model: ModelTrainEvalConfig):
    """The ``ReaLModelConfig`` of ``model`` read from ``model.path/config.json``, or None if unreadable."""
    if not model.path or not os.path.isfile(os.path.join(model.path, "config.json")):
        return None
    import realhf.api.from_hf  # noqa: F401
    from realhf.api.core.model_api import get_hf_family

    family = get_hf_family(model.type._class)
    return family.config_from_hf_converter(model.path, is_critic=model.type.is_critic)


@dataclasses.dataclass(eq=False)
class ParallelismConfig:
    """3D layout of one model function call.

    :param model_parallel_size: tensor-parallel size ("m" or "t" in allocation strings).
    :param pipeline_parallel_size: number of pipeline stages.
    :param data_parallel_size: number of data-parallel replicas.
    :param use_sequence_parallel: sequence parallelism inside tensor-parallel
        groups (only meaningful when model_parallel_size > 1).

    Equality and hashing ignore ``use_sequence_parallel``: two layouts with the
    same sizes hold the same parameter shards.
    """

    model_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    use_sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.model_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def _sizes(self):
        return (self.model_parallel_size, self.pipeline_parallel_size, self.data_parallel_size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParallelismConfig):
            return NotImplemented
        return self._sizes() == other._sizes()

    def __hash__(self) -> int:
        return hash(self._sizes())

    def __str__(self) -> str:
        return (
            f"Parallel(mp={self.model_parallel_size},pp={self.pipeline_parallel_size},"
            f"dp={self.data_parallel_size})"
        )

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("model_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            check_positive_int(join_key(prefix, name), getattr(self, name))


@dataclasses.dataclass
class MFCConfig:
    """Allocation of one model function call (MFC).

    :param n_mbs: number of micro-batches (None: the runtime's default).
    :param max_tokens_per_mb: token budget of one micro-batch (None: none); the call then uses at
        least as many micro-batches as the budget needs (a sequence longer than it is an error).
    :param parallel: its 3D layout.
    :param device_mesh: where it runs: None (the whole cluster), a nodelist of
        whole nodes (``NODE[01-02]``) or ``host:i,j,...`` for devices of one node.
    :param cpu_threads: on CPU workers, the threads each worker of the call gives
        its native kernels (the decoding steps of generation), for a call whose
        mesh leaves other workers' cores idle, e.g. generation on one worker
        while the others wait for its output. None: one, the worker's own core.
        Results do not depend on it.
    """

    n_mbs: Optional[int] = None
    max_tokens_per_mb: Optional[int] = None
    parallel: ParallelismConfig = dataclasses.field(default_factory=ParallelismConfig)
    device_mesh: Optional[str] = None
    cpu_threads: Optional[int] = None

    def validate(self, prefix: str = "allocation") -> None:
        check_positive_int(join_key(prefix, "n_mbs"), self.n_mbs, allow_none=True)
        check_positive_int(join_key(prefix, "cpu_threads"), self.cpu_threads, allow_none=True)
        if self.cpu_threads is not None and self.cpu_threads > cpu_threads.MAX_THREADS:
            raise ConfigError(f"{join_key(prefix, 'cpu_threads')}={self.cpu_threads} is not allowed; it must be at "
                              f"most {cpu_threads.MAX_THREADS}.")
        check_positive_int(join_key(prefix, "max_tokens_per_mb"), self.max_tokens_per_mb, allow_none=True)
        self.parallel.validate(join_key(prefix, "parallel"))


# The contract's name for the per-MFC allocation (ReaLHF v0.3 calls it MFCConfig).
AllocationConfig = MFCConfig

__all__ = [
    "AllocationConfig", "LoRAConfig", "MFCConfig", "ModelTrainEvalConfig", "OptimizerConfig",
    "ParallelismConfig", "check_family", "load_real_config",
]
