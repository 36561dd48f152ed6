"""Experiment-level configs: the common base of every quickstart experiment and SFT.

Contract differences from ReaLHF v0.3 (``realhf-reference.md`` section 2):
``mode`` defaults to ``"local"``; on CPU a "GPU" is one worker process, so
``n_gpus_per_node`` counts worker processes per node.

An experiment subclass adds its models, allocations and dataset as fields and
describes its model function calls (MFCs) through the properties
``mfc_names``, ``train_mfc_names``, ``allocations``, ``allocation_keys`` and
``mfc_models``; its ``validate()`` first calls ``super().validate()``, then
validates its own fields, then ``self.resolved_allocations()`` (see
:class:`SFTConfig`).
"""

import dataclasses
import datetime
import importlib.util
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING

from realhf.api.core.system_api import Dataset, ExperimentConfig
from realhf.api.core.system_api import ExperimentSaveEvalControl as _SystemSaveEvalControl
from realhf.api.quickstart.allocation import (
    _expand_nodelist,
    check_local_hosts,
    parse_allocation_mode,
    resolve_allocations,
)
from realhf.api.quickstart.base import (
    ConfigError,
    check_choice,
    check_finite_floats,
    check_positive_int,
    check_range,
    cuda_available,
    join_key,
)
from realhf.api.quickstart.checks import check_batch_covers_dp, check_language_model, check_seqlen_fits
from realhf.api.quickstart.dataset import PromptAnswerDatasetConfig
from realhf.api.quickstart.heuristic import whole_cluster_heuristic
from realhf.api.quickstart.model import MFCConfig, ModelTrainEvalConfig, load_real_config
from realhf.scheduler.slurm.spec import ClusterSpecError, SlurmClusterSpec, SlurmOptions

MODES = ("local", "ray", "slurm")
RECOVER_MODES = ("auto", "save", "resume", "disabled")
WANDB_MODES = ("online", "offline", "disabled")
NAME_RESOLVE_BACKENDS = ("file", "nfs", "redis")


def default_trial_name() -> str:
    """``run<timestamp>``, e.g. ``run20240101120000`` (valid: no ``_``)."""
    return "run" + datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def _is_missing(value) -> bool:
    return value is None or value == MISSING


@dataclasses.dataclass
class ExperimentSaveEvalControl(_SystemSaveEvalControl):
    """:class:`realhf.api.core.system_api.ExperimentSaveEvalControl` with CLI-style validation."""

    def validate(self, prefix: str = "exp_ctrl") -> None:
        check_positive_int(join_key(prefix, "total_train_epochs"), self.total_train_epochs)
        for f in dataclasses.fields(self):
            if f.name != "total_train_epochs":
                check_positive_int(join_key(prefix, f.name), getattr(self, f.name), allow_none=True)


