"""Where an engine runs: its data, tensor and pipeline parallel groups.

Engines are built inside a model scope (``constants.model_scope(name)``),
whose grid gives every group. Outside a scope (a single model on the default
process group, as in small scripts) the data-parallel group is the one given
or the world, the tensor-parallel group is the model's own, and there is no
pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List

import torch
import torch.distributed as dist

from realhf.base import constants
from realhf.impl.model.comm import global_comm


@dataclasses.dataclass
class ParallelContext:
    """This rank's groups and coordinates for one model (all ranks global)."""

    dp_group: Any = None
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: Any = None
    tp_size: int = 1
    tp_rank: int = 0
    pp_group: Any = None
    pp_ranks: List[int] = dataclasses.field(default_factory=lambda: [0])
    stage_id: int = 0

    @property
    def pp_size(self) -> int:
        return len(self.pp_ranks)

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.pp_size - 1

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()

    @classmethod
    def resolve(cls, module: torch.nn.Module, dp_group: Any = None) -> "ParallelContext":
        """From the active model scope if there is one, else from ``module`` and ``dp_group``."""
        if not dist.is_initialized():
            return cls()
        if constants.in_model_scope():
            grid = constants.grid()
            group = dp_group if dp_group is not None else grid.dp_group
            return cls(
                dp_group=group,
                dp_size=dist.get_world_size(group),
                dp_rank=dist.get_rank(group),
                tp_group=grid.tp_group,
                tp_size=len(grid.tp_ranks),
                tp_rank=grid.tp_ranks.index(grid.global_rank),
                pp_group=grid.pp_group,
                pp_ranks=list(grid.pp_ranks),
                stage_id=grid.pp_ranks.index(grid.global_rank),
            )
        tp_size = int(getattr(module, "tp_size", 1))
        tp_group = module.tp_info().group if tp_size > 1 else None
        group = dp_group if dp_group is not None else (None if tp_size > 1 else dist.group.WORLD)
        if group is None:
            return cls(tp_group=tp_group, tp_size=tp_size, tp_rank=int(getattr(module, "tp_rank", 0)),
                       pp_ranks=[dist.get_rank()])
        return cls(
            dp_group=group,
            dp_size=dist.get_world_size(group),
            dp_rank=dist.get_rank(group),
            tp_group=tp_group,
            tp_size=tp_size,
            tp_rank=int(getattr(module, "tp_rank", 0)),
            pp_ranks=[dist.get_rank()],
        )

    def all_reduce(self, t: torch.Tensor, group: Any, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce ``t`` in place over ``group`` (no-op without one).

        NCCL only reduces device tensors; host-side statistics (counts, sums
        built on the CPU) make the round trip through the current device."""
        if self.distributed and group is not None and dist.get_world_size(group) > 1:
            if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
                on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_device, op=op, group=group)
                t.copy_(on_device.cpu())
            else:
                global_comm.all_reduce(t, group, op)
        return t

    def broadcast_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Give every stage the last stage's ``t`` (same shape on all stages)."""
        if self.pp_size > 1:
            dist.broadcast(t, src=self.pp_ranks[-1], group=self.pp_group)
        return t
