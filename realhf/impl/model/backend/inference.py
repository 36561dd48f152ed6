"""Inference-only engine: micro-batched, gradient-free forward and generation.

Micro-batching bounds activation memory; outputs are put back into the input
item order so callers never see how the batch was split. With pipeline
parallelism the same calls run the pipeline schedules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Tuple, Union

import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import (
    FinetuneSpec,
    GenerationHyperparameters,
    MicroBatchSpec,
    Model,
    ModelBackend,
    register_backend,
)
from realhf.impl.model.parallelism.micro_batch import assemble_outputs, split_packed_batch
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


def without_unread_last_tokens(module: torch.nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                               rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(input_ids, cu_seqlens, max_seqlen, output_rows) of the same forward without the last
    token of each sequence, when no output row is one: in a causal model no other token
    attends to it, so every output read is unchanged (a policy's loss reads the positions
    that predict answer tokens, never the last). Sequences of one token, a MoE model (its
    router counts tokens) or a read last row keep the batch whole."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    cfg = getattr(module, "config", None)
    whole = (input_ids, cu_seqlens, int(lens.max()) if lens.numel() else 0, rows)
    if cfg is None or cfg.mlp_type == "moe" or lens.numel() == 0 or bool((lens < 2).any()):
        return whole
    last = cu_seqlens[1:].long() - 1
    keep = torch.ones(input_ids.shape[0], dtype=torch.bool)
    keep[last] = False
    if not bool(keep[rows.cpu()].all()):
        return whole
    new_index = keep.cumsum(0) - 1
    return (input_ids[keep.to(input_ids.device)], cu_seqlens_from_lengths(lens - 1, dtype=cu_seqlens.dtype),
            int(lens.max()) - 1, new_index[rows.cpu()].to(rows.device))


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
    rows_fn = getattr(post_hook, "output_rows", None)
    for mb in split.micro_batches:
        ids, cu, max_seqlen = packed_inputs(mb, key)
        if rows_fn is None:
            out = module(ids, cu, max_seqlen)
        else:
            out = module(ids, cu, max_seqlen, output_rows=rows_fn(mb))
        outputs.append(post_hook(out, mb) if post_hook is not None else out)
    return assemble_outputs(outputs, split, sample, key)


def rows_applied(fn: Optional[Callable]) -> Optional[Callable]:
    """``fn(out, mb)`` of a post-hook or loss declaring ``output_rows(mb)``, for callers that
    produce every row's output (pipeline stages): the rows are taken here."""
    rows_fn = getattr(fn, "output_rows", None)
    if rows_fn is None:
        return fn

    def on_rows(out: torch.Tensor, mb: SequenceSample):
        return fn(out.index_select(0, rows_fn(mb).to(out.device)), mb)

    return on_rows


class EngineModule:
    """What a backend puts in ``Model.module``: the network plus micro-batched,
    possibly pipelined, ``forward`` and ``generate``.

    With pipeline parallelism (from the model scope active at construction)
    calls run the pipeline schedules; every stage calls the same method with
    the same sample and only the last stage returns outputs (others ``None``).
    """

    def __init__(self, module: torch.nn.Module, dp_group: Any = None):
        from realhf.impl.model.backend.parallel_context import ParallelContext

        self.module = module
        self.par = ParallelContext.resolve(module, dp_group)
        self.runner = None
        if self.par.pp_size > 1:
            from realhf.impl.model.parallelism.pipeline_parallel.runner import PipelineRunner

            self.runner = PipelineRunner(module, self.par.pp_group, self.par.pp_ranks, self.par.stage_id,
                                         self.par.pp_size)

    @property
    def is_last_stage(self) -> bool:
        return self.par.is_last_stage

    def forward(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec] = None,
                post_hook: Optional[PostHook] = None) -> Any:
        """Outputs (or ``post_hook(output, mb)`` results) in the input item order."""
        self.module.eval()
        if self.runner is not None:
            return self.runner.forward(sample, mb_spec, rows_applied(post_hook))
        return micro_batched_forward(self.module, sample, mb_spec or MicroBatchSpec(), post_hook)

    __call__ = forward

    @torch.no_grad()
    def generate(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec],
                 gconfig: GenerationHyperparameters, eos_token_id: Optional[Union[int, List[int]]],
                 generator: Optional[torch.Generator] = None):
        """Generate an answer per prompt item; a :class:`GenerationOutput` in input order."""
        from realhf.impl.model.nn.real_llm_generate import concat_generation_outputs, generate

        self.module.eval()
        if self.runner is not None:
            return self.runner.generate(sample, mb_spec, gconfig, eos_token_id, generator)
        split = split_packed_batch(sample, mb_spec or MicroBatchSpec(), key=INPUT_KEY)
        outs = []
        for mb in split.micro_batches:
            ids, cu, _ = packed_inputs(mb)
            outs.append(generate(self.module, ids, cu, gconfig, eos_token_id, generator=generator))
        return concat_generation_outputs(outs, split.backward_indices)


InferenceModule = EngineModule


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
