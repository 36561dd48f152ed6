"""Auto-regressive generation on a pipeline of ReaLModel stages.

Stages run :class:`GenerateSchedule`: micro-batches circulate on a ring.
Stage 0 embeds the prompts (round 0) or the tokens sampled in the previous
round, every stage appends to its own per-micro-batch KV cache, and the last
stage samples with a :class:`~realhf.impl.model.nn.real_llm_generate.DecodeState`
and sends the next tokens back to stage 0.

What travels between stages:

* stage ``s`` -> ``s + 1``: the hidden states of the round and the per-row
  input lengths (rows that finished feed 0 tokens), from which the receiver
  rebuilds ``cu_seqlens``;
* last stage -> stage 0: the tokens to feed and the per-row lengths.

Termination flags (a micro-batch ends when all its rows emitted EOS or used
``max_new_tokens``) are set on the last stage and all-reduced over the
pipeline group after every step, so every stage decides the next round of a
micro-batch with the same information. Stages that run out of schedule keep
joining that all-reduce until every stage is done, so the collective never
hangs. With tensor parallelism the last stage samples from all-gathered
logits and broadcasts the tokens over its tensor-parallel group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec
from realhf.impl.model.backend.inference import packed_inputs
from realhf.impl.model.nn.real_llm_generate import (
    DecodeState,
    GenerationOutput,
    check_prompts,
    concat_generation_outputs,
    eos_id_list,
    logits_kwargs,
    tensor_parallel_token_sync,
)
from realhf.impl.model.parallelism.micro_batch import split_packed_batch
from realhf.impl.model.parallelism.pipeline_parallel import p2p
from realhf.impl.model.parallelism.pipeline_parallel.instruction import (
    ForwardPass,
    PipeInstruction,
    RecvActivation,
    RecvNextTokens,
    SendActivation,
    SendNextTokens,
)
from realhf.impl.model.parallelism.pipeline_parallel.static_schedule import GenerateSchedule
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths

if TYPE_CHECKING:
    from realhf.impl.model.parallelism.pipeline_parallel.runner import PipelineRunner


class _MicroBatch:
    """Per-stage state of one micro-batch during generation."""

    def __init__(self, ids: torch.Tensor, prompt_lens: torch.Tensor, cache):
        self.ids = ids
        self.lens = prompt_lens  # per-row input lengths of the current round
        self.cache = cache
        self.round = 0
        self.hidden: Optional[torch.Tensor] = None  # received or to be sent
        self.feed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # next (tokens, lengths)
        self.state: Optional[DecodeState] = None  # last stage only


class PipelineGenerator:
    """Runs :class:`GenerateSchedule` for the stage of ``runner``; see the module docstring."""

    def __init__(self, runner: "PipelineRunner"):
        self.runner = runner
        self.module = runner.module
        self.group = runner.group
        self.pp_ranks = runner.pp_ranks
        self.stage_id = runner.stage_id
        self.n_stages = runner.n_stages
        self.key = runner.key
        self.is_first_stage = runner.is_first_stage
        self.is_last_stage = runner.is_last_stage
        self._device = runner._device

    # ------------------------------------------------------------ instructions
    def _forward(self, cmd: PipeInstruction) -> None:
        m = self._mbs[cmd.micro_batch_id]
        if self.is_first_stage and m.round > 0:
            ids, m.lens = m.feed
            m.feed = None
        elif self.is_first_stage:
            ids = m.ids
        else:
            ids = None
        cu = cu_seqlens_from_lengths(m.lens)
        max_len = int(m.lens.max()) if m.lens.numel() else 0
        kw = logits_kwargs(self.module) if self.is_last_stage else {}
        out = self.module(ids, cu, max_len, kv_cache=m.cache, hidden_states=m.hidden, **kw)
        m.round += 1
        if not self.is_last_stage:
            m.hidden = out
            return
        m.hidden = None
        # Round 0 returns every prompt token; later rounds one row per active row.
        last = out[cu[1:] - 1] if m.round == 1 else out
        feed = m.state.step(last)
        if feed is None:
            self._flags[cmd.micro_batch_id] = 1
            feed = (torch.zeros(0, dtype=torch.long, device=out.device),
                    torch.zeros_like(m.lens))
        m.feed = feed  # with one stage, stage 0 itself feeds these next round

    def _send_activation(self, cmd: PipeInstruction) -> None:
        m = self._mbs[cmd.micro_batch_id]
        nxt = self.pp_ranks[self.stage_id + 1]
        p2p.send_tensor(m.hidden, nxt, self.group)
        p2p.send_tensor(m.lens, nxt, self.group)
        m.hidden = None

    def _recv_activation(self, cmd: PipeInstruction) -> None:
        m = self._mbs[cmd.micro_batch_id]
        prev = self.pp_ranks[self.stage_id - 1]
        m.hidden = p2p.recv_tensor(prev, self.group).to(self._device)
        m.lens = p2p.recv_tensor(prev, self.group).to(self._device)

    def _send_next_tokens(self, cmd: PipeInstruction) -> None:
        m = self._mbs[cmd.micro_batch_id]
        tokens, lens = m.feed
        m.feed = None
        p2p.send_tensor(tokens, self.pp_ranks[0], self.group)
        p2p.send_tensor(lens, self.pp_ranks[0], self.group)

    def _recv_next_tokens(self, cmd: PipeInstruction) -> None:
        m = self._mbs[cmd.micro_batch_id]
        last = self.pp_ranks[-1]
        tokens = p2p.recv_tensor(last, self.group).to(self._device)
        lens = p2p.recv_tensor(last, self.group).to(self._device)
        m.feed = (tokens, lens)

    _DISPATCH = {
        ForwardPass: _forward,
        SendActivation: _send_activation,
        RecvActivation: _recv_activation,
        SendNextTokens: _send_next_tokens,
        RecvNextTokens: _recv_next_tokens,
    }

    # ------------------------------------------------------------------ setup
    def _sync_flags(self, finished: bool) -> bool:
        """Share termination flags; True once every stage has finished its schedule."""
        if self.n_stages == 1:
            return finished
        buf = torch.cat([self._flags.float(), torch.tensor([0.0 if finished else 1.0])])
        if dist.get_backend(self.group) == "nccl":
            buf = buf.cuda()
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        buf = buf.cpu()
        self._flags = buf[:-1].to(torch.int64)
        return float(buf[-1]) == 0.0

    @torch.no_grad()
    def generate(
        self,
        sample: SequenceSample,
        mb_spec: Optional[MicroBatchSpec],
        gconfig: GenerationHyperparameters,
        eos_token_id: Optional[Union[int, List[int]]],
        generator: Optional[torch.Generator] = None,
    ) -> Optional[GenerationOutput]:
        """Generate answers for the prompts in ``sample`` (the same on every stage).

        The last stage returns the outputs in the input item order; other
        stages return None. Every item must hold one prompt.
        """
        config = self.module.config
        if getattr(config, "is_critic", False):
            raise ValueError("Cannot generate with a critic model (it outputs values, not logits).")
        if any(len(s) != 1 for s in sample.seqlens[self.key]):
            raise ValueError(f"Every item must hold exactly one prompt under '{self.key}'.")
        eos_ids = eos_id_list(eos_token_id, getattr(config, "vocab_size", None))
        split = split_packed_batch(sample, mb_spec or MicroBatchSpec(), key=self.key)
        sync = tensor_parallel_token_sync(self.module) if self.is_last_stage else None
        device = self._device
        self._mbs: Dict[int, _MicroBatch] = {}
        for i, mb in enumerate(split.micro_batches):
            ids, cu, _ = packed_inputs(mb, self.key)
            lens = check_prompts(cu).to(device)
            cache = self.module.allocate_kv_cache(mb.bs, int(lens.max()) + gconfig.max_new_tokens)
            m = _MicroBatch(ids.to(device), lens, cache)
            if self.is_last_stage:
                m.state = DecodeState(mb.bs, gconfig, eos_ids, device, generator, sync)
            self._mbs[i] = m
        n_mbs = len(split.micro_batches)
        self._flags = torch.zeros(n_mbs, dtype=torch.int64)
        schedule = GenerateSchedule(n_mbs, self.n_stages, self.stage_id, gconfig.max_new_tokens,
                                    is_terminated=lambda mb: bool(self._flags[mb]))
        steps = iter(schedule.steps())
        finished = False
        try:
            while True:
                if not finished:
                    step = next(steps, None)
                    finished = step is None
                    for cmd in ([] if finished else step.instructions):
                        self._DISPATCH[type(cmd)](self, cmd)
                if self._sync_flags(finished):
                    break
            if not self.is_last_stage:
                return None
            outs = [self._mbs[i].state.output() for i in range(n_mbs)]
            return concat_generation_outputs(outs, split.backward_indices)
        finally:
            self._mbs = {}
