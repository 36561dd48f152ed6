"""Helpers shared by model interfaces.

Logits of a tensor-parallel model are sharded over the vocabulary, so the
log-probability of a label needs the vocabulary-parallel kernel and the
model's tensor-parallel group; a whole-vocabulary model uses the plain one.
:func:`packed_shifted_log_probs` picks between them from the active model
scope (and, when given, the full vocabulary size).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec, Model, ModelInterface
from realhf.base import constants
from realhf.impl.model.backend.inference import INPUT_KEY, EngineModule, packed_inputs
from realhf.impl.model.parallelism.micro_batch import split_packed_batch
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs, shifted_label_indices


def scope_tp_group() -> Optional[Any]:
    """The active model's tensor-parallel group if it has more than one rank, else ``None``."""
    if not dist.is_initialized() or not constants.in_model_scope():
        return None
    if constants.tensor_parallel_world_size() <= 1:
        return None
    return constants.tensor_parallel_group()


def packed_shifted_log_probs(
    logits: torch.Tensor,
    cu_seqlens: torch.Tensor,
    input_ids: torch.Tensor,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """``log p(input_ids[t+1] | logits[t])`` of packed sequences, shape ``[sum(L_i - 1)]``.

    Uses the vocabulary-parallel kernel over the scope's tensor-parallel group
    when logits are a vocab shard (tp > 1 and, if ``vocab_size`` is given,
    ``logits.shape[-1] != vocab_size``), the plain one otherwise.
    """
    group = scope_tp_group()
    if group is not None and (vocab_size is None or logits.shape[-1] != vocab_size):
        from realhf.impl.model.parallelism.tensor_parallel.cross_entropy import (
            vocab_parallel_packed_shifted_log_probs,
        )

        return vocab_parallel_packed_shifted_log_probs(logits, cu_seqlens, input_ids, group)
    return gather_packed_shifted_log_probs(logits, cu_seqlens, input_ids)


def loss_rows(mb: SequenceSample, mask_key: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The packed rows a shifted, masked loss reads: ``(rows, index, n)`` where ``rows``
    are the token rows whose outputs predict a position of ``mb.data[mask_key]`` that is
    True (e.g. an answer token), ``index`` those positions among the ``n`` shifted ones."""
    _, cu, _ = packed_inputs(mb)
    pred, _ = shifted_label_indices(cu)
    mask = mb.data[mask_key].to(pred.device).bool()
    index = torch.nonzero(mask).flatten()
    return pred.index_select(0, index), index, int(pred.numel())


def scatter_rows(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` placed at ``index`` of a length-``n`` vector of zeros (differentiable):
    per-row results back in the shifted layout a masked loss expects."""
    return values.new_zeros(n).index_put((index.to(values.device),), values)


def shifted_answer_mask(prompt_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Which shifted positions are trained on: the label (next token) is not a prompt token.

    ``prompt_mask`` is aligned with the packed input ids (True on prompt and
    padding tokens). Entry ``t`` of the result pairs the logits at ``t`` with
    token ``t + 1`` of the same sequence, like the shifted log-probs; the
    first token of a sequence is never a label.
    """
    _, lab = shifted_label_indices(cu_seqlens.to(prompt_mask.device))
    return prompt_mask.bool()[lab].logical_not()


def answer_token_count(mb: SequenceSample, mask_key: str = "prompt_mask") -> int:
    """Number of label tokens that are not prompt tokens in ``mb``."""
    ids, cu, _ = packed_inputs(mb)
    return int(shifted_answer_mask(mb.data[mask_key], cu).sum())


def masked_nll(
    logits: torch.Tensor,
    mb: SequenceSample,
    vocab_size: Optional[int] = None,
    mask_key: str = "prompt_mask",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token NLL as a tensor with grad, number of answer tokens)."""
    ids, cu, _ = packed_inputs(mb)
    cu = cu.to(logits.device)
    lp = packed_shifted_log_probs(logits, cu, ids.to(logits.device), vocab_size)
    mask = shifted_answer_mask(mb.data[mask_key].to(logits.device), cu)
    nll_sum = -(lp.float() * mask.float()).sum()
    return nll_sum, mask.sum()


@dataclasses.dataclass
class TrainedModelInterface(ModelInterface):
    """Options shared by interfaces of trained models that evaluate and save.

    :param hf_family: HF family used by ``save`` when the model records none.
    :param eval_n_mbs: micro-batches per evaluation batch.
    """

    hf_family: Optional[str] = None
    eval_n_mbs: int = 1

    def __post_init__(self):
        if self.eval_n_mbs < 1:
            raise ValueError(f"eval_n_mbs must be >= 1, got {self.eval_n_mbs}.")


def forward_sums(model: Model, engine: EngineModule, batches: Iterable[SequenceSample],
                 mb_spec: MicroBatchSpec, hook: Callable[[torch.Tensor, SequenceSample], torch.Tensor],
                 width: int) -> torch.Tensor:
    """Sum of ``hook(output, mb)`` (float64 [width], on CPU) over all micro-batches
    of all batches and all data-parallel ranks; the same on every rank.

    Ranks may hold different numbers of batches: the only collectives outside
    the per-batch (pipeline/tensor) forward come after the loop.
    """
    par = engine.par
    net = engine.module
    net.eval()
    totals = torch.zeros(width, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            if model.device is not None and torch.device(model.device).type != "cpu":
                batch = batch.to(model.device)
            if engine.runner is not None:
                outs = engine.runner.forward(batch, mb_spec, post_hook=hook, assemble=False)
                if par.is_last_stage:
                    for o in outs:
                        totals += o
            else:
                for mb in split_packed_batch(batch, mb_spec, key=INPUT_KEY).micro_batches:
                    ids, cu, max_seqlen = packed_inputs(mb)
                    totals += hook(net(ids, cu, max_seqlen), mb)
    if par.pp_size > 1:
        dev = getattr(net, "device", torch.device("cpu"))
        t = totals.to(dev)
        par.broadcast_from_last_stage(t)
        totals = t.cpu()
    par.all_reduce(totals, par.dp_group)
    return totals
