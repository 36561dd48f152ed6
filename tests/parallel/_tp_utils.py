"""Shared helpers for tensor-parallel tests: mesh setup and comparisons."""

import torch

from realhf.base import constants
from realhf.base.topology import ModelParallelLayout, PipeDataModelParallelTopology
from realhf.impl.model.comm import global_comm

MODEL = "tp_model"
ATOL = 1e-5
RTOL = 1e-5


def setup_tp_mesh(world_size: int, tp: int, sequence_parallel: bool = False):
    """Register a (dp = world / tp) x tp mesh and return the grid of this rank."""
    constants.reset()
    global_comm.clear_group_cache()
    topo = PipeDataModelParallelTopology(
        1, world_size // tp, tp, sequence_parallel=sequence_parallel
    )
    grids = global_comm.setup_global_comm(
        {MODEL: ModelParallelLayout(topo, list(range(world_size)))}
    )
    return grids[MODEL]


def check(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual.detach(), expected.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}"
    )


def chunk(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return x.chunk(size, dim=dim)[rank]
