"""Fit a machine profile's overhead terms to one measured run, to predict other plans.

From one run of a known plan we fit, by least squares over its calls,
``measured = compute_scale x modeled + call_overhead`` (a load/contention
multiplier and a fixed per-call cost), then set ``step_overhead_s`` to the
part of the median step time that the calls' critical path does not
explain. The fitted profile should be judged on a *different* plan.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

from realhf.search.cost import call_cost
from realhf.search.hardware import DeviceProfile
from realhf.search.plan import PlanEvaluator
from realhf.search.workload import Assignment, CallSpec


def fit_line(xs: List[float], ys: List[float]) -> "tuple[float, float]":
    """Least-squares (slope, intercept) with slope >= 0.1 and intercept >= 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else (my / mx if mx else 1.0)
    slope = max(0.1, slope)
    icpt = my - slope * mx
    if icpt < 0:
        icpt = 0.0
        slope = max(0.1, sum(x * y for x, y in zip(xs, ys)) / max(sum(x * x for x in xs), 1e-12))
    return slope, icpt


def calibrate(prof: DeviceProfile, calls: List[CallSpec], plan: Mapping[str, Assignment],
              measured_calls: Mapping[str, float], measured_step: float) -> DeviceProfile:
    """``prof`` with compute_scale, call_overhead_s and step_overhead_s fitted to one run of ``plan``."""
    base = dataclasses.replace(prof, compute_scale=1.0, call_overhead_s=0.0, step_overhead_s=0.0)
    names = [c.name for c in calls if c.name in measured_calls]
    by = {c.name: c for c in calls}
    xs = [call_cost(by[n], plan[n], base).seconds for n in names]
    ys = [measured_calls[n] for n in names]
    scale, overhead = fit_line(xs, ys)
    fitted = dataclasses.replace(prof, compute_scale=scale, call_overhead_s=overhead, step_overhead_s=0.0)
    path = PlanEvaluator(calls, fitted, max(a.mesh.start + a.mesh.size for a in plan.values())).evaluate(plan)
    return dataclasses.replace(fitted, step_overhead_s=max(0.0, measured_step - path.raw_seconds))


def per_call_error(prof: DeviceProfile, calls: List[CallSpec], plan: Mapping[str, Assignment],
                   measured_calls: Mapping[str, float]) -> Dict[str, float]:
    """measured / modeled per call."""
    by = {c.name: c for c in calls}
    return {n: measured_calls[n] / call_cost(by[n], plan[n], prof).seconds for n in measured_calls if n in by}


__all__ = ["calibrate", "fit_line", "per_call_error"]
