"""realhf: RLHF and RL training of LLMs with parameter reallocation.

The user-facing names are exported lazily: ``import realhf`` stays cheap (no
torch import) and a name's module is imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

from realhf.version import __version__

# public name -> module that defines it
_EXPORTS: Dict[str, str] = {
    "ModelName": "realhf.api.core.config",
    "ModelShardID": "realhf.api.core.config",
    "ModelFamily": "realhf.api.core.config",
    "ModelInterfaceType": "realhf.api.core.config",
    "ModelInterface": "realhf.api.core.model_api",
    "ModelBackend": "realhf.api.core.model_api",
    "Model": "realhf.api.core.model_api",
    "FinetuneSpec": "realhf.api.core.model_api",
    "GenerationHyperparameters": "realhf.api.core.model_api",
    "MicroBatchSpec": "realhf.api.core.model_api",
    "ReaLModelConfig": "realhf.api.core.model_api",
    "SequenceSample": "realhf.api.core.data_api",
    "NamedArray": "realhf.base.namedarray",
    "MFCDef": "realhf.api.core.dfg",
    # quickstart experiments: each config class is the registered experiment
    # (its initial_setup() builds the ExperimentConfig)
    "CommonExperimentConfig": "realhf.api.quickstart.experiment",
    "ExperimentSaveEvalControl": "realhf.api.quickstart.experiment",
    "SFTConfig": "realhf.api.quickstart.experiment",
    "RWConfig": "realhf.api.quickstart.algorithms",
    "DPOConfig": "realhf.api.quickstart.algorithms",
    "GenerationConfig": "realhf.api.quickstart.algorithms",
    "PPOConfig": "realhf.api.quickstart.algorithms",
    "PPOHyperparameters": "realhf.api.quickstart.ppo",
    "GRPOConfig": "realhf.api.quickstart.grpo",
    "GRPOHyperparameters": "realhf.api.quickstart.grpo",
    "ModelTrainEvalConfig": "realhf.api.quickstart.model",
    "OptimizerConfig": "realhf.api.quickstart.model",
    "ParallelismConfig": "realhf.api.quickstart.model",
    "AllocationConfig": "realhf.api.quickstart.model",
    "MFCConfig": "realhf.api.quickstart.model",
    "LoRAConfig": "realhf.api.quickstart.model",
    "PromptAnswerDatasetConfig": "realhf.api.quickstart.dataset",
    "PairedComparisonDatasetConfig": "realhf.api.quickstart.dataset",
    "PromptOnlyDatasetConfig": "realhf.api.quickstart.dataset",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'realhf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["__version__", *_EXPORTS]
