"""Step time of a whole plan: the master's concurrency rules replayed on the cost model.

Rules mirrored from ``realhf/system/master_worker.py``: a call starts once
the calls it reads from have ended, the previous call of the same model role
(in graph order) has ended, and every device of its mesh is idle; calls on
disjoint meshes therefore overlap and calls sharing a device serialize. A
call of a trained role whose assignment differs from the role's train call
first receives the weights (reallocation), which occupies both meshes.
Memory per device = resident train states of the meshes it belongs to +
the largest transient need of any call it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Tuple

from realhf.search.cost import CallCost, call_cost, realloc_time
from realhf.search.hardware import DeviceProfile
from realhf.search.workload import TRAIN, Assignment, CallSpec

INF = float("inf")
OOM_PENALTY_S = 1e6  # added to infeasible plans so any feasible plan ranks first


@dataclasses.dataclass
class PlanResult:
    seconds: float  # step time (INF when out of memory)
    oom: bool
    timeline: Dict[str, Tuple[float, float]]  # call -> (start, end), reallocation included
    realloc: Dict[str, float]
    peak_memory: float  # bytes on the fullest device
    raw_seconds: float = 0.0  # step time ignoring memory
    score: float = 0.0  # what the search minimizes: raw time, penalized by memory overflow when OOM


class PlanEvaluator:
    """Evaluates plans for fixed calls and hardware, caching per-call costs."""

    def __init__(self, calls: List[CallSpec], prof: DeviceProfile, n_devices: int):
        self.calls = calls
        self.prof = prof
        self.n_devices = n_devices
        self.by_name = {c.name: c for c in calls}
        self.train_call = {c.role: c.name for c in calls if c.kind == TRAIN}
        self._cache: Dict[Tuple[str, Assignment], CallCost] = {}

    def cost(self, call: str, a: Assignment) -> CallCost:
        spans = a.mesh.spans_nodes(self.prof.devices_per_node)
        key = (call, Assignment(type(a.mesh)(0 if not spans else -1, a.mesh.size), a.layout))
        c = self._cache.get(key)
        if c is None:
            c = call_cost(self.by_name[call], a, self.prof)
            self._cache[key] = c
        return c

    def memory_ok(self, plan: Mapping[str, Assignment]) -> Tuple[bool, float]:
        state = [0.0] * self.n_devices
        transient = [0.0] * self.n_devices
        for name, a in plan.items():
            c = self.cost(name, a)
            for d in a.mesh.devices:
                state[d] += c.state_bytes
                transient[d] = max(transient[d], c.transient_bytes)
        peak = max(s + t for s, t in zip(state, transient))
        return peak <= self.prof.usable_memory_fraction * self.prof.memory_bytes, peak

    def evaluate(self, plan: Mapping[str, Assignment]) -> PlanResult:
        free = [0.0] * self.n_devices
        end: Dict[str, float] = {}
        timeline: Dict[str, Tuple[float, float]] = {}
        reallocs: Dict[str, float] = {}
        last_of_role: Dict[str, str] = {}
        oom = False
        for call in self.calls:
            a = plan[call.name]
            c = self.cost(call.name, a)
            oom = oom or c.oom
            ready = max([end.get(d, 0.0) for d in call.deps] + [0.0])  # calls outside the plan: ignored
            prev = last_of_role.get(call.role)
            if prev is not None:
                ready = max(ready, end[prev])
            devices = list(a.mesh.devices)
            r = 0.0
            tc = self.train_call.get(call.role)
            if call.trained_role and tc is not None and tc != call.name and plan[tc] != a:
                r = realloc_time(call.model, plan[tc], a, self.prof)
                devices = sorted(set(devices) | set(plan[tc].mesh.devices))
            start = max([ready] + [free[d] for d in devices])
            finish = start + r + c.seconds
            for d in devices:
                free[d] = finish
            end[call.name] = finish
            timeline[call.name] = (start, finish)
            reallocs[call.name] = r
            last_of_role[call.role] = call.name
        mem_ok, peak = self.memory_ok(plan)
        oom = oom or not mem_ok
        step = (max(end.values()) if end else 0.0) + self.prof.step_overhead_s
        cap = self.prof.usable_memory_fraction * self.prof.memory_bytes
        score = step * (1 + 10 * max(0.0, peak / cap - 1)) + OOM_PENALTY_S if oom else step
        return PlanResult(INF if oom else step, oom, timeline, reallocs, peak, step, score)

    def seconds(self, plan: Mapping[str, Assignment]) -> float:
        return self.evaluate(plan).seconds

    def score(self, plan: Mapping[str, Assignment]) -> float:
        """Step time of feasible plans; infeasible ones rank after all feasible ones, by overflow."""
        return self.evaluate(plan).score


def format_plan(plan: Mapping[str, Assignment]) -> str:
    return ", ".join(f"{k}:{v}" for k, v in plan.items())


__all__ = ["PlanEvaluator", "PlanResult", "format_plan", "INF"]
