"""Lock-step simulation of all stages of a pipeline schedule.

Every step, each stage runs its instruction list in order; a send blocks
until the peer stage reaches the matching receive in the same step
(rendezvous). The simulator tracks which micro-batch data every stage holds
so that out-of-order or missing transfers are caught.
"""

import collections
import random
from typing import Callable, Dict, List, Optional

import pytest

from realhf.impl.model.parallelism.pipeline_parallel import instruction as I
from realhf.impl.model.parallelism.pipeline_parallel.static_schedule import (
    GenerateSchedule,
    InferenceSchedule,
    PipeSchedule,
    TrainSchedule,
)

COMPUTE = (I.ForwardPass, I.BackwardPass, I.ReduceGrads, I.OptimizerStep)
SENDS = {I.SendActivation: (I.RecvActivation, +1), I.SendGrad: (I.RecvGrad, -1),
         I.SendNextTokens: (I.RecvNextTokens, None)}


class Deadlock(AssertionError):
    pass


class Sim:
    def __init__(self, make: Callable[[int, "Sim"], PipeSchedule], n_stages: int, n_mbs: int):
        self.S, self.mbs = n_stages, n_mbs
        self.t = 0
        self.scheds = [make(s, self) for s in range(n_stages)]
        self.iters = [iter(sc.steps()) for sc in self.scheds]
        self.n_steps = [0] * n_stages
        self.log: List[List[I.PipeInstruction]] = [[] for _ in range(n_stages)]
        self.events: List[I.PipeInstruction] = []  # global execution order
        self.matches: List[tuple] = []
        # Data-flow state.
        self.has_act = [collections.Counter() for _ in range(n_stages)]  # input activations
        self.fwd = [collections.Counter() for _ in range(n_stages)]
        self.bwd = [collections.Counter() for _ in range(n_stages)]
        self.has_grad = [collections.Counter() for _ in range(n_stages)]
        self.tokens = collections.Counter()  # next tokens received by stage 0
        self.max_inflight = [0] * n_stages
        self.on_forward: Optional[Callable[[int, int, int], None]] = None

    def run(self):
        live = set(range(self.S))
        while live:
            queues = {}
            for s in sorted(live):
                step = next(self.iters[s], None)
                if step is None:
                    live.discard(s)
                    continue
                assert step.step_id == self.t
                self.n_steps[s] += 1
                for ins in step.instructions:
                    assert ins.stage_id == s and ins.step_id == self.t, ins
                queues[s] = collections.deque(step.instructions)
            self._run_step(queues)
            self.t += 1
            assert self.t < 100000

    def _peer(self, ins):
        recv_type, delta = SENDS[type(ins)]
        dst = 0 if delta is None else ins.stage_id + delta
        assert 0 <= dst < self.S, f"{ins} targets stage {dst}"
        return recv_type, dst

    def _run_step(self, queues: Dict[int, collections.deque]):
        while any(queues.values()):
            progress = False
            for s, q in queues.items():
                if not q:
                    continue
                ins = q[0]
                if isinstance(ins, COMPUTE):
                    q.popleft()
                    self._exec(ins)
                    progress = True
                elif type(ins) in SENDS:
                    recv_type, dst = self._peer(ins)
                    pq = queues.get(dst)
                    if pq and type(pq[0]) is recv_type:
                        r = pq[0]
                        assert r.micro_batch_id == ins.micro_batch_id, (ins, r)
                        q.popleft()
                        pq.popleft()
                        self._exec(ins)
                        self._exec(r)
                        self.matches.append((ins, r))
                        progress = True
            if not progress:
                raise Deadlock(f"step {self.t}: heads {[(s, str(q[0])) for s, q in queues.items() if q]}")

    def _exec(self, ins):
        s, m = ins.stage_id, ins.micro_batch_id
        self.log[s].append(ins)
        self.events.append(ins)
        if isinstance(ins, I.ForwardPass):
            assert s == 0 or self.has_act[s][m] > self.fwd[s][m], f"{ins} without input"
            if isinstance(self.scheds[s], GenerateSchedule) and s == 0 and self.S > 1:
                # Round k >= 1 needs the tokens sampled in round k - 1.
                assert self.tokens[m] >= self.fwd[s][m], f"{ins} before next tokens"
            self.fwd[s][m] += 1
            inflight = sum(self.fwd[s].values()) - sum(self.bwd[s].values())
            self.max_inflight[s] = max(self.max_inflight[s], inflight)
            if self.on_forward:
                self.on_forward(s, m, self.t)
        elif isinstance(ins, I.BackwardPass):
            assert self.fwd[s][m] == 1 and self.bwd[s][m] == 0, ins
            assert s == self.S - 1 or self.has_grad[s][m] == 1, f"{ins} without output grad"
            self.bwd[s][m] += 1
        elif isinstance(ins, I.SendActivation):
            assert self.fwd[s][m] > 0 and self.fwd[s][m] > self.has_act[s + 1][m], ins
        elif isinstance(ins, I.RecvActivation):
            self.has_act[s][m] += 1
        elif isinstance(ins, I.SendGrad):
            assert self.bwd[s][m] == 1, ins
        elif isinstance(ins, I.RecvGrad):
            self.has_grad[s][m] += 1
        elif isinstance(ins, I.SendNextTokens):
            assert self.fwd[s][m] > self.tokens[m], ins
        elif isinstance(ins, I.RecvNextTokens):
            self.tokens[m] += 1
        elif isinstance(ins, (I.ReduceGrads, I.OptimizerStep)):
            assert all(self.bwd[s][mb] == 1 for mb in range(self.mbs)), ins

    def forwards_in_stage_order(self, m: int, rounds: int = 1):
        """Forward k of micro-batch m on stage s comes after forward k on s-1."""
        pos = {}
        for i, e in enumerate(self.events):
            if isinstance(e, I.ForwardPass) and e.micro_batch_id == m:
                k = sum(1 for key in pos if key[0] == e.stage_id)
                pos[(e.stage_id, k)] = (e.step_id, i)
        for k in range(rounds):
            for s in range(1, self.S):
                assert pos[(s - 1, k)] < pos[(s, k)], (m, k, s)
        assert len(pos) == rounds * self.S


