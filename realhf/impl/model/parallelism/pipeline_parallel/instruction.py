"""Pipeline instructions: the unit of work one stage executes in one step.

Schedules emit instructions; an engine dispatches them by type. Each
instruction carries where it runs (``stage_id``), which micro-batch it
touches (``micro_batch_id``) and when (``step_id``). They encode to short
strings such as ``"ForwardPass(stage_id=0,micro_batch_id=3,step_id=5)"`` so
schedules can be logged, compared and shipped between processes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Type, TypeVar

T = TypeVar("T", bound="PipeInstruction")

# Name -> class; filled by ``register_instruction``.
INSTRUCTION_REGISTRY: Dict[str, Type["PipeInstruction"]] = {}

_ENCODED = re.compile(
    r"^\s*(?P<name>[A-Za-z_]\w*)\(\s*stage_id=(?P<stage>-?\d+)\s*,"
    r"\s*micro_batch_id=(?P<mb>-?\d+)\s*,\s*step_id=(?P<step>-?\d+)\s*\)\s*$"
)


def register_instruction(cls: Type[T]) -> Type[T]:
    """Make ``cls`` decodable by its class name."""
    name = cls.__name__
    if name in INSTRUCTION_REGISTRY and INSTRUCTION_REGISTRY[name] is not cls:
        raise ValueError(f"Pipeline instruction {name!r} is already registered.")
    INSTRUCTION_REGISTRY[name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class PipeInstruction:
    """Base instruction; frozen so instances can be hashed and compared."""

    stage_id: int
    micro_batch_id: int
    step_id: int

    @property
    def name(self) -> str:
        return type(self).__name__

    def encode(self) -> str:
        """Compact string form, inverse of :func:`decode_instruction`."""
        return (
            f"{self.name}(stage_id={self.stage_id},"
            f"micro_batch_id={self.micro_batch_id},step_id={self.step_id})"
        )

    def __str__(self) -> str:
        return self.encode()


@register_instruction
@dataclasses.dataclass(frozen=True)
class ForwardPass(PipeInstruction):
    """Run this stage's layers on the micro-batch's input buffer."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class BackwardPass(PipeInstruction):
    """Back-propagate the micro-batch's output gradient through this stage."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class SendActivation(PipeInstruction):
    """Send the micro-batch's output activation to the next stage."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class RecvActivation(PipeInstruction):
    """Receive the micro-batch's input activation from the previous stage."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class SendGrad(PipeInstruction):
    """Send the gradient of the micro-batch's input to the previous stage."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class RecvGrad(PipeInstruction):
    """Receive the gradient of the micro-batch's output from the next stage."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class SendNextTokens(PipeInstruction):
    """Last stage: send sampled tokens (and termination flags) to stage 0."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class RecvNextTokens(PipeInstruction):
    """First stage: receive the tokens sampled by the last stage."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class ReduceGrads(PipeInstruction):
    """All-reduce gradients across data-parallel replicas after the last backward."""


@register_instruction
@dataclasses.dataclass(frozen=True)
class OptimizerStep(PipeInstruction):
    """Apply the optimizer once all gradients are reduced."""


def decode_instruction(text: str) -> PipeInstruction:
    """Parse the output of :meth:`PipeInstruction.encode`."""
    m = _ENCODED.match(text)
    if m is None:
        raise ValueError(f"Malformed pipeline instruction string: {text!r}.")
    name = m.group("name")
    if name not in INSTRUCTION_REGISTRY:
        raise ValueError(
            f"Unknown pipeline instruction {name!r}; known: {sorted(INSTRUCTION_REGISTRY)}."
        )
    return INSTRUCTION_REGISTRY[name](
        stage_id=int(m.group("stage")),
        micro_batch_id=int(m.group("mb")),
        step_id=int(m.group("step")),
    )


def make_instruction(name: str, stage_id: int, micro_batch_id: int, step_id: int) -> PipeInstruction:
    """Build a registered instruction by class name."""
    if name not in INSTRUCTION_REGISTRY:
        raise ValueError(
            f"Unknown pipeline instruction {name!r}; known: {sorted(INSTRUCTION_REGISTRY)}."
        )
    return INSTRUCTION_REGISTRY[name](stage_id, micro_batch_id, step_id)
