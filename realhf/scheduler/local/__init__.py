"""Local (single-machine, subprocess-based) scheduler."""

from realhf.scheduler.local.client import LocalSchedulerClient

__all__ = ["LocalSchedulerClient"]