COMBOS = [(m, s) for m in range(1, 9) for s in range(1, 7)] + [(16, 4), (3, 8), (13, 5)]


@pytest.mark.parametrize("mbs,S", COMBOS)
def test_inference_schedule(mbs, S):
    sim = Sim(lambda s, _: InferenceSchedule(mbs, S, s), S, mbs)
    sim.run()
    assert sim.n_steps == [mbs + S - 1] * S
    assert sim.scheds[0].num_steps == mbs + S - 1
    assert len(sim.matches) == mbs * (S - 1)
    pairs = collections.Counter((a.stage_id, b.stage_id, a.micro_batch_id) for a, b in sim.matches)
    assert set(pairs.values()) <= {1}
    for a, b in sim.matches:
        assert b.stage_id == a.stage_id + 1 and a.step_id == b.step_id
    for s in range(S):
        fwd = [i.micro_batch_id for i in sim.log[s] if isinstance(i, I.ForwardPass)]
        assert fwd == list(range(mbs))
    for m in range(mbs):
        sim.forwards_in_stage_order(m)


def test_inference_comm_order():
    # Even stages send before receiving, odd stages receive before sending.
    for s in range(4):
        for cmds in InferenceSchedule(4, 4, s):
            kinds = [type(c) for c in cmds if type(c) in (I.SendActivation, I.RecvActivation)]
            if len(kinds) == 2:
                first = I.SendActivation if s % 2 == 0 else I.RecvActivation
                assert kinds[0] is first


@pytest.mark.parametrize("mbs,S", COMBOS)
def test_train_schedule(mbs, S):
    sim = Sim(lambda s, _: TrainSchedule(mbs, S, s), S, mbs)
    sim.run()
    assert sim.n_steps == [2 * (mbs + S - 1)] * S
    # Activations forward and gradients backward, each matched once.
    assert len(sim.matches) == 2 * mbs * (S - 1)
    keys = collections.Counter((type(a).__name__, a.stage_id, a.micro_batch_id) for a, _ in sim.matches)
    assert set(keys.values()) == ({1} if S > 1 else set())
    for a, b in sim.matches:
        assert a.step_id == b.step_id
    for s in range(S):
        assert all(sim.fwd[s][m] == 1 and sim.bwd[s][m] == 1 for m in range(mbs))
        # 1F1B memory bound.
        assert sim.max_inflight[s] <= min(S - s, mbs)
        assert sim.max_inflight[s] == min(S - s, mbs)
        last = sim.log[s][-2:]
        assert [type(x) for x in last] == [I.ReduceGrads, I.OptimizerStep]
        assert last[0].step_id == 2 * (mbs + S - 1) - 1
        assert sim.scheds[s].num_activation_buffers >= 2
    for m in range(mbs):
        sim.forwards_in_stage_order(m)
        bsteps = [next(i.step_id for i in sim.log[s] if isinstance(i, I.BackwardPass) and i.micro_batch_id == m)
                  for s in range(S)]
        fstep = next(i.step_id for i in sim.log[S - 1] if isinstance(i, I.ForwardPass) and i.micro_batch_id == m)
        assert fstep < bsteps[S - 1]
        assert all(bsteps[s] > bsteps[s + 1] for s in range(S - 1)), bsteps


