"""Executing pipeline schedules on one stage of a ReaLModel.

Every stage of a pipeline holds a :class:`PipelineRunner` wrapping its
:class:`~realhf.impl.model.nn.real_llm_api.ReaLModel` stage and calls the
same method with the same sample. The micro-batch split is deterministic, so
each stage computes the packed boundaries (``cu_seqlens``) of every
micro-batch by itself; only activations (forward) and their gradients
(backward) travel between neighbouring stages, with
:mod:`~realhf.impl.model.parallelism.pipeline_parallel.p2p` since their
``[n_tokens, hidden]`` shapes differ per micro-batch.

* :meth:`PipelineRunner.forward` runs :class:`InferenceSchedule` without
  gradients; the last stage applies ``post_hook`` per micro-batch and returns
  the outputs in the input item order, other stages return ``None``.
* :meth:`PipelineRunner.train_batch` runs :class:`TrainSchedule` (1F1B). Each
  micro-batch loss is weighted so that the summed gradient equals the one of
  a single loss over the whole batch. Gradients accumulate in the stage's
  parameters; reducing them across data-parallel replicas and stepping the
  optimizer are the caller's job.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec
from realhf.impl.model.backend.inference import INPUT_KEY, PostHook, packed_inputs
from realhf.impl.model.backend.train_engine import LossFn, WeightFn, token_weight, weighted_split
from realhf.impl.model.parallelism.micro_batch import MicroBatchSplit, assemble_outputs, split_packed_batch
from realhf.impl.model.parallelism.pipeline_parallel import p2p
from realhf.impl.model.parallelism.pipeline_parallel.instruction import (
    BackwardPass,
    ForwardPass,
    OptimizerStep,
    PipeInstruction,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    SendActivation,
    SendGrad,
)
from realhf.impl.model.parallelism.pipeline_parallel.static_schedule import (
    InferenceSchedule,
    PipeSchedule,
    TrainSchedule,
)


class PipelineRunner:
    """Runs pipeline schedules for one stage.

    :param model_stage: the stage's module, called as
        ``model_stage(input_ids, cu_seqlens, max_seqlen, hidden_states=...)``;
        the first stage embeds ``input_ids``, later stages take the previous
        stage's ``hidden_states``; the last stage returns logits (or values).
    :param pp_group: process group of the pipeline (``None``: the world).
    :param pp_ranks: global ranks of the stages, in stage order.
    :param stage_id: index of this stage in ``pp_ranks``.
    :param n_stages: number of stages (``len(pp_ranks)``).
    :param key: sample key holding the packed token ids.
    """

    def __init__(
        self,
        model_stage: torch.nn.Module,
        pp_group: Optional[dist.ProcessGroup],
        pp_ranks: Sequence[int],
        stage_id: int,
        n_stages: int,
        key: str = INPUT_KEY,
    ):
        if n_stages < 1 or len(pp_ranks) != n_stages:
            raise ValueError(f"Expected {n_stages} pipeline ranks, got {list(pp_ranks)}.")
        if not 0 <= stage_id < n_stages:
            raise ValueError(f"stage_id must be in [0, {n_stages}), got {stage_id}.")
        if dist.is_initialized() and dist.get_rank() != pp_ranks[stage_id]:
            raise ValueError(
                f"Stage {stage_id} belongs to global rank {pp_ranks[stage_id]}, "
                f"but this process is rank {dist.get_rank()}."
            )
        self.module = model_stage
        self.group = pp_group
        self.pp_ranks = list(pp_ranks)
        self.stage_id = stage_id
        self.n_stages = n_stages
        self.key = key
        self._reset()

    # ------------------------------------------------------------ properties
    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.n_stages - 1

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[self.stage_id - 1]

    @property
    def next_rank(self) -> int:
        return self.pp_ranks[self.stage_id + 1]

    @property
    def _device(self) -> torch.device:
        dev = getattr(self.module, "device", None)
        if dev is not None:
            return torch.device(dev)
        return next(self.module.parameters()).device

    # ----------------------------------------------------------- per-run state
    def _reset(self) -> None:
        # Per micro-batch: packed (ids, cu_seqlens, max_seqlen), the input
        # activation received from the previous stage, this stage's output,
        # and the gradient of that output received from the next stage.
        self._split: Optional[MicroBatchSplit] = None
        self._packed: List[Tuple[torch.Tensor, torch.Tensor, int]] = []
        self._inputs: Dict[int, torch.Tensor] = {}
        self._outputs: Dict[int, Any] = {}
        self._out_grads: Dict[int, torch.Tensor] = {}
        self._train = False
        self._loss_fn: Optional[LossFn] = None
        self._weights: List[float] = []
        self._weight_scale = 1.0
        self._post_hook: Optional[PostHook] = None
        self._results: Dict[int, Any] = {}
        self._loss_sum = 0.0
        self._extra: Dict[str, float] = {}

    def _prepare(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec],
                 split: Optional[MicroBatchSplit] = None) -> int:
        self._reset()
        self._split = split if split is not None else split_packed_batch(sample, mb_spec or MicroBatchSpec(),
                                                                         key=self.key)
        self._packed = [packed_inputs(mb, self.key) for mb in self._split.micro_batches]
        return len(self._split.micro_batches)

    def _mb(self, mb_id: int) -> SequenceSample:
        return self._split.micro_batches[mb_id]

    # ------------------------------------------------------------ instructions
    def _exec_recv_activation(self, cmd: PipeInstruction) -> None:
        x = p2p.recv_tensor(self.prev_rank, self.group).to(self._device)
        if self._train:
            x.requires_grad_(True)
        self._inputs[cmd.micro_batch_id] = x

    def _exec_send_activation(self, cmd: PipeInstruction) -> None:
        out = self._outputs[cmd.micro_batch_id]
        p2p.send_tensor(out.detach(), self.next_rank, self.group)
        if not self._train:
            # Inference keeps nothing once the activation left this stage.
            del self._outputs[cmd.micro_batch_id]

    def _exec_recv_grad(self, cmd: PipeInstruction) -> None:
        g = p2p.recv_tensor(self.next_rank, self.group).to(self._device)
        self._out_grads[cmd.micro_batch_id] = g

    def _exec_send_grad(self, cmd: PipeInstruction) -> None:
        x = self._inputs.pop(cmd.micro_batch_id)
        g = x.grad
        if g is None:
            # The stage's output did not depend on its input.
            g = torch.zeros_like(x)
        p2p.send_tensor(g, self.prev_rank, self.group)

    def _exec_forward(self, cmd: PipeInstruction) -> None:
        mb_id = cmd.micro_batch_id
        ids, cu, max_seqlen = self._packed[mb_id]
        if self.is_first_stage:
            out = self.module(ids, cu, max_seqlen)
        else:
            out = self.module(None, cu, max_seqlen, hidden_states=self._inputs[mb_id])
            if not self._train:
                del self._inputs[mb_id]
        if not self.is_last_stage:
            self._outputs[mb_id] = out
            return
        mb = self._mb(mb_id)
        if self._train:
            # Keep the loss graph for the backward pass of this micro-batch.
            loss, stats = self._loss_fn(out, mb)
            w = self._weights[mb_id]
            self._outputs[mb_id] = loss * (w * self._weight_scale)
            self._loss_sum += float(loss.detach()) * w
            for k, v in (stats or {}).items():
                self._extra[k] = self._extra.get(k, 0.0) + float(v) * w
        else:
            self._results[mb_id] = out if self._post_hook is None else self._post_hook(out, mb)

    def _exec_backward(self, cmd: PipeInstruction) -> None:
        mb_id = cmd.micro_batch_id
        out = self._outputs.pop(mb_id)
        if self.is_last_stage:
            out.backward()
        else:
            grad = self._out_grads.pop(mb_id).to(dtype=out.dtype)
            torch.autograd.backward(out, grad)
        if self.is_first_stage:
            self._inputs.pop(mb_id, None)

    def _exec_noop(self, cmd: PipeInstruction) -> None:
        """Gradient reduction and the optimizer step belong to the caller."""

    _DISPATCH: Dict[type, Callable[["PipelineRunner", PipeInstruction], None]] = {
        RecvActivation: _exec_recv_activation,
        SendActivation: _exec_send_activation,
        RecvGrad: _exec_recv_grad,
        SendGrad: _exec_send_grad,
        ForwardPass: _exec_forward,
        BackwardPass: _exec_backward,
        ReduceGrads: _exec_noop,
        OptimizerStep: _exec_noop,
    }

    def _run_schedule(self, schedule: PipeSchedule) -> None:
        for _, _, cmds in schedule.steps():
            for cmd in cmds:
                fn = self._DISPATCH.get(type(cmd))
                if fn is None:
                    raise RuntimeError(f"Pipeline runner cannot execute {cmd}.")
                fn(self, cmd)

    # -------------------------------------------------------------- interface
    @torch.no_grad()
    def forward(
        self,
        sample: SequenceSample,
        mb_spec: Optional[MicroBatchSpec] = None,
        post_hook: Optional[PostHook] = None,
        split: Optional[MicroBatchSplit] = None,
        assemble: bool = True,
    ) -> Any:
        """Pipelined, gradient-free forward of ``sample`` (the same on every stage).

        The last stage applies ``post_hook(output, mb)`` per micro-batch and
        returns the results concatenated in the input item order (rows per
        token, per shifted token or per item, as the inference engine
        accepts), or the list of per-micro-batch results when ``assemble`` is
        False; other stages return ``None``. ``split`` reuses a split the
        caller already made with the same ``mb_spec``.
        """
        self.module.eval()
        n_mbs = self._prepare(sample, mb_spec, split)
        self._post_hook = post_hook
        try:
            self._run_schedule(InferenceSchedule(n_mbs, self.n_stages, self.stage_id))
            if not self.is_last_stage:
                return None
            results = [self._results[i] for i in range(n_mbs)]
            if not assemble:
                return results
            return assemble_outputs(results, self._split, sample, self.key)
        finally:
            self._reset()

    def run_train_schedule(
        self,
        sample: SequenceSample,
        split: MicroBatchSplit,
        loss_fn: LossFn,
        weights: Sequence[float],
        weight_scale: float,
    ) -> Dict[str, float]:
        """1F1B forward/backward; micro-batch ``i``'s loss is scaled by
        ``weights[i] * weight_scale``. Every stage returns the last stage's
        weighted sums ``sum_i weights[i] * stat_i`` (``loss`` included)."""
        self.module.train()
        n_mbs = self._prepare(sample, None, split)
        if len(weights) != n_mbs:
            raise ValueError(f"Got {len(weights)} weights for {n_mbs} micro-batches.")
        self._train = True
        self._loss_fn = loss_fn
        self._weights = [float(w) for w in weights]
        self._weight_scale = float(weight_scale)
        try:
            self._run_schedule(TrainSchedule(n_mbs, self.n_stages, self.stage_id))
            sums: Optional[Dict[str, float]] = None
            if self.is_last_stage:
                sums = {"loss": self._loss_sum, **self._extra}
            return self._share_stats(sums)
        finally:
            self._reset()

    def train_batch(
        self,
        sample: SequenceSample,
        mb_spec: Optional[MicroBatchSpec],
        loss_fn: LossFn,
        loss_weight_fn: WeightFn = token_weight,
    ) -> Dict[str, float]:
        """Forward and backward of ``sample`` with the 1F1B schedule.

        ``loss_fn(logits, mb)`` (called on the last stage only) returns a loss
        that is a mean over ``mb`` and a dict of float stats. Micro-batch
        losses are weighted by ``loss_weight_fn(mb) / sum of weights``, so the
        accumulated gradient is that of one loss over the whole batch.
        Gradients are added to the parameters' ``.grad``; nothing is zeroed,
        reduced or stepped. Every stage returns the same stats: ``loss`` and
        the weighted means of ``loss_fn``'s stats.
        """
        split, weights, total_w = weighted_split(sample, mb_spec, loss_weight_fn, key=self.key)
        sums = self.run_train_schedule(sample, split, loss_fn, weights, 1.0 / total_w)
        return {k: v / total_w for k, v in sums.items()}

    def generate(
        self,
        sample: SequenceSample,
        mb_spec: Optional[MicroBatchSpec],
        gconfig: GenerationHyperparameters,
        eos_token_id: Optional[Union[int, List[int]]],
        generator: Optional[torch.Generator] = None,
    ):
        """Pipelined generation (see :mod:`.generation`); the last stage returns
        the :class:`GenerationOutput` in input order, other stages ``None``."""
        from realhf.impl.model.parallelism.pipeline_parallel.generation import PipelineGenerator

        self.module.eval()
        gen = PipelineGenerator(self)
        return gen.generate(sample, mb_spec, gconfig, eos_token_id, generator)

    def _share_stats(self, stats: Optional[Dict[str, float]]) -> Dict[str, float]:
        """Give every stage the last stage's stats."""
        if self.n_stages == 1:
            return stats
        box = [stats]
        dist.broadcast_object_list(box, src=self.pp_ranks[-1], group=self.group)
        return box[0]
