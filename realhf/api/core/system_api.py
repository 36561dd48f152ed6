"""System-level configuration: what each worker runs.

The full experiment description (workers, shards, model function calls) is
built on top of these names; this module re-exports the component
abstractions under the short names used in experiment code.
"""

from realhf.api.core.config import (  # noqa: F401  (re-exported API)
    DataLoader,
    DataLoaderAbstraction,
    Dataset,
    DatasetAbstraction,
    Model,
    ModelAbstraction,
    ModelBackend,
    ModelBackendAbstraction,
    ModelInterface,
    ModelInterfaceAbstraction,
    ModelName,
    ModelShardID,
)

__all__ = [
    "DataLoader", "DataLoaderAbstraction", "Dataset", "DatasetAbstraction", "Model", "ModelAbstraction",
    "ModelBackend", "ModelBackendAbstraction", "ModelInterface", "ModelInterfaceAbstraction", "ModelName",
    "ModelShardID",
]
