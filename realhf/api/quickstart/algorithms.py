"""Quickstart configs of the reward-modeling, DPO and generation experiments (reference §2)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from realhf.api.core.model_api import GenerationHyperparameters
from realhf.api.core.system_api import Dataset, ExperimentConfig
from realhf.api.quickstart.base import ConfigError
from realhf.api.quickstart.checks import (
    check_batch_covers_dp,
    check_language_model,
    check_prompt_room,
    check_seqlen_fits,
)
from realhf.api.quickstart.dataset import PairedComparisonDatasetConfig, PromptOnlyDatasetConfig
from realhf.api.quickstart.experiment import CommonExperimentConfig
from realhf.api.quickstart.heuristic import heuristic_mfc
from realhf.api.quickstart.model import MFCConfig, ModelTrainEvalConfig
from realhf.api.quickstart.ppo import PPOHyperparameters, validate_generation


def _prompt_dataset(ds: PromptOnlyDatasetConfig) -> Dataset:
    return Dataset("prompt", args=dict(dataset_path=ds.path, max_length=ds.max_prompt_len,
                                       pad_to_max_length=ds.pad_to_max_length))


def _critic_model() -> ModelTrainEvalConfig:
    m = ModelTrainEvalConfig()
    m.type = dataclasses.replace(m.type, is_critic=True)
    return m


@dataclasses.dataclass
class RWConfig(CommonExperimentConfig):
    """Reward modeling on preference pairs: one MFC ``rwTrain`` training a critic.

    ``model`` must be a critic (``model.type.is_critic=True``); an LM
    checkpoint gets a fresh scalar head (``model.init_critic_from_actor``).
    """

    is_sft_lora: bool = False
    sft_lora_path: Optional[str] = None
    model: ModelTrainEvalConfig = dataclasses.field(default_factory=_critic_model)
    allocation: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    dataset: PairedComparisonDatasetConfig = dataclasses.field(default_factory=PairedComparisonDatasetConfig)

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        return {"rwTrain": self.allocation}

    @property
    def train_mfc_names(self) -> Sequence[str]:
        return ("rwTrain",)

    @property
    def allocation_keys(self) -> Dict[str, str]:
        return {"rwTrain": "allocation"}

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        return {"rwTrain": ("model", self.model)}

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        return {"rwTrain": (self.dataset.max_seqlen, "dataset.max_seqlen")}

    @property
    def datasets(self) -> List[Dataset]:
        ds = self.dataset
        return [Dataset("rw_pair", args=dict(max_length=ds.max_seqlen, dataset_path=ds.train_path,
                                             max_pairs_per_prompt=ds.max_pairs_per_prompt))]

    def validate(self, *, check_paths: bool = True) -> None:
        super().validate()
        if self.is_sft_lora or self.sft_lora_path:
            raise ConfigError("is_sft_lora / sft_lora_path: LoRA is not available yet; unset them.")
        if not self.model.type.is_critic:
            raise ConfigError("model.type.is_critic=False: reward modeling trains a critic; set model.type.is_critic=True.")
        self.model.validate("model", check_path=check_paths)
        self.dataset.validate("dataset", check_paths=check_paths)
        self.allocation.validate("allocation")
        allocs = self.resolved_allocations()
        check_batch_covers_dp("dataset.train_bs_n_seqs", self.dataset.train_bs_n_seqs, allocs, self.allocation_keys)
        check_seqlen_fits("dataset.max_seqlen", self.dataset.max_seqlen, "model", self.model)

    def initial_setup(self) -> ExperimentConfig:
        """The workers and dataflow graph of this run (built by :mod:`realhf.experiments.common.rw_exp`)."""
        from realhf.experiments.common import rw_exp

        return rw_exp.build(self)


@dataclasses.dataclass
class DPOConfig(CommonExperimentConfig):
    """Direct preference optimization: ``ref_inf`` (frozen reference) then ``actor_train``."""

    is_sft_lora: bool = False
    sft_lora_path: Optional[str] = None
    actor: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    ref: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    actor_train: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    ref_inf: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    dataset: PairedComparisonDatasetConfig = dataclasses.field(default_factory=PairedComparisonDatasetConfig)
    beta: float = 0.1

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        return {"actor_train": self.actor_train, "ref_inf": self.ref_inf}

    @property
    def train_mfc_names(self) -> Sequence[str]:
        return ("actor_train",)

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        return {"actor_train": ("actor", self.actor), "ref_inf": ("ref", self.ref)}

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        return {n: (self.dataset.max_seqlen, "dataset.max_seqlen") for n in ("actor_train", "ref_inf")}

    @property
    def datasets(self) -> List[Dataset]:
        ds = self.dataset
        return [Dataset("rw_pair", args=dict(max_length=ds.max_seqlen, dataset_path=ds.train_path,
                                             max_pairs_per_prompt=ds.max_pairs_per_prompt))]

    def validate(self, *, check_paths: bool = True) -> None:
        super().validate()
        if self.is_sft_lora or self.sft_lora_path:
            raise ConfigError("is_sft_lora / sft_lora_path: LoRA is not available yet; unset them.")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta}: the DPO temperature must be positive.")
        for key in ("actor", "ref"):
            m = getattr(self, key)
            check_language_model(key, m, "DPO")
            m.validate(key, check_path=check_paths)
        self.dataset.validate("dataset", check_paths=check_paths)
        for key in ("actor_train", "ref_inf"):
            getattr(self, key).validate(key)
        allocs = self.resolved_allocations()
        check_batch_covers_dp("dataset.train_bs_n_seqs", self.dataset.train_bs_n_seqs, allocs, self.allocation_keys)
        for key in ("actor", "ref"):
            check_seqlen_fits("dataset.max_seqlen", self.dataset.max_seqlen, key, getattr(self, key))

    def initial_setup(self) -> ExperimentConfig:
        """The workers and dataflow graph of this run (built by :mod:`realhf.experiments.common.dpo_exp`)."""
        from realhf.experiments.common import dpo_exp

        return dpo_exp.build(self)


@dataclasses.dataclass
class GenerationConfig(CommonExperimentConfig):
    """Generate answers for a prompt file with ``model``; writes ``output_file`` (JSONL) in the log dir."""

    model: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    dataset: PromptOnlyDatasetConfig = dataclasses.field(default_factory=PromptOnlyDatasetConfig)
    allocation: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    output_file: str = "output.jsonl"

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        return {"gen": self.allocation}

    @property
    def allocation_keys(self) -> Dict[str, str]:
        return {"gen": "allocation"}

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        return {"gen": ("model", self.model)}

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        return {"gen": (self.dataset.max_prompt_len, "dataset.max_prompt_len")}

    @property
    def datasets(self) -> List[Dataset]:
        return [_prompt_dataset(self.dataset)]

    def validate(self, *, check_paths: bool = True) -> None:
        super().validate()
        if not self.output_file.endswith(".jsonl") or "/" in self.output_file:
            raise ConfigError(f"output_file={self.output_file!r} must be a file name ending in .jsonl (no '/'); "
                              "it is written in the trial's log directory.")
        check_language_model("model", self.model, "generation")
        self.model.validate("model", check_path=check_paths)
        validate_generation(self.gen, "gen")
        self.dataset.validate("dataset", check_paths=check_paths)
        self.allocation.validate("allocation")
        allocs = self.resolved_allocations()
        check_batch_covers_dp("dataset.train_bs_n_seqs", self.dataset.train_bs_n_seqs, allocs, self.allocation_keys)
        check_prompt_room("dataset.max_prompt_len", self.dataset.max_prompt_len, "model", self.model)

    def initial_setup(self) -> ExperimentConfig:
        """The workers and dataflow graph of this run (built by :mod:`realhf.experiments.common.gen_exp`)."""
        from realhf.experiments.common import gen_exp

        return gen_exp.build(self)



PPO_MFCS = ("actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train")


@dataclasses.dataclass
class PPOConfig(CommonExperimentConfig):
    """RLHF with PPO: actor, critic, frozen reference and reward models; six MFCs (reference §4)."""

    is_sft_lora: bool = False
    sft_lora_path: Optional[str] = None
    is_rew_lora: bool = False
    rew_lora_path: Optional[str] = None
    rew_head_path: Optional[str] = None
    actor: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    critic: ModelTrainEvalConfig = dataclasses.field(default_factory=_critic_model)
    ref: ModelTrainEvalConfig = dataclasses.field(default_factory=ModelTrainEvalConfig)
    rew: ModelTrainEvalConfig = dataclasses.field(default_factory=_critic_model)
    actor_train: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    critic_train: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    actor_gen: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    critic_inf: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    rew_inf: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    ref_inf: MFCConfig = dataclasses.field(default_factory=MFCConfig)
    dataset: PromptOnlyDatasetConfig = dataclasses.field(default_factory=PromptOnlyDatasetConfig)
    ppo: PPOHyperparameters = dataclasses.field(default_factory=PPOHyperparameters)

    @property
    def allocations(self) -> Dict[str, MFCConfig]:
        return {n: getattr(self, n) for n in PPO_MFCS}

    @property
    def train_mfc_names(self) -> Sequence[str]:
        return ("actor_train", "critic_train")

    @property
    def mfc_models(self) -> Dict[str, Tuple[str, ModelTrainEvalConfig]]:
        return {"actor_gen": ("actor", self.actor), "actor_train": ("actor", self.actor),
                "critic_inf": ("critic", self.critic), "critic_train": ("critic", self.critic),
                "ref_inf": ("ref", self.ref), "rew_inf": ("rew", self.rew)}

    def longest_sequences(self) -> Dict[str, Tuple[int, str]]:
        prompt = self.dataset.max_prompt_len
        new = self.ppo.max_new_tokens if self.ppo.max_new_tokens is not None else self.ppo.gen.max_new_tokens
        full = (prompt + new, "dataset.max_prompt_len + ppo.gen.max_new_tokens")
        return {n: ((prompt, "dataset.max_prompt_len") if n == "actor_gen" else full) for n in PPO_MFCS}

    @property
    def datasets(self) -> List[Dataset]:
        return [_prompt_dataset(self.dataset)]

    def validate(self, *, check_paths: bool = True) -> None:
        super().validate()
        if self.is_sft_lora or self.sft_lora_path or self.is_rew_lora or self.rew_lora_path:
            raise ConfigError("LoRA options (is_sft_lora, sft_lora_path, is_rew_lora, rew_lora_path) are not available yet.")
        if self.rew_head_path is not None:
            raise ConfigError(
                f"rew_head_path={self.rew_head_path!r}: a separately saved reward head is only used with a LoRA "
                "reward model, which is not available; point rew.path at the whole reward model that the rw "
                "experiment saves (it includes the value head) and set rew_head_path=null."
            )
        for key, critic in (("actor", False), ("ref", False), ("critic", True), ("rew", True)):
            m = getattr(self, key)
            if m.type.is_critic != critic:
                raise ConfigError(f"{key}.type.is_critic={m.type.is_critic}: the {key} model must "
                                  f"{'be' if critic else 'not be'} a critic.")
            m.validate(key, check_path=check_paths)
        self.dataset.validate("dataset", check_paths=check_paths)
        self.ppo.validate("ppo")
        for n in PPO_MFCS:
            getattr(self, n).validate(n)
        allocs = self.resolved_allocations()
        check_batch_covers_dp("dataset.train_bs_n_seqs", self.dataset.train_bs_n_seqs, allocs, self.allocation_keys)
        check_prompt_room("dataset.max_prompt_len", self.dataset.max_prompt_len, "actor", self.actor)

    def _heuristic_rpc_allocation(self) -> Dict[str, MFCConfig]:
        """Layouts sized for the devices present (``allocation_mode=heuristic``): generation and the
        reference on all of them, actor and critic training on one half each, reward and critic
        inference on one half each. Odd device counts put every call on all devices. Each call's
        (dp, tp, pp) on its mesh follows :mod:`realhf.api.quickstart.heuristic`."""
        n = self.n_nodes * self.n_gpus_per_node
        host = "localhost" if self.n_nodes == 1 else None

        def on(call, ranks):
            mesh = None if host is None or len(ranks) == n else f"{host}:" + ",".join(map(str, ranks))
            return heuristic_mfc(self, call, len(ranks), device_mesh=mesh)

        every = list(range(n))
        if n < 2 or n % 2 or host is None:
            halves = (every, every)
        else:
            halves = (every[: n // 2], every[n // 2:])
        plan = {"actor_gen": every, "ref_inf": every, "actor_train": halves[0], "rew_inf": halves[0],
                "critic_train": halves[1], "critic_inf": halves[1]}
        return {call: on(call, ranks) for call, ranks in plan.items()}

    def initial_setup(self) -> ExperimentConfig:
        """The workers and dataflow graph of this run (built by :mod:`realhf.experiments.common.ppo_exp`)."""
        from realhf.experiments.common import ppo_exp

        return ppo_exp.build(self)


__all__ = ["DPOConfig", "GenerationConfig", "PPOConfig", "RWConfig"]
