"""Model backends: importing this package registers ``"train"``, ``"inference"`` and ``"megatron"``."""

from realhf.impl.model.backend.inference import InferenceEngine, InferenceModule, micro_batched_forward
from realhf.impl.model.backend.megatron import MegatronTrainBackend
from realhf.impl.model.backend.optim import FlatAdamW, OptimizerConfig, make_lr_lambda
from realhf.impl.model.backend.train_engine import TrainEngine, TrainModule, item_weight, token_weight

__all__ = [
    "FlatAdamW", "InferenceEngine", "InferenceModule", "MegatronTrainBackend", "OptimizerConfig", "TrainEngine", "TrainModule",
    "item_weight", "make_lr_lambda", "micro_batched_forward", "token_weight",
]
