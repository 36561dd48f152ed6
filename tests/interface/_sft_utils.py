"""Shared pieces of the SFT interface tests: a tiny model, batches, optimizer."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch

import realhf.impl.model  # noqa: F401  (registers families)
import realhf.impl.model.interface  # noqa: F401  (registers "sft")
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import ReaLModelConfig, get_hf_family
from realhf.impl.model.backend.optim import OptimizerConfig
from realhf.impl.model.nn.real_llm_api import ReaLModel


def tiny_config(vocab_size: int = 128, n_layers: int = 3, family: str = "llama") -> ReaLModelConfig:
    # Three blocks, so that pp=2 splits blocks and not only embedding and head.
    return dataclasses.replace(get_hf_family(family).real_config_maker(), n_layers=n_layers, vocab_size=vocab_size)


def full_state(config: ReaLModelConfig, seed: int = 0, std: float = 0.2) -> Dict[str, torch.Tensor]:
    m = ReaLModel(config, tp_size=1, tp_rank=0).instantiate(init=False)
    m.init_weights(std=std, seed=seed)
    return {k: v.clone() for k, v in m.state_dict().items()}


def whole_model(config: ReaLModelConfig, sd: Dict[str, torch.Tensor]) -> ReaLModel:
    m = ReaLModel(config, tp_size=1, tp_rank=0).instantiate(init=False)
    m.load_state_dict(sd)
    return m


def sft_batch(vocab: int, lengths: Sequence[int], prompt_lens: Sequence[int], seed: int = 1,
              prefix: str = "s") -> SequenceSample:
    """Random tokens; the first ``prompt_lens[i]`` tokens of sequence i are prompt."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (sum(lengths),), generator=g)
    mask = torch.cat([torch.arange(n) < p for n, p in zip(lengths, prompt_lens)])
    return SequenceSample.from_default(list(lengths), [f"{prefix}{i}" for i in range(len(lengths))],
                                       {"packed_input_ids": toks, "prompt_mask": mask})


def items_of(sample: SequenceSample, idx: Sequence[int]) -> SequenceSample:
    items = sample.unpack()
    return SequenceSample.gather([items[i] for i in idx])


def batches(sample: SequenceSample, idx: Sequence[int], bs: int) -> List[SequenceSample]:
    idx = list(idx)
    return [items_of(sample, idx[i:i + bs]) for i in range(0, len(idx), bs)]


def hand_nll(logits: torch.Tensor, sample: SequenceSample) -> torch.Tensor:
    """Answer-token NLL summed and divided by the answer-token count, one token at a time."""
    ids, mask = sample.data["packed_input_ids"], sample.data["prompt_mask"]
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, n, start = 0.0, 0, 0
    for (L,) in sample.seqlens["packed_input_ids"]:
        for t in range(start + 1, start + L):
            if not bool(mask[t]):
                total = total - logp[t - 1, ids[t]]
                n += 1
        start += L
    return total / max(n, 1)


def optimizer(lr: float = 1e-2) -> OptimizerConfig:
    # A large eps keeps Adam's step a smooth function of the gradient, so
    # rounding noise in (near-)zero gradients is not blown up to full steps
    # and layouts can be compared at 1e-5.
    return OptimizerConfig(type="adam", lr=lr, eps=1e-3, weight_decay=0.05, lr_scheduler_type="constant",
                           warmup_steps_proportion=0.0)


def train_model(net: ReaLModel, lr: float = 1e-2, tokenizer=None, **kw):
    """A ``Model`` whose module is a training engine around ``net`` (built in the current scope)."""
    from realhf.api.core.model_api import Model
    from realhf.impl.model.backend.train_engine import TrainModule

    m = Model("default", net, tokenizer=tokenizer)
    m.module = TrainModule(net, optimizer(lr), total_steps=10, **kw)
    return m