def test_steps_unpack_as_tuples():
    for step_id, mbid, cmds in InferenceSchedule(2, 2, 1).steps():
        assert all(c.step_id == step_id for c in cmds)
        assert mbid == step_id - 1 or mbid == -1


def test_train_alternates_forward_backward():
    sc = TrainSchedule(4, 3, 1)
    kinds = [sc.step_to_micro_batch(t)[1] for t in range(sc.num_steps)]
    assert all(a != b for a, b in zip(kinds, kinds[1:]))


def _run_generate(mbs, S, T, stop_at: Optional[List[int]]):
    produced: Dict[int, int] = {}  # micro-batch -> step its termination flag was sampled
    gen = collections.Counter()

    def make(s, sim):
        def is_terminated(m):
            # Visible from the step after it was sampled, identically everywhere.
            return m in produced and produced[m] < sim.t
        return GenerateSchedule(mbs, S, s, T, is_terminated if stop_at else None)

    sim = Sim(make, S, mbs)

    def on_forward(s, m, t):
        if s == S - 1:
            gen[m] += 1
            if stop_at and gen[m] >= stop_at[m]:
                produced.setdefault(m, t)

    sim.on_forward = on_forward
    sim.run()
    return sim, gen


GEN_COMBOS = [(m, s, T) for m in (1, 2, 3, 5) for s in (1, 2, 3, 4) for T in (1, 2, 5)]


@pytest.mark.parametrize("mbs,S,T", GEN_COMBOS)
def test_generate_schedule_full(mbs, S, T):
    sim, gen = _run_generate(mbs, S, T, None)
    P = max(mbs, S)
    assert all(gen[m] == T for m in range(mbs))
    for s in range(S):
        assert all(sim.fwd[s][m] == T for m in range(mbs))
        assert sim.n_steps[s] <= sim.scheds[s].max_steps == T * P + mbs - 1
    assert max(sim.n_steps) == (T - 1) * P + mbs + S - 1
    if S > 1:
        assert all(sim.tokens[m] == T for m in range(mbs))
        tok = [(a, b) for a, b in sim.matches if isinstance(a, I.SendNextTokens)]
        assert len(tok) == mbs * T
        assert all(a.stage_id == S - 1 and b.stage_id == 0 for a, b in tok)
    for m in range(mbs):
        sim.forwards_in_stage_order(m, rounds=T)


@pytest.mark.parametrize("seed", range(30))
def test_generate_schedule_early_termination(seed):
    rng = random.Random(seed)
    mbs, S, T = rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 8)
    stop_at = [rng.randint(1, T) for _ in range(mbs)]
    sim, gen = _run_generate(mbs, S, T, stop_at)
    for m in range(mbs):
        assert gen[m] == stop_at[m]
        for s in range(S):
            assert sim.fwd[s][m] == stop_at[m]
        sim.forwards_in_stage_order(m, rounds=stop_at[m])
    full, _ = _run_generate(mbs, S, T, None)
    assert max(sim.n_steps) <= max(full.n_steps)
    if max(stop_at) < T:
        assert max(sim.n_steps) < max(full.n_steps)


def test_generate_all_stop_first_round_ends_fast():
    sim, gen = _run_generate(3, 3, 100, [1, 1, 1])
    assert max(sim.n_steps) == 3 + 3 - 1


def test_simulator_detects_deadlock():
    class Bad(InferenceSchedule):
        def steps(self):
            for st in super().steps():
                # Everyone receives first: the pipeline stalls.
                st.instructions.sort(key=lambda c: not isinstance(c, I.RecvActivation))
                yield st

    class BadRing(GenerateSchedule):
        def steps(self):
            for st in super().steps():
                st.instructions.sort(key=lambda c: not isinstance(c, (I.RecvActivation, I.RecvNextTokens)))
                yield st

    Sim(lambda s, _: Bad(3, 3, s), 3, 3).run()  # a chain never deadlocks
    with pytest.raises(Deadlock):
        Sim(lambda s, _: BadRing(3, 3, s, 3), 3, 3).run()


def test_schedule_argument_errors():
    with pytest.raises(ValueError):
        TrainSchedule(0, 2, 0)
    with pytest.raises(ValueError):
        InferenceSchedule(2, 2, 2)
    with pytest.raises(ValueError):
        GenerateSchedule(2, 2, 0, 0)
