"""Search over per-call (device mesh, 3D layout, micro-batches): simulated annealing + greedy polish.

The space: for every call, an aligned device range (1, 2, 4 ... devices
inside a node, or 1, 2, 4 ... whole nodes) and every (dp, tp, pp, n_mbs)
that splits the model (tp inside a node and dividing heads, MLP width and
vocabulary; pp dividing the blocks) and fits the call's memory alone.
Plans are scored by :class:`realhf.search.plan.PlanEvaluator`.

The walk is Metropolis with a geometric temperature schedule starting from
the best of the given initial plans; each move redraws one call's
assignment (half the time keeping its mesh). A greedy pass then tries every
candidate of every call until no single change helps. Results depend only on
``seed`` and ``iters`` unless ``time_budget_s`` cuts the walk short.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from realhf.search.hardware import DeviceProfile
from realhf.search.plan import INF, PlanEvaluator
from realhf.search.workload import GENERATE, TRAIN, Assignment, CallSpec, Layout, Mesh, ModelShape

Plan = Dict[str, Assignment]


def _pow2_upto(n: int) -> List[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def candidate_meshes(n_nodes: int, per_node: int, *, whole_only: bool = False) -> List[Mesh]:
    """Aligned ranges: power-of-two slices of a node and power-of-two groups of nodes."""
    total = n_nodes * per_node
    if whole_only:
        return [Mesh(0, total)]
    meshes = set()
    for size in _pow2_upto(per_node):
        if per_node % size == 0:
            meshes.update(Mesh(s, size) for s in range(0, total, size))
    for k in _pow2_upto(n_nodes):
        if n_nodes % k == 0:
            meshes.update(Mesh(s * per_node, k * per_node) for s in range(0, n_nodes, k))
    meshes.add(Mesh(0, total))
    return sorted(meshes)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_ok(m: ModelShape, tp: int) -> bool:
    return tp == 1 or (m.n_q_heads % tp == 0 and m.intermediate % tp == 0 and m.vocab % tp == 0)


def candidate_layouts(call: CallSpec, size: int, per_node: int, max_mbs: int = 8) -> List[Layout]:
    """Valid (dp, tp, pp, n_mbs) on ``size`` devices for ``call``."""
    out = []
    m = call.model
    for tp in _divisors(size):
        if tp > per_node or not tp_ok(m, tp):
            continue
        for pp in _divisors(size // tp):
            if m.n_layers % pp:
                continue
            dp = size // (tp * pp)
            rows = call.n_seqs // dp if call.kind != TRAIN else call.n_seqs // (dp * call.n_minibatches)
            if rows < 1:
                continue
            mbs = {1, pp, 2 * pp} if call.kind == GENERATE else {1, 2, pp, 2 * pp, 4 * pp}
            for n_mbs in sorted(mbs):
                if n_mbs <= min(rows, max(max_mbs, pp * 4)):
                    out.append(Layout(dp, tp, pp, n_mbs))
    return out


@dataclasses.dataclass
class SearchResult:
    plan: Plan
    seconds: float
    iters: int
    accepted: int
    elapsed_s: float
    n_candidates: Dict[str, int]


class PlanSearch:
    """Search space and walk for one workload on one cluster."""

    def __init__(self, calls: List[CallSpec], prof: DeviceProfile, n_nodes: int,
                 meshes: Optional[Sequence[Mesh]] = None):
        self.calls = calls
        self.prof = prof
        self.n_nodes = n_nodes
        per_node = prof.devices_per_node
        self.evaluator = PlanEvaluator(calls, prof, n_nodes * per_node)
        meshes = list(meshes) if meshes is not None else candidate_meshes(n_nodes, per_node)
        self.candidates: Dict[str, List[Assignment]] = {}
        for c in calls:
            cands = []
            for mesh in meshes:
                for lay in candidate_layouts(c, mesh.size, per_node):
                    a = Assignment(mesh, lay)
                    if not self.evaluator.cost(c.name, a).oom:
                        cands.append(a)
            if not cands:
                raise ValueError(f"no layout of call {c.name!r} fits the device memory")
            self.candidates[c.name] = cands

        self.role_of = {c.name: c.role for c in calls}

    def _move_role(self, plan: Plan, role: str, rng: random.Random) -> Plan:
        """Move every call of ``role`` to one random mesh (its fastest layout there), so
        co-located calls can leave a shared mesh together."""
        names = [n for n, r in self.role_of.items() if r == role]
        meshes = sorted({a.mesh for n in names for a in self.candidates[n]})
        mesh = rng.choice(meshes)
        for n in names:
            here = [a for a in self.candidates[n] if a.mesh == mesh]
            if here:
                plan[n] = min(here, key=lambda a: (self.evaluator.cost(n, a).seconds, a))
        return plan

    def seconds(self, plan: Mapping[str, Assignment]) -> float:
        return self.evaluator.seconds(plan)

    def score(self, plan: Mapping[str, Assignment]) -> float:
        return self.evaluator.score(plan)

    def greedy_start(self) -> Plan:
        """Each call alone at its fastest assignment (a start point; may overlap badly)."""
        return {n: min(c, key=lambda a: (self.evaluator.cost(n, a).seconds, a)) for n, c in self.candidates.items()}

    def polish(self, plan: Plan, max_rounds: int = 4, deadline: float = INF) -> Plan:
        """Coordinate descent: change one call at a time to its best assignment."""
        best = dict(plan)
        best_s = self.score(best)
        for _ in range(max_rounds):
            improved = False
            for name in self.candidates:
                for a in self.candidates[name]:
                    if time.perf_counter() > deadline:
                        return best
                    trial = dict(best)
                    trial[name] = a
                    s = self.score(trial)
                    if s < best_s - 1e-12:
                        best, best_s, improved = trial, s, True
            if not improved:
                break
        return best

    def _chain(self, start: Plan, rng: random.Random, iters: int, deadline: float, t_hi: float) -> tuple:
        """One Metropolis walk from ``start``; (best plan, its score, iterations, accepted moves)."""
        cur = dict(start)
        cur_s = self.score(cur)
        best, best_s = dict(cur), cur_s
        names = sorted(self.candidates)
        scale = self.evaluator.evaluate(cur).raw_seconds
        hi, lo = t_hi * scale, 1e-4 * scale
        accepted = done = 0
        for i in range(iters):
            if time.perf_counter() > deadline:
                break
            done += 1
            temp = hi * (lo / hi) ** (i / max(1, iters - 1))
            name = rng.choice(names)
            cands = self.candidates[name]
            u = rng.random()
            trial = dict(cur)
            if u < 0.2:
                trial = self._move_role(trial, self.role_of[name], rng)
            elif u < 0.6:
                same = [a for a in cands if a.mesh == cur[name].mesh] or cands
                trial[name] = rng.choice(same)
            else:
                trial[name] = rng.choice(cands)
            s = self.score(trial)
            if s <= cur_s or rng.random() < math.exp(-(s - cur_s) / temp):
                cur, cur_s = trial, s
                accepted += 1
                if s < best_s:
                    best, best_s = dict(trial), s
        return best, best_s, done, accepted

    def run(self, *, seed: int = 0, iters: int = 4000, time_budget_s: float = 60.0,
            init: Iterable[Plan] = (), polish: bool = True, restarts: int = 4,
            t_hi: float = 0.1) -> SearchResult:
        """``restarts`` walks of ``iters / restarts`` moves, each with its own random stream derived
        from ``seed``: the first ones from each of ``init`` and the greedy start, the last from the
        best plan so far; each walk's result is polished."""
        t0 = time.perf_counter()
        deadline = t0 + time_budget_s
        starts = [dict(p) for p in init if p is not None] + [self.greedy_start()]
        best = dict(min(starts, key=self.score))
        best_s = self.score(best)
        done = accepted = 0
        for k in range(max(1, restarts)):
            rng = random.Random(seed * 7919 + k)
            # the first walks start from the given plans in turn (diversity), the last from the best so far
            origin = starts[k] if k < len(starts) and k < restarts - 1 else best
            plan, s, n, acc = self._chain(origin, rng, iters // max(1, restarts), deadline, t_hi)
            done, accepted = done + n, accepted + acc
            if polish:
                plan = self.polish(plan, deadline=deadline + time_budget_s)
                s = self.score(plan)
            if s < best_s:
                best, best_s = plan, s
        return SearchResult(best, self.seconds(best), done, accepted, time.perf_counter() - t0,
                            {n: len(c) for n, c in self.candidates.items()})

    def brute_force(self, limit: int = 200000) -> SearchResult:
        """Exhaustive optimum (small spaces only; for tests)."""
        t0 = time.perf_counter()
        names = list(self.candidates)
        total = math.prod(len(self.candidates[n]) for n in names)
        if total > limit:
            raise ValueError(f"space of {total} plans exceeds limit {limit}")
        best, best_s = None, INF
        for combo in itertools.product(*(self.candidates[n] for n in names)):
            plan = dict(zip(names, combo))
            s = self.score(plan)
            if s < best_s:
                best, best_s = plan, s
        return SearchResult(best or {}, self.seconds(best) if best else INF, total, 0, time.perf_counter() - t0,
                            {n: len(c) for n, c in self.candidates.items()})


__all__ = ["PlanSearch", "SearchResult", "candidate_meshes", "candidate_layouts", "tp_ok"]
