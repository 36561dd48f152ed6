"""Static pipeline schedules.

A schedule tells one stage what to do at each step: iterating it yields, per
step, the list of instructions the stage executes in order. All stages of a
pipeline iterate their own schedules in lock-step; point-to-point transfers
are blocking, so the order of sends and receives inside a step matters.

Conventions shared by the schedules below:

* the communication of a step comes before its computation, except that the
  last stage of :class:`GenerateSchedule` ships sampled tokens right after
  computing them;
* a stage sends in step ``t`` the output it computed in step ``t - 1``, and
  the next stage receives it in the same step ``t``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from realhf.impl.model.parallelism.pipeline_parallel.instruction import (
    BackwardPass,
    ForwardPass,
    OptimizerStep,
    PipeInstruction,
    RecvActivation,
    RecvGrad,
    RecvNextTokens,
    ReduceGrads,
    SendActivation,
    SendGrad,
    SendNextTokens,
)


class ScheduleStep(NamedTuple):
    """One step of a schedule: the micro-batch computed (-1 if none) and the
    instructions in execution order; unpacks as ``(step_id, mbid, cmds)``."""

    step_id: int
    micro_batch_id: int
    instructions: List[PipeInstruction]


class PipeSchedule:
    """Base class: validates the shape and offers iteration helpers."""

    def __init__(self, n_micro_batches: int, n_stages: int, stage_id: int):
        if n_micro_batches < 1:
            raise ValueError(f"n_micro_batches must be >= 1, got {n_micro_batches}.")
        if n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {n_stages}.")
        if not 0 <= stage_id < n_stages:
            raise ValueError(f"stage_id must be in [0, {n_stages}), got {stage_id}.")
        self.n_micro_batches = n_micro_batches
        self.n_stages = n_stages
        self.stage_id = stage_id

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.n_stages - 1

    @property
    def is_even_stage(self) -> bool:
        return self.stage_id % 2 == 0

    def _valid_mb(self, mb: int) -> bool:
        return 0 <= mb < self.n_micro_batches

    def steps(self) -> Iterator[ScheduleStep]:
        raise NotImplementedError()

    def __iter__(self) -> Iterator[List[PipeInstruction]]:
        for step in self.steps():
            yield step.instructions

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_micro_batches={self.n_micro_batches}, "
            f"n_stages={self.n_stages}, stage_id={self.stage_id})"
        )


def _order_comm(
    even_stage: bool, sends: List[PipeInstruction], recvs: List[PipeInstruction]
) -> List[PipeInstruction]:
    """Even stages send first and odd stages receive first, so that every
    blocking send between neighbours meets a posted receive."""
    return sends + recvs if even_stage else recvs + sends


class InferenceSchedule(PipeSchedule):
    """Forward-only pipelining: micro-batch ``m`` runs on stage ``s`` at step
    ``m + s``; ``n_micro_batches + n_stages - 1`` steps in total."""

    @property
    def num_steps(self) -> int:
        return self.n_micro_batches + self.n_stages - 1

    @property
    def num_activation_buffers(self) -> int:
        """One buffer being sent while the next micro-batch is received."""
        return 2

    def steps(self) -> Iterator[ScheduleStep]:
        s = self.stage_id
        for t in range(self.num_steps):
            cur, prev = t - s, t - s - 1
            sends: List[PipeInstruction] = []
            recvs: List[PipeInstruction] = []
            if self._valid_mb(prev) and not self.is_last_stage:
                sends.append(SendActivation(s, prev, t))
            if self._valid_mb(cur) and not self.is_first_stage:
                recvs.append(RecvActivation(s, cur, t))
            cmds = _order_comm(self.is_even_stage, sends, recvs)
            if self._valid_mb(cur):
                cmds.append(ForwardPass(s, cur, t))
            yield ScheduleStep(t, cur if self._valid_mb(cur) else -1, cmds)


class TrainSchedule(PipeSchedule):
    """Synchronous one-forward-one-backward (1F1B) training.

    Forward of micro-batch ``m`` on stage ``s`` happens at step ``2m + s``
    and its backward at step ``2(m + S) - s - 1``, so steps alternate between
    forward and backward with a parity that flips between neighbouring
    stages. In a forward step a stage talks only to its previous stage (send
    the gradient of its last backward, receive the new activation); in a
    backward step only to its next stage (receive the gradient, send the
    activation of its last forward). Neighbours therefore always pair up.
    A stage holds at most ``min(S - s, n_micro_batches)`` activations. The
    last step ends with gradient reduction and the optimizer step.
    """

    @property
    def num_steps(self) -> int:
        return 2 * (self.n_micro_batches + self.n_stages - 1)

    def step_to_micro_batch(self, step_id: int) -> Tuple[int, bool]:
        """(micro-batch id, is_forward) of a step; the id may be out of range."""
        s, S = self.stage_id, self.n_stages
        if (step_id - s) % 2 == 0:
            return (step_id - s) // 2, True
        return (step_id - 2 * S + s + 1) // 2, False

    @property
    def num_activation_buffers(self) -> int:
        """Activations alive at once on this stage, at least two for double buffering."""
        return max(2, min(self.n_stages - self.stage_id, self.n_micro_batches))

    def steps(self) -> Iterator[ScheduleStep]:
        s = self.stage_id
        prev_mb = -1
        for t in range(self.num_steps):
            mb, is_forward = self.step_to_micro_batch(t)
            cmds: List[PipeInstruction] = []
            if is_forward:
                if self._valid_mb(prev_mb) and not self.is_first_stage:
                    cmds.append(SendGrad(s, prev_mb, t))
                if self._valid_mb(mb) and not self.is_first_stage:
                    cmds.append(RecvActivation(s, mb, t))
            else:
                if self._valid_mb(mb) and not self.is_last_stage:
                    cmds.append(RecvGrad(s, mb, t))
                if self._valid_mb(prev_mb) and not self.is_last_stage:
                    cmds.append(SendActivation(s, prev_mb, t))
            if self._valid_mb(mb):
                cmds.append(ForwardPass(s, mb, t) if is_forward else BackwardPass(s, mb, t))
            if t == self.num_steps - 1:
                cmds.append(ReduceGrads(s, -1, t))
                cmds.append(OptimizerStep(s, -1, t))
            prev_mb = mb
            yield ScheduleStep(t, mb if self._valid_mb(mb) else -1, cmds)


class GenerateSchedule(PipeSchedule):
    """Auto-regressive generation on a ring of stages.

    Every micro-batch makes up to ``max_new_tokens`` rounds through all
    stages. With period ``P = max(n_micro_batches, n_stages)``, round ``k``
    of micro-batch ``m`` (job ``j = kP + m``) runs on stage ``s`` at step
    ``j + s``. The last stage samples and, in the same step, sends the next
    tokens to stage 0; since ``P >= n_stages`` they arrive before stage 0
    starts the next round. Tokens of the final round travel too, so stage 0
    sees every sampled token and termination flag.

    ``is_terminated(micro_batch_id)`` reports whether a micro-batch has
    finished (every sequence produced EOS). It is called lazily, when this
    stage decides whether to run the next round of that micro-batch, which
    is always after the step in which the last stage sampled the previous
    round, and between steps to end early. It must give the same answer on
    every stage from the step after sampling on, and a flag once set must
    stay set: the engine ships the flags with the next tokens and makes them
    visible to all stages (e.g. an all-reduce of the flags over the pipeline
    group each step). Once every
    micro-batch has terminated or used up ``max_new_tokens`` rounds and this
    stage's pending transfers are done, iteration stops.
    """

    def __init__(
        self,
        n_micro_batches: int,
        n_stages: int,
        stage_id: int,
        max_new_tokens: int,
        is_terminated: Optional[Callable[[int], bool]] = None,
    ):
        super().__init__(n_micro_batches, n_stages, stage_id)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        self.max_new_tokens = max_new_tokens
        self.is_terminated = is_terminated or (lambda mb: False)
        self.period = max(n_micro_batches, n_stages)
        # Whether job j runs, decided when this stage reaches it.
        self._active: Dict[int, bool] = {}
        # Micro-batches with no further rounds on this stage.
        self._stopped: Dict[int, bool] = {}

    @property
    def max_steps(self) -> int:
        """Upper bound on the number of steps."""
        return self.max_new_tokens * self.period + self.n_micro_batches - 1

    def job(self, j: int) -> Tuple[int, int]:
        """(micro_batch_id, round) of job ``j``."""
        k, m = divmod(j, self.period)
        return m, k

    def _is_active(self, j: int) -> bool:
        """Whether job j runs; decided once, in job order per micro-batch."""
        if j < 0:
            return False
        if j in self._active:
            return self._active[j]
        m, k = self.job(j)
        ok = self._valid_mb(m) and k < self.max_new_tokens
        if ok and k > 0:
            ok = self._is_active(j - self.period) and not bool(self.is_terminated(m))
        self._active[j] = ok
        if self._valid_mb(m) and (not ok or k == self.max_new_tokens - 1):
            self._stopped[m] = True
        return ok

    def _last_step_of(self, j: int) -> int:
        """Last step in which this stage has an instruction for job j."""
        s, S = self.stage_id, self.n_stages
        if S == 1:
            return j
        if s == 0:
            return j + S - 1  # receiving the sampled tokens
        if s == S - 1:
            return j + s
        return j + s + 1

    def _done_after(self, t: int) -> bool:
        for m in range(self.n_micro_batches):
            # Flags never clear, and a visible flag is visible to every stage
            # by the time it decides the next round, so stopping now is safe.
            if m not in self._stopped and self.is_terminated(m):
                self._stopped[m] = True
        if len(self._stopped) < self.n_micro_batches:
            return False
        # Only jobs decided so far can still have pending transfers.
        return all(not a or self._last_step_of(j) <= t for j, a in self._active.items())

    def steps(self) -> Iterator[ScheduleStep]:
        s, S = self.stage_id, self.n_stages
        for t in range(self.max_steps):
            cur = t - s
            cur_active = self._is_active(cur)
            mb = self.job(cur)[0] if cur_active else -1
            sends: List[PipeInstruction] = []
            recvs: List[PipeInstruction] = []
            if not self.is_last_stage and self._is_active(cur - 1):
                sends.append(SendActivation(s, self.job(cur - 1)[0], t))
            if not self.is_first_stage and cur_active:
                recvs.append(RecvActivation(s, mb, t))
            if self.is_first_stage and S > 1 and self._is_active(t - S + 1):
                recvs.append(RecvNextTokens(s, self.job(t - S + 1)[0], t))
            cmds = _order_comm(self.is_even_stage, sends, recvs)
            if cur_active:
                cmds.append(ForwardPass(s, mb, t))
                if self.is_last_stage and S > 1:
                    cmds.append(SendNextTokens(s, mb, t))
            yield ScheduleStep(t, mb, cmds)
            if self._done_after(t):
                return
