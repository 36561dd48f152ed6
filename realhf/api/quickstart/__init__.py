"""Quickstart experiment configs, allocation modes and the command line.

``PPOHyperparameters`` and the configs of rw, dpo, gen and ppo are loaded
lazily (their modules import torch).
"""

import importlib
from typing import Any

from realhf.api.quickstart.allocation import (
    AllocationMode,
    check_parallel_fits,
    parse_allocation_mode,
    resolve_allocations,
)
from realhf.api.quickstart.base import ConfigError
from realhf.api.quickstart.dataset import (
    PairedComparisonDatasetConfig,
    PromptAnswerDatasetConfig,
    PromptOnlyDatasetConfig,
)
from realhf.api.quickstart.experiment import CommonExperimentConfig, ExperimentSaveEvalControl, SFTConfig
from realhf.api.quickstart.model import (
    AllocationConfig,
    LoRAConfig,
    MFCConfig,
    ModelTrainEvalConfig,
    OptimizerConfig,
    ParallelismConfig,
)

_LAZY = {
    "PPOHyperparameters": "realhf.api.quickstart.ppo",
    "RWConfig": "realhf.api.quickstart.algorithms",
    "DPOConfig": "realhf.api.quickstart.algorithms",
    "GenerationConfig": "realhf.api.quickstart.algorithms",
    "PPOConfig": "realhf.api.quickstart.algorithms",
    "GRPOConfig": "realhf.api.quickstart.grpo",
    "GRPOHyperparameters": "realhf.api.quickstart.grpo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'realhf.api.quickstart' has no attribute {name!r}")


__all__ = [
    "AllocationConfig", "AllocationMode", "CommonExperimentConfig", "ConfigError", "DPOConfig",
    "ExperimentSaveEvalControl", "GRPOConfig", "GRPOHyperparameters", "GenerationConfig", "LoRAConfig", "MFCConfig", "ModelTrainEvalConfig",
    "OptimizerConfig", "PPOConfig", "PPOHyperparameters", "PairedComparisonDatasetConfig", "ParallelismConfig",
    "PromptAnswerDatasetConfig", "PromptOnlyDatasetConfig", "RWConfig", "SFTConfig", "check_parallel_fits",
    "parse_allocation_mode", "resolve_allocations",
]
