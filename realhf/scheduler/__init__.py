"""Job schedulers that launch and watch the worker processes of a trial."""

from realhf.scheduler.client import (
    JobException,
    JobInfo,
    JobState,
    SchedulerClient,
    SchedulerError,
    SchedulerUnavailableError,
    make,
    register_scheduler,
)

__all__ = [
    "JobException",
    "JobInfo",
    "JobState",
    "SchedulerClient",
    "SchedulerError",
    "SchedulerUnavailableError",
    "make",
    "register_scheduler",
]
