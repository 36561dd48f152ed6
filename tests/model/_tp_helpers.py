"""Shared pieces of the tensor-parallel model tests: a reference model, a packed batch, cached decoding."""

from __future__ import annotations

import torch

from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.nn.real_llm_api import ReaLModel

LENGTHS = [3, 1, 12, 7]  # 23 tokens: not divisible by tp=2


def full_model(config: ReaLModelConfig, train: bool = False) -> ReaLModel:
    """The single-process reference model (weights std 0.2, seed 0)."""
    model = ReaLModel(config).instantiate()
    model.init_weights(std=0.2, seed=0)
    return model.train(train)


def packed_batch(vocab: int):
    """(ids, cu_seqlens, per-token weights for a loss) of ``LENGTHS`` sequences."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sum(LENGTHS),), generator=g)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    w = torch.randn(sum(LENGTHS), vocab, generator=g)
    return ids, cu, w


@torch.no_grad()
def cached_decode_logits(model: ReaLModel, ids: torch.Tensor, cu: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gathered logits of a prefill of ``LENGTHS`` sequences and two one-token decode steps."""
    cache = model.allocate_kv_cache(len(LENGTHS), max(LENGTHS) + 2)
    steps = [model(ids, cu, max(LENGTHS), kv_cache=cache, gather_logits=True)]
    nxt = torch.arange(len(LENGTHS)) % vocab
    one = torch.arange(len(LENGTHS) + 1)
    for _ in range(2):
        steps.append(model(nxt, one, 1, kv_cache=cache, gather_logits=True))
    return torch.cat(steps)
