"""Worker-level configuration abstractions.

Every pluggable component (dataset, data loader, model, model wrapper, backend,
interface) is described by a ``{type_, args}`` pair: the registered name of an
implementation and the keyword arguments of its constructor. These objects are
plain data, so experiment configs can be built, inspected, rewritten (e.g. to
swap a reward model for a rule) and pickled to workers before anything heavy
is imported.
"""

from __future__ import annotations

import dataclasses
import enum
import keyword
from typing import Any, Dict, List, Optional


def _check_type_name(kind: str, type_: Any) -> None:
    if not isinstance(type_, str) or not type_:
        raise TypeError(f"{kind}.type_ must be a non-empty registered name (str), got {type_!r}.")


@dataclasses.dataclass
class _Abstraction:
    """A registered implementation name plus its constructor arguments."""

    type_: str
    args: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_type_name(type(self).__name__, self.type_)
        if self.args is None:
            self.args = {}
        if not isinstance(self.args, dict):
            raise TypeError(
                f"{type(self).__name__}.args must be a dict of constructor arguments, "
                f"got {type(self.args).__name__}."
            )


@dataclasses.dataclass
class DatasetAbstraction(_Abstraction):
    """A dataset registered with ``data_api.register_dataset``."""


@dataclasses.dataclass
class DataLoaderAbstraction(_Abstraction):
    """A data loader registered with ``data_api.register_dataloader``."""

    type_: str = "packed"


@dataclasses.dataclass
class ModelWrapperAbstraction(_Abstraction):
    """A wrapper applied to a model after construction (e.g. LoRA)."""


@dataclasses.dataclass
class ModelAbstraction(_Abstraction):
    """A model registered with ``model_api.register_model``, plus wrappers."""

    wrappers: List[ModelWrapperAbstraction] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ModelBackendAbstraction(_Abstraction):
    """A backend (training engine, inference engine, ``null``)."""


@dataclasses.dataclass
class ModelInterfaceAbstraction(_Abstraction):
    """A model interface (the algorithm run by a model function call)."""


# Short names used in experiment code and in the documented customization
# examples (``config_api.Model("tokenizer", ...)``, ``ModelBackend("null")``).
Dataset = DatasetAbstraction
DataLoader = DataLoaderAbstraction
ModelWrapper = ModelWrapperAbstraction
Model = ModelAbstraction
ModelBackend = ModelBackendAbstraction
ModelInterface = ModelInterfaceAbstraction


class ModelInterfaceType(enum.Enum):
    """What a model function call does with its model."""

    GENERATE = "generate"
    TRAIN_STEP = "train_step"
    EVALUATE = "evaluate"
    INFERENCE = "inference"


@dataclasses.dataclass(frozen=True, order=True)
class ModelName:
    """A model replica: its role (actor, critic, ref, reward, ...) and replica id.

    Calls on one role with different layouts run on different replicas of it;
    parameters are reallocated between replicas.
    """

    role: str
    replica_id: int = 0

    def __post_init__(self):
        if not isinstance(self.role, str) or not self.role:
            raise ValueError(f"ModelName.role must be a non-empty string, got {self.role!r}.")
        if "@" in self.role:
            raise ValueError(f"ModelName.role may not contain '@': {self.role!r}.")
        if not isinstance(self.replica_id, int) or self.replica_id < 0:
            raise ValueError(f"ModelName.replica_id must be an int >= 0, got {self.replica_id!r}.")

    @property
    def name(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.role}@{self.replica_id}"

    @classmethod
    def parse(cls, s: "str | ModelName") -> "ModelName":
        """Parse ``role`` or ``role@k``."""
        if isinstance(s, ModelName):
            return s
        role, _, rid = str(s).partition("@")
        return cls(role, int(rid) if rid else 0)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A model family (registered HF conversion), its size and head type.

    ``size`` (billions of parameters) only informs allocation heuristics.
    """

    _class: str
    size: int = 0
    is_critic: bool = False

    def __post_init__(self):
        if not isinstance(self._class, str) or not self._class.isidentifier() or keyword.iskeyword(self._class):
            raise ValueError(
                f"ModelFamily._class must be a valid identifier naming a registered "
                f"family (e.g. 'llama'), got {self._class!r}."
            )
        if self.size < 0:
            raise ValueError(f"ModelFamily.size must be >= 0, got {self.size}.")

    def __repr__(self) -> str:
        s = f"{self._class}-{self.size}b"
        return s + "-critic" if self.is_critic else s


@dataclasses.dataclass(frozen=True)
class ModelShardID:
    """One shard of a model replica: its (dp, tp, pp) coordinate in a topology.

    ``mp_rank`` is the tensor-parallel rank (ReaL calls the tensor axis
    "model"). ``topo`` is a ``realhf.base.topology.ProcessTopology`` with axes
    ``pipe``, ``data`` and ``model``.
    """

    model_name: ModelName
    dp_rank: int
    mp_rank: int
    pp_rank: int
    topo: Any = dataclasses.field(compare=False, hash=False)

    def __post_init__(self):
        if self.topo is not None:
            for axis, r in (("data", self.dp_rank), ("model", self.mp_rank), ("pipe", self.pp_rank)):
                dim = self.topo.get_dim(axis)
                if not 0 <= r < dim:
                    raise ValueError(f"ModelShardID: {axis} rank {r} outside [0, {dim}) for {self.model_name}.")

    @property
    def tp_rank(self) -> int:
        return self.mp_rank

    @property
    def parallelism_rank(self) -> int:
        """Rank of this shard inside its model's own process group."""
        return self.topo.get_rank(data=self.dp_rank, model=self.mp_rank, pipe=self.pp_rank)

    @classmethod
    def from_parallelism_rank(cls, model_name: ModelName, topo: Any, parallelism_rank: int) -> "ModelShardID":
        c = topo.get_coord(parallelism_rank)
        return cls(model_name=model_name, dp_rank=c.data, mp_rank=c.model, pp_rank=c.pipe, topo=topo)

    def __repr__(self) -> str:
        return f"{self.model_name}@pp{self.pp_rank:02d}@mp{self.mp_rank:02d}@dp{self.dp_rank:02d}"

    def __lt__(self, other: "ModelShardID") -> bool:
        return (self.model_name, self.dp_rank, self.mp_rank, self.pp_rank) < (
            other.model_name, other.dp_rank, other.mp_rank, other.pp_rank)


def optional_abstraction(x: Optional[_Abstraction], cls: type) -> Optional[_Abstraction]:
    """Accept a registered name where an abstraction is expected."""
    if x is None or isinstance(x, cls):
        return x
    if isinstance(x, str):
        return cls(x)
    raise TypeError(f"Expected {cls.__name__} or a registered name, got {type(x).__name__}.")
