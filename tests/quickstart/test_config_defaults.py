"""Defaults equal realhf-reference.md section 2 (with the contract's documented exceptions)."""

import dataclasses

from realhf.api.core.config import ModelFamily
from realhf.api.quickstart import (
    AllocationConfig,
    CommonExperimentConfig,
    ExperimentSaveEvalControl,
    MFCConfig,
    ModelTrainEvalConfig,
    OptimizerConfig,
    PairedComparisonDatasetConfig,
    ParallelismConfig,
    PromptAnswerDatasetConfig,
    PromptOnlyDatasetConfig,
    SFTConfig,
)
from realhf.api.quickstart.entrypoint import parse_quickstart


def test_optimizer_defaults():
    assert dataclasses.asdict(OptimizerConfig()) == dict(
        type="empty", lr=1e-5, weight_decay=0.05, beta1=0.9, beta2=0.95, eps=1e-5, min_lr_ratio=0.0,
        lr_scheduler_type="cosine", warmup_steps_proportion=0.02, offload=False,
    )


def test_optimizer_to_backend_matches_fields():
    opt = OptimizerConfig(type="adam", lr=3e-4, warmup_steps_proportion=0.1)
    be = opt.to_backend()
    assert dataclasses.asdict(be) == dataclasses.asdict(opt)


def test_exp_ctrl_defaults():
    c = ExperimentSaveEvalControl()
    assert c.total_train_epochs == 1
    for f in ("save_freq_epochs", "save_freq_steps", "save_freq_secs", "eval_freq_epochs", "eval_freq_steps",
              "eval_freq_secs", "benchmark_steps"):
        assert getattr(c, f) is None


def test_model_defaults():
    m = ModelTrainEvalConfig()
    assert m.type == ModelFamily("llama", 7, False)
    assert m.type._class == "llama" and m.type.size == 7 and m.type.is_critic is False
    # Contract: our engine is "train" ("megatron" is an alias, "deepspeed" refused).
    assert m.backend == "train"
    assert m.path == "" and m.lora is None
    assert m.gradient_checkpointing is True
    # Contract: precision is automatic (bf16 on GPU, fp32 on CPU); fp16 is opt-in.
    assert m.enable_fp16 is False and m.enable_bf16 is None
    assert m.dtype == "float32"  # CPU (the autouse fixture hides GPUs)
    assert m.offload is False and m.zero_stage == 2
    assert m.optimizer == OptimizerConfig()
    assert m.init_from_scratch is False and m.init_critic_from_actor is False


def test_parallel_and_mfc_defaults():
    p = ParallelismConfig()
    assert (p.model_parallel_size, p.pipeline_parallel_size, p.data_parallel_size, p.use_sequence_parallel) == (
        1, 1, 1, False)
    assert str(ParallelismConfig(2, 3, 4)) == "Parallel(mp=2,pp=3,dp=4)"
    # Equality ignores sequence parallelism.
    assert ParallelismConfig(2, 1, 1, True) == ParallelismConfig(2, 1, 1, False)
    assert ParallelismConfig(2, 1, 1) != ParallelismConfig(1, 2, 1)
    a = MFCConfig()
    assert a.n_mbs is None and a.parallel == ParallelismConfig() and a.device_mesh is None
    assert AllocationConfig is MFCConfig


def test_dataset_defaults():
    assert dataclasses.asdict(PromptAnswerDatasetConfig()) == dict(
        train_path="", valid_path="", max_seqlen=1024, train_bs_n_seqs=256, valid_bs_n_seqs=256,
        pad_to_max_length=False)
    assert dataclasses.asdict(PairedComparisonDatasetConfig()) == dict(
        train_path="", valid_path="", max_pairs_per_prompt=2, max_seqlen=1024, train_bs_n_seqs=256,
        valid_bs_n_seqs=256)
    assert dataclasses.asdict(PromptOnlyDatasetConfig()) == dict(
        path="", max_prompt_len=256, train_bs_n_seqs=256, pad_to_max_length=False)


def test_ppo_defaults():
    from realhf.api.core.model_api import GenerationHyperparameters
    from realhf.api.quickstart import PPOHyperparameters

    p = PPOHyperparameters()
    assert p.gen == GenerationHyperparameters()
    d = dataclasses.asdict(p)
    d.pop("gen")
    assert d == dict(
        ppo_n_minibatches=4, kl_ctl=0.1, discount=1.0, gae_lambda=1.0, eps_clip=0.2, value_eps_clip=0.2,
        max_reward_clip=20.0, reward_output_scaling=1.0, reward_output_bias=0.0, early_stop_imp_ratio=5.0,
        use_adaptive_kl_ctl=False, adv_norm=True, value_norm=True, value_norm_type="exp",
        value_norm_beta=0.99995, value_norm_eps=1e-5,
        # shortcuts for gen.* (None: gen's value)
        max_new_tokens=None, min_new_tokens=None, greedy=None, top_p=None, top_k=None, temperature=None)
    p.validate()


def test_common_defaults():
    c = CommonExperimentConfig(experiment_name="e", trial_name="t")
    assert c.mode == "local"  # contract (reference: slurm)
    assert c.debug is True and c.partition == "dev" and c.wandb_mode == "disabled" and c.image_name is None
    assert c.recover_mode == "disabled" and c.recover_retries == 1 and c.ignore_worker_error is False
    assert c.allocation_mode == "pipe_model" and c.allocation_use_cache is False
    assert c.n_nodes == 1 and c.n_gpus_per_node == 8 and c.nodelist is None
    assert c.seed == 1 and c.cache_clear_freq == 10
    assert c.exp_ctrl == ExperimentSaveEvalControl()
    assert c.n_workers == 8
    assert CommonExperimentConfig(experiment_name="e", trial_name="t", n_nodes=2, n_gpus_per_node=3).n_workers == 6


def test_sft_fields():
    names = [f.name for f in dataclasses.fields(SFTConfig)]
    assert names[-3:] == ["model", "allocation", "dataset"]
    s = SFTConfig(experiment_name="e", trial_name="t")
    assert isinstance(s.model, ModelTrainEvalConfig)
    assert isinstance(s.allocation, MFCConfig)
    assert isinstance(s.dataset, PromptAnswerDatasetConfig)
    assert s.mfc_names == ("trainDefault",)


def test_default_pipe_model_with_tiny_model(tiny_model_dir):
    # pipe_model on 1 node x 2 workers = tp2 over the whole node.
    from realhf.assets import dataset_path

    cfg = parse_quickstart("sft", [
        "experiment_name=x", f"model.path={tiny_model_dir}", "model.init_from_scratch=True",
        f"dataset.train_path={dataset_path('sft-train')}",
        "n_gpus_per_node=2",
    ])
    assert cfg.trial_name.startswith("run") and "_" not in cfg.trial_name
    alloc = cfg.resolved_allocations()["trainDefault"]
    assert alloc.parallel == ParallelismConfig(2, 1, 1)
