"""Inference-only engine: micro-batched, gradient-free forward of a ReaLModel.

Micro-batching bounds activation memory; outputs are put back into the input
item order so callers never see how the batch was split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple

import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import FinetuneSpec, MicroBatchSpec, Model, ModelBackend, register_backend
from realhf.impl.model.parallelism.micro_batch import concat_outputs_in_order, split_packed_batch
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths

INPUT_KEY = "packed_input_ids"

PostHook = Callable[[torch.Tensor, SequenceSample], Any]


def packed_inputs(sample: SequenceSample, key: str = INPUT_KEY) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, cu_seqlens, max_seqlen) of every sequence of ``key`` in ``sample``.

    Items holding several sequences (e.g. paired answers) contribute each
    sequence separately.
    """
    if sample.data is None or sample.data.get(key) is None:
        raise ValueError(f"Sample has no data for key '{key}'.")
    lens = [n for item in sample.seqlens[key] for n in item]
    return sample.data[key], cu_seqlens_from_lengths(lens, dtype=torch.int32), max(lens, default=0)


def item_output_rows(out: torch.Tensor, mb: SequenceSample, key: str) -> List[int]:
    """Rows of ``out`` belonging to each item: per token, per shifted token, or one per item."""
    tok = [sum(s) for s in mb.seqlens[key]]
    nseq = [len(s) for s in mb.seqlens[key]]
    if out.shape[0] == sum(tok):
        return tok
    if out.shape[0] == sum(tok) - sum(nseq):
        return [t - n for t, n in zip(tok, nseq)]
    if out.shape[0] == mb.bs:
        return [1] * mb.bs
    raise ValueError(
        f"Cannot attribute {out.shape[0]} output rows to the {mb.bs} items of a micro-batch "
        f"({sum(tok)} tokens); return one row per token, per shifted token, or per item."
    )


@torch.no_grad()
def micro_batched_forward(
    module: torch.nn.Module,
    sample: SequenceSample,
    mb_spec: MicroBatchSpec,
    post_hook: Optional[PostHook] = None,
    key: str = INPUT_KEY,
) -> Any:
    """Forward each micro-batch, apply ``post_hook(logits, mb)``, restore input order.

    Tensor outputs are concatenated along dim 0 in the original item order
    (any other output type is returned as a per-micro-batch list when the
    split kept the order, which counting splits always do).
    """
    split = split_packed_batch(sample, mb_spec, key=key)
    outputs: List[Any] = []
    rows: List[List[int]] = []
    for mb in split.micro_batches:
        ids, cu, max_seqlen = packed_inputs(mb, key)
        out = module(ids, cu, max_seqlen)
        if post_hook is not None:
            out = post_hook(out, mb)
        outputs.append(out)
        if isinstance(out, torch.Tensor):
            rows.append(item_output_rows(out, mb, key))
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        if all(isinstance(o, SequenceSample) for o in outputs):
            return concat_outputs_in_order(outputs, split.backward_indices)
        if split.forward_indices != list(range(sample.bs)):
            raise ValueError("Non-tensor post_hook outputs cannot be reordered; use n_mbs without a token budget.")
        return outputs
    if split.forward_indices == list(range(sample.bs)):
        return torch.cat(outputs, dim=0)
    per_item_fwd = [n for r in rows for n in r]
    in_order = [0] * sample.bs
    for j, i in enumerate(split.forward_indices):
        in_order[i] = per_item_fwd[j]
    return concat_outputs_in_order(outputs, split.backward_indices, item_lengths=in_order)


class InferenceModule:
    """What an inference backend puts in ``Model.module``: the network plus a
    micro-batched ``forward``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def forward(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec] = None,
                post_hook: Optional[PostHook] = None) -> Any:
        self.module.eval()
        return micro_batched_forward(self.module, sample, mb_spec or MicroBatchSpec(), post_hook)

    __call__ = forward


@dataclasses.dataclass
class InferenceEngine(ModelBackend):
    """Backend for frozen models (reference, reward): no optimizer, no grads."""

    def _initialize(self, model: Model, spec: FinetuneSpec) -> Model:
        if model.module is None:
            return model
        model.module.requires_grad_(False)
        model.module = InferenceModule(model.module)
        return model


register_backend("inference", InferenceEngine)