@dataclasses.dataclass
class CommonExperimentConfig:
    """Fields shared by all quickstart experiments.

    :param experiment_name: required; no ``_`` or ``/``.
    :param trial_name: required (the CLI fills ``run<timestamp>``); no ``_`` or ``/``.
    :param mode: launcher: "local" (default; subprocesses on this machine),
        "ray" or "slurm".
    :param debug: False runs workers with ``python -O`` (asserts off).
    :param partition: Slurm partition.
    :param wandb_mode: "online", "offline" or "disabled"; the first two also log
        the step statistics (as in tensorboard) to wandb, which must be installed.
    :param image_name: Slurm container image override.
    :param recover_mode: "auto", "save", "resume" or "disabled".
    :param recover_retries: relaunches in "auto" recover mode.
    :param ignore_worker_error: not supported (True is refused): a failed worker
        leaves its shards and collectives in an unknown state, so the run stops;
        ``recover_mode=auto`` restarts it from the last recover state.
    :param allocation_mode: see :mod:`realhf.api.quickstart.allocation`.
    :param allocation_use_cache: reuse a cached searched allocation.
    :param n_nodes: number of nodes ("local" needs 1).
    :param n_gpus_per_node: devices per node; on CPU, worker processes per node.
    :param nodelist: Slurm nodelist, e.g. ``NODE[01-02]``.
    :param seed: random seed.
    :param cache_clear_freq: empty the CUDA cache every N steps (None = never).
    :param heartbeat_timeout_s: stop the run when a worker sends no heartbeat for
        this long (a frozen process; a busy worker keeps beating).
    :param exp_ctrl: save / evaluation / stop control.
    :param ray_address: ``mode=ray``: address of a running Ray cluster (``<host>:<port>`` printed by
        ``ray start --head``, ``ray://<host>:<port>`` or ``auto``); null = ``$RAY_ADDRESS``.
    :param slurm: resources of ``mode=slurm`` jobs (cpus/mem/gpus per worker, time limit,
        container mounts, extra sbatch arguments); see :class:`realhf.scheduler.slurm.spec.SlurmOptions`.
    :param name_resolve: how workers find each other: "file" (a directory under the file root;
        across nodes it must be on a shared file system) or "redis" (a Redis server at
        ``name_resolve_address``); null = ``$REAL_NAME_RESOLVE`` or "file".
    :param name_resolve_address: Redis URL for ``name_resolve=redis``, e.g. ``redis://head:6379/0``
        (null = ``$REAL_REDIS_URL``).
    """

    experiment_name: str = MISSING
    trial_name: str = MISSING
    mode: str = "local"
    debug: bool = True
    partition: str = "dev"
    wandb_mode: str = "disabled"
    image_name: Optional[str] = None
    recover_mode: str = "disabled"
    recover_retries: int = 1
    ignore_worker_error: bool = False
    allocation_mode: str = "pipe_model"
    allocation_use_cache: bool = False
    n_nodes: int = 1
    n_gpus_per_node: int = 8
    nodelist: Optional[str] = None
    seed: int = 1
    cache_clear_freq: Optional[int] = 10
    heartbeat_timeout_s: float = 30.0
    exp_ctrl: ExperimentSaveEvalControl = dataclasses.field(default_factory=ExperimentSaveEvalControl)
    ray_address: Optional[str] = None
    slurm: SlurmOptions = dataclasses.field(default_factory=SlurmOptions)
    name_resolve: Optional[str] = None
    name_resolve_address: Optional[str] = None

    # ---- description of the experiment's MFCs (overridden by subclasses) ----
    @property
    def n_workers(self) -> int:
        """Model worker processes (devices) of the whole cluster."""
        return self.n_nodes * self.n_gpus_per_node

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        """MFC name -> its MFCConfig field (used by ``manual`` and for ``n_mbs``)."""
        return {}

    @property
    def mfc_names(self) -> Sequence[str]:
        return tuple(self.allocations)

    @property
    def train_mfc_names(self) -> Sequence[str]:
        return ()

    @property
    def allocation_keys(self) -> Dict[str, str]:
        """MFC name -> dotted key of its MFCConfig field (for messages)."""
        return {n: n for n in self.mfc_names}

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        """MFC name -> (dotted key, model config) of the model it runs."""
        return {}

    # ---- validation ----
    def validate(self) -> None:
        check_finite_floats(self)
        for name in ("experiment_name", "trial_name"):
            value = getattr(self, name)
            if _is_missing(value) or not str(value):
                hint = "my-exp" if name == "experiment_name" else "run1"
                raise ConfigError(f"{name} is required; pass e.g. {name}={hint}.")
            bad = re.findall(r"[_/]", str(value))
            if bad:
                raise ConfigError(
                    f"{name}={value!r} contains {sorted(set(bad))}; '_' and '/' are not allowed "
                    "(they separate names in logs and name_resolve keys); use '-' instead."
                )
        check_choice("mode", self.mode, MODES)
        check_choice("wandb_mode", self.wandb_mode, WANDB_MODES)
        check_choice("recover_mode", self.recover_mode, RECOVER_MODES)
        check_range("recover_retries", self.recover_retries, 0)
        if self.ignore_worker_error and self.recover_mode != "disabled":
            raise ConfigError(
                f"ignore_worker_error=True needs recover_mode='disabled', got recover_mode={self.recover_mode!r}."
            )
        if self.ignore_worker_error:
            raise ConfigError(
                "ignore_worker_error=True is not supported: a failed worker leaves its model shards and "
                "collectives in an unknown state, so the run stops; use recover_mode=auto to restart it "
                "from the last recover state."
            )
        if self.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"wandb_mode={self.wandb_mode!r} needs the wandb package (pip install wandb); "
                              "or use wandb_mode=disabled.")
        check_positive_int("n_nodes", self.n_nodes)
        check_positive_int("n_gpus_per_node", self.n_gpus_per_node)
        check_range("seed", self.seed, 0)
        check_positive_int("cache_clear_freq", self.cache_clear_freq, allow_none=True)
        check_range("heartbeat_timeout_s", self.heartbeat_timeout_s, 5.0)
        if self.nodelist is not None:
            nodes = _expand_nodelist(self.nodelist, "nodelist")
            if self.mode == "local":
                check_local_hosts(nodes, "nodelist", self.nodelist)
        if self.mode == "local":
            if self.n_nodes != 1:
                raise ConfigError(f"n_nodes={self.n_nodes} with mode='local'; local runs use one node (n_nodes=1).")
            if cuda_available():
                import torch

                n_dev = torch.cuda.device_count()
                if self.n_gpus_per_node > n_dev:
                    raise ConfigError(
                        f"n_gpus_per_node={self.n_gpus_per_node} but this machine has {n_dev} CUDA devices."
                    )
        elif self.mode == "slurm":
            if shutil.which("sbatch") is None:
                raise ConfigError(
                    "mode='slurm' needs a Slurm cluster, but 'sbatch' is not on PATH here; "
                    "use mode=local (this machine) or mode=ray, or run from a Slurm login node."
                )
            self.slurm_cluster_spec()
        elif self.mode == "ray":
            if importlib.util.find_spec("ray") is None:
                raise ConfigError("mode='ray' needs the 'ray' package (pip install ray); or use mode=local.")
            self._validate_ray_address()
        if self.mode != "ray" and self.ray_address is not None:
            raise ConfigError(f"ray_address={self.ray_address!r} is only used with mode=ray; remove it or set mode=ray.")
        self.exp_ctrl.validate("exp_ctrl")
        self._validate_name_resolve()
        parse_allocation_mode(self.allocation_mode)
        if self.allocation_use_cache:
            raise ConfigError(
                "allocation_use_cache=True would reuse an allocation search across runs, which is not "
                "implemented: allocation_mode='search' searches again each run (seconds; the machine profile "
                "is cached in ~/.cache/realhf); set allocation_use_cache=False."
            )

    def slurm_cluster_spec(self) -> SlurmClusterSpec:
        """The validated cluster spec of ``mode=slurm`` (``slurm.*`` plus partition, nodelist, image)."""
        opts = {f.name: getattr(self.slurm, f.name) for f in dataclasses.fields(SlurmOptions)}
        opts["extra_sbatch_args"] = list(opts["extra_sbatch_args"] or [])
        spec = SlurmClusterSpec(**opts, partition=self.partition, nodelist=self.nodelist,
                                container_image=self.image_name, nodes=self.n_nodes,
                                tasks_per_node=self.n_gpus_per_node if self.n_nodes > 1 else None)
        try:
            spec.validate(keys={"partition": "partition", "nodelist": "nodelist",
                                "container_image": "image_name", "nodes": "n_nodes"})
        except ClusterSpecError as e:
            raise ConfigError(str(e)) from None
        return spec

    def _validate_name_resolve(self) -> None:
        if self.name_resolve is None:
            return
        check_choice("name_resolve", self.name_resolve, NAME_RESOLVE_BACKENDS)
        if self.name_resolve == "redis":
            if importlib.util.find_spec("redis") is None:
                raise ConfigError("name_resolve='redis' needs the redis package (pip install 'realhf[redis]').")
            addr = self.name_resolve_address or os.environ.get("REAL_REDIS_URL")
            if not addr or not re.fullmatch(r"rediss?://\S+|unix://\S+", str(addr)):
                raise ConfigError(f"name_resolve_address={addr!r} is not a Redis URL; pass e.g. "
                                  "name_resolve_address=redis://head-node:6379/0 (or set $REAL_REDIS_URL).")
        elif self.name_resolve_address is not None:
            raise ConfigError(f"name_resolve_address={self.name_resolve_address!r} is only used with "
                              "name_resolve=redis; remove it or set name_resolve=redis.")

    def _validate_ray_address(self) -> None:
        """``mode=ray`` joins an existing cluster: its address must be given and well-formed."""
        from realhf.scheduler.ray.connect import RAY_ADDRESS_ENV, address_problem

        key, addr = "ray_address", self.ray_address
        if not addr:
            key, addr = f"${RAY_ADDRESS_ENV}", os.environ.get(RAY_ADDRESS_ENV)
        if not addr:
            raise ConfigError(f"mode='ray' needs ray_address=<host>:<port> of a running Ray cluster (printed by "
                              f"`ray start --head`), or ${RAY_ADDRESS_ENV}; or use mode=local.")
        problem = address_problem(str(addr).strip())
        if problem is not None:
            raise ConfigError(f"{key}={addr!r} is not a Ray address: {problem}.")

    def resolved_allocations(self) -> Dict[str, MFCConfig]:
        """Per-MFC allocations after applying ``allocation_mode`` (checks the layouts fit the models)."""
        from realhf.impl.model.conversion.preflight import preflight_model

        model_configs = {}
        checked = set()
        for mfc, (key, model) in self.mfc_models.items():
            if key not in checked and model.path and os.path.isdir(model.path):
                checked.add(key)  # several MFCs may run the same model: check its files once
                preflight_model(key, model.type._class, model.path, is_critic=model.type.is_critic,
                                init_from_scratch=model.init_from_scratch,
                                init_critic_from_actor=model.init_critic_from_actor)
            try:
                real = load_real_config(model)
            except Exception as e:  # a checkpoint config the family cannot read
                raise ConfigError(f"{key}.path={model.path!r}: cannot read its config.json as family "
                    f"{key}.type._class={model.type._class!r} ({type(e).__name__}: {e}); does the family match "
                    "the checkpoint?") from None
            if real is not None:
                model_configs[mfc] = real
        allocs = resolve_allocations(
            self,
            self.mfc_names,
            train_mfc_names=self.train_mfc_names,
            model_configs=model_configs,
            allocation_keys=self.allocation_keys,
        )
        self._check_token_budgets(allocs)
        return allocs

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        """MFC name -> (tokens of the longest sequence it may get, the keys that bound it)."""
        return {}

    def _heuristic_rpc_allocation(self) -> Dict[str, MFCConfig]:
        """``allocation_mode=heuristic``: every call on all devices, laid out by
        :mod:`realhf.api.quickstart.heuristic` (PPO overrides it to split the devices)."""
        return whole_cluster_heuristic(self)

    @property
    def datasets(self) -> List[Dataset]:
        """The training data as the system API's datasets: a registered dataset name
        and its constructor arguments. A subclass may return another registered
        dataset; an evaluation set uses the same name and arguments with its own path."""
        return []

    def _check_token_budgets(self, allocs: Dict[str, MFCConfig]) -> None:
        """Sequences are never split across micro-batches: a budget below the longest one cannot work."""
        for mfc, (n, why) in self.longest_sequences().items():
            budget = allocs[mfc].max_tokens_per_mb if mfc in allocs else None
            if budget is not None and budget < n:
                key = self.allocation_keys.get(mfc, mfc)
                raise ConfigError(
                    f"{key}.max_tokens_per_mb={budget} is smaller than the longest sequence MFC {mfc!r} may get "
                    f"({n} tokens: {why}); sequences are never split across micro-batches, so use at least {n} "
                    "(or null for no budget)."
                )


