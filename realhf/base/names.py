"""Key layout of the name-resolve store.

Every key of a trial lives under ``<user>/<experiment>/<trial>/`` so that
clearing one subtree removes all traces of a trial, and two users or trials
never collide. Keep all key construction here; callers must not format keys
by hand.
"""

from __future__ import annotations

from realhf.base import constants


def user_root() -> str:
    return constants.get_user()


def trial_root(experiment_name: str, trial_name: str) -> str:
    return f"{user_root()}/{experiment_name}/{trial_name}"


def trial_registry(experiment_name: str, trial_name: str) -> str:
    """Marks a trial as running; lives outside the trial's own subtree."""
    return f"{user_root()}/{experiment_name}/trial_registry/{trial_name}"


def experiment_status(experiment_name: str, trial_name: str) -> str:
    return f"{trial_root(experiment_name, trial_name)}/experiment_status"


def worker_status(experiment_name: str, trial_name: str, worker_name: str) -> str:
    return f"{trial_root(experiment_name, trial_name)}/status/{worker_name}"


def worker_status_root(experiment_name: str, trial_name: str) -> str:
    return f"{trial_root(experiment_name, trial_name)}/status"


def worker_root(experiment_name: str, trial_name: str) -> str:
    return f"{trial_root(experiment_name, trial_name)}/worker"


def worker(experiment_name: str, trial_name: str, worker_name: str) -> str:
    """Address (e.g. control endpoint) of one worker."""
    return f"{worker_root(experiment_name, trial_name)}/{worker_name}"


def worker_key(experiment_name: str, trial_name: str, key: str) -> str:
    """Free-form per-trial key for values workers exchange at setup."""
    return f"{trial_root(experiment_name, trial_name)}/worker_key/{key}"


def request_reply_stream_root(experiment_name: str, trial_name: str) -> str:
    return f"{trial_root(experiment_name, trial_name)}/request_reply_stream"


def request_reply_stream(
    experiment_name: str, trial_name: str, stream_name: str
) -> str:
    return f"{request_reply_stream_root(experiment_name, trial_name)}/{stream_name}"


def distributed_root(experiment_name: str, trial_name: str) -> str:
    return f"{trial_root(experiment_name, trial_name)}/distributed"


def distributed_peer(experiment_name: str, trial_name: str, model_name) -> str:
    """Subtree where the workers hosting ``model_name`` register themselves."""
    return f"{distributed_root(experiment_name, trial_name)}/peer/{model_name}"


def distributed_master(experiment_name: str, trial_name: str) -> str:
    """Address of the torch.distributed rendezvous of a trial."""
    return f"{distributed_root(experiment_name, trial_name)}/master"


def used_ports(experiment_name: str, trial_name: str, host_name: str) -> str:
    """Ports already claimed on ``host_name`` by workers of a trial."""
    return f"{trial_root(experiment_name, trial_name)}/used_ports/{host_name}"
