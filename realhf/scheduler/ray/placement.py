"""Placement of an array of worker jobs on the Ray cluster, following the device mesh.

Model worker ``i`` is global rank ``i`` of an ``n_nodes x n_gpus_per_node``
mesh, so ranks ``[k * per_node, (k + 1) * per_node)`` must share a node: the
layouts put tensor-parallel groups (and their fast collectives) inside one
node. Each such node group becomes one placement group of identical bundles
with strategy ``STRICT_PACK`` (all bundles on one node); job ``i`` runs in
bundle ``i % per_node`` of group ``i // per_node``.

A group that cannot be placed (too few CPUs/GPUs in the cluster) fails after
a timeout with the resources it asked for and those available, instead of
waiting forever.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from realhf.scheduler.client import SchedulerError


@dataclasses.dataclass(frozen=True)
class JobResources:
    """What one worker job holds: Ray logical CPUs and GPUs."""

    cpus: float = 1.0
    gpus: float = 0.0

    def bundle(self) -> Dict[str, float]:
        out = {"CPU": float(self.cpus)}
        if self.gpus:
            out["GPU"] = float(self.gpus)
        return out


def node_groups(count: int, jobs_per_node: Optional[int]) -> List[List[int]]:
    """Job indices (0-based within the array) per node group; one group when ``jobs_per_node`` is None."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}.")
    per = count if not jobs_per_node else int(jobs_per_node)
    if per < 1:
        raise ValueError(f"jobs_per_node must be positive, got {jobs_per_node}.")
    return [list(range(s, min(s + per, count))) for s in range(0, count, per)]


class MeshPlacement:
    """The placement groups of one job array; ``slot(j)`` gives the (group, bundle) of job ``j``."""

    def __init__(self, name: str, count: int, resources: JobResources, jobs_per_node: Optional[int]):
        self.name = name
        self.resources = resources
        self.groups = node_groups(count, jobs_per_node)
        self._pgs: list = []

    def create(self, timeout_s: float) -> None:
        """Reserve every group; raises SchedulerError (nothing left reserved) if one cannot be placed."""
        import ray
        from ray.util.placement_group import placement_group

        try:
            for k, jobs in enumerate(self.groups):
                bundles = [self.resources.bundle() for _ in jobs]
                self._pgs.append(placement_group(bundles, strategy="STRICT_PACK", name=f"{self.name}#{k}"))
            ready = [pg.ready() for pg in self._pgs]
            _, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
            if pending:
                raise SchedulerError(self._unplaceable_message(timeout_s))
        except BaseException:
            self.remove()
            raise

    def slot(self, job: int) -> Tuple[object, int]:
        for k, jobs in enumerate(self.groups):
            if job in jobs:
                return self._pgs[k], jobs.index(job)
        raise IndexError(job)

    def strategy(self, job: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg, bundle = self.slot(job)
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle,
                                                placement_group_capture_child_tasks=False)

    def remove(self) -> None:
        """Release every group (idempotent)."""
        from ray.util.placement_group import remove_placement_group

        for pg in self._pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass
        self._pgs = []

    def _unplaceable_message(self, timeout_s: float) -> str:
        import ray

        try:
            avail = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        except Exception:
            avail = total = "?"
        sizes = [len(g) for g in self.groups]
        return (f"Ray could not place {self.name} within {timeout_s:.0f}s: it needs {len(sizes)} node(s) with "
                f"{sizes} x {self.resources.bundle()} each (one bundle per worker, a node group on one node); "
                f"the cluster has {total} in all, {avail} free. Start Ray with more resources "
                f"(ray start --num-cpus/--num-gpus) or use fewer workers (n_gpus_per_node).")