@dataclasses.dataclass
class SFTConfig(CommonExperimentConfig):
    """Supervised fine-tuning: one MFC ``trainDefault`` training ``model`` on prompt/answer pairs.

    :param model: the trained model.
    :param allocation: layout of ``trainDefault`` (used by ``allocation_mode=manual``; its ``n_mbs`` always).
    :param dataset: prompt/answer JSONL data.
    """

    model: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    allocation: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    dataset: PromptAnswerDatasetConfig = dataclasses.field(default_factory=PromptAnswerDatasetConfig)

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        return {"trainDefault": self.allocation}

    @property
    def train_mfc_names(self) -> Sequence[str]:
        return ("trainDefault",)

    @property
    def allocation_keys(self) -> Dict[str, str]:
        return {"trainDefault": "allocation"}

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        return {"trainDefault": ("model", self.model)}

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        return {"trainDefault": (self.dataset.max_seqlen, "dataset.max_seqlen")}

    @property
    def datasets(self) -> List[Dataset]:
        return [Dataset("prompt_answer", args=dict(max_length=self.dataset.max_seqlen,
                                                   dataset_path=self.dataset.train_path,
                                                   pad_to_max_length=self.dataset.pad_to_max_length))]

    def validate(self, *, check_paths: bool = True) -> None:
        super().validate()
        check_language_model("model", self.model, "supervised fine-tuning")
        self.model.validate("model", check_path=check_paths)
        self.dataset.validate("dataset", check_paths=check_paths)
        self.allocation.validate("allocation")
        allocs = self.resolved_allocations()
        check_batch_covers_dp("dataset.train_bs_n_seqs", self.dataset.train_bs_n_seqs, allocs, self.allocation_keys)
        check_seqlen_fits("dataset.max_seqlen", self.dataset.max_seqlen, "model", self.model)

    def initial_setup(self) -> "ExperimentConfig":
        """The workers and dataflow graph of this run (built by :mod:`realhf.experiments.common.sft_exp`)."""
        from realhf.experiments.common import sft_exp

        return sft_exp.build(self)


__all__ = ["CommonExperimentConfig", "ExperimentSaveEvalControl", "SFTConfig", "default_trial_name"]
