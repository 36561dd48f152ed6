"""Hooks a model function call (MFC) carries around its execution.

A trainable role is instantiated only on its train replica; a call of that
role on another layout first pulls the parameters into its own replica
(``ParamReallocHook(source=train replica)``) and gives them back afterwards
(``ParamReallocHook(target=train replica)``: the optimizer keeps the train
replica's tensors, so "back" only drops the copy). Frozen roles whose meshes
are shared with other calls free their memory after each call
(``OffloadHook``). A custom hook ``ParamReallocHook(target=ref, eta=...)``
after the actor's train call makes a reference model trail the actor by EMA.

The master worker attaches the hooks as pre- or post-hooks of a call; model
workers execute them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from realhf.api.core.config import ModelName


def _as_model_name(value: Union[None, str, ModelName], field: str) -> Optional[ModelName]:
    if value is None or isinstance(value, ModelName):
        return value
    if isinstance(value, str):
        return ModelName.parse(value)
    raise TypeError(f"ParamReallocHook.{field} must be a ModelName or 'role@replica', got {type(value).__name__}.")


@dataclasses.dataclass(frozen=True)
class ParamReallocHook:
    """Move parameters between the call's model and another replica.

    Exactly one of ``source`` (pull from it before/after the call into the
    call's model) and ``target`` (push the call's model into it) is set.
    ``eta`` < 1 blends instead of copying: ``target = eta * source + (1 - eta) * target``.
    """

    source: Optional[ModelName] = None
    target: Optional[ModelName] = None
    eta: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "source", _as_model_name(self.source, "source"))
        object.__setattr__(self, "target", _as_model_name(self.target, "target"))
        if (self.source is None) == (self.target is None):
            raise ValueError("ParamReallocHook needs exactly one of source= and target=.")
        if not 0.0 < float(self.eta) <= 1.0:
            raise ValueError(f"ParamReallocHook.eta must be in (0, 1], got {self.eta}.")


@dataclasses.dataclass(frozen=True)
class OffloadHook:
    """Release the call's model parameter memory after the call; the next call reloads it."""


RPCHook = Union[ParamReallocHook, OffloadHook]
