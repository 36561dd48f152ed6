"""A corpus of bad command lines: each fails with a ConfigError naming the problem."""

import json

import pytest

from realhf.api.quickstart import ConfigError
from realhf.api.quickstart.entrypoint import parse_quickstart

# (id, extra overrides appended to a valid SFT command line, substrings the message must contain)
BAD = [
    ("unknown-top-level", ["foo=1"], ["unknown key 'foo'"]),
    ("unknown-top-level-suggest", ["n_gpu_per_node=2"], ["unknown key 'n_gpu_per_node'", "did you mean 'n_gpus_per_node'"]),
    ("unknown-nested", ["model.optimizer.lrr=1e-4"], ["unknown key 'model.optimizer.lrr'", "did you mean 'model.optimizer.lr'"]),
    ("unknown-nested-leaf-elsewhere", ["lr=1e-4"], ["unknown key 'lr'", "did you mean 'model.optimizer.lr'"]),
    ("unknown-section", ["modle.path=x"], ["unknown key 'modle.path'", "did you mean 'model.path'"]),
    ("wrong-type-int", ["dataset.max_seqlen=abc"], ["dataset.max_seqlen='abc'", "expected int"]),
    ("wrong-type-float", ["model.optimizer.lr=fast"], ["model.optimizer.lr='fast'", "expected float"]),
    ("wrong-type-bool", ["model.gradient_checkpointing=maybe"], ["model.gradient_checkpointing", "expected bool"]),
    ("wrong-type-optional", ["exp_ctrl.save_freq_steps=often"], ["exp_ctrl.save_freq_steps='often'", "int or null"]),
    ("malformed-override", ["model.path"], ["override 'model.path' is malformed", "key=value"]),
    ("underscore-experiment", ["experiment_name=my_exp"], ["experiment_name='my_exp'", "'_'"]),
    ("slash-experiment", ["experiment_name=a/b"], ["experiment_name='a/b'", "'/'"]),
    ("underscore-trial", ["trial_name=t_1"], ["trial_name='t_1'", "'_'"]),
    ("fp16-on-cpu", ["model.enable_fp16=True"], ["model.enable_fp16=True", "CPU"]),
    ("fp16-and-bf16", ["model.enable_fp16=True", "model.enable_bf16=True"],
     ["model.enable_fp16=True and model.enable_bf16=True"]),
    ("tp-not-dividing-heads", ["n_gpus_per_node=3", "allocation_mode=manual",
                               "allocation.parallel.model_parallel_size=3"],
     ["allocation.parallel.model_parallel_size=3 does not divide n_q_heads=4"]),
    ("tp-not-dividing-heads-symmetric", ["n_gpus_per_node=3", "allocation_mode=m3"],
     ["model_parallel_size=3 does not divide n_q_heads=4"]),
    ("product-mismatch", ["allocation_mode=d2p2m1"], ["'d2p2m1'", "d*p*m=4", "2 workers"]),
    ("manual-product-mismatch", ["allocation_mode=manual", "allocation.parallel.data_parallel_size=4"],
     ["allocation.parallel=Parallel(mp=1,pp=1,dp=4) uses 4 devices", "has 2"]),
    ("malformed-allocation", ["allocation_mode=d2x1"], ["allocation_mode='d2x1' is malformed"]),
    ("unknown-mfc", ["allocation_mode=actor_train:d2,*:d2"], ["unknown MFC", "'actor_train'", "trainDefault"]),
    ("negative-lr", ["model.optimizer.lr=-1e-4"], ["model.optimizer.lr=-0.0001", "[0.0, inf]"]),
    ("warmup-above-one", ["model.optimizer.warmup_steps_proportion=1.5"],
     ["model.optimizer.warmup_steps_proportion=1.5", "[0.0, 1.0]"]),
    ("min-lr-ratio", ["model.optimizer.min_lr_ratio=-0.1"], ["model.optimizer.min_lr_ratio=-0.1"]),
    ("bad-scheduler", ["model.optimizer.lr_scheduler_type=step"],
     ["model.optimizer.lr_scheduler_type='step'", "'cosine'"]),
    ("slurm-without-cluster", ["mode=slurm"], ["mode='slurm' needs a Slurm cluster", "sbatch"]),
    ("bad-mode", ["mode=k8s"], ["mode='k8s'", "'local'"]),
    ("local-multi-node", ["n_nodes=2"], ["n_nodes=2 with mode='local'"]),
    ("backend-deepspeed", ["model.backend=deepspeed"], ["model.backend='deepspeed' is not available", "train"]),
    ("backend-unknown", ["model.backend=fsdp"], ["model.backend='fsdp'", "'megatron'"]),
    ("zero3", ["model.zero_stage=3"], ["model.zero_stage=3"]),
    ("offload", ["model.offload=True"], ["model.offload=True", "deepspeed"]),
    ("n-gpus-zero", ["n_gpus_per_node=0"], ["n_gpus_per_node=0", "positive integer"]),
    ("unknown-family", ["model.type._class=lama"], ["model.type._class='lama'", "Did you mean 'llama'"]),
    ("missing-model-path", ["model.path=/nonexistent/ckpt"], ["model.path='/nonexistent/ckpt'", "not an existing"]),
    ("missing-train-data", ["dataset.train_path=/nonexistent.jsonl"], ["dataset.train_path='/nonexistent.jsonl'"]),
    ("zero-batch", ["dataset.train_bs_n_seqs=0"], ["dataset.train_bs_n_seqs=0"]),
    ("zero-epochs", ["exp_ctrl.total_train_epochs=0"], ["exp_ctrl.total_train_epochs=0"]),
    ("ignore-error-with-recover", ["ignore_worker_error=True", "recover_mode=auto"],
     ["ignore_worker_error=True needs recover_mode='disabled'"]),
    ("critic-init-needs-critic", ["model.init_critic_from_actor=True"], ["model.type.is_critic=True"]),
    ("pipeline-too-deep", ["n_gpus_per_node=8", "allocation_mode=p8"], ["pipeline_parallel_size=8 exceeds the 4 layers"]),
    ("bad-n-mbs", ["allocation.n_mbs=0"], ["allocation.n_mbs=0"]),
    ("lora-unavailable", ["model.lora.dim=8"], ["model.lora", "LoRA"]),
]


@pytest.mark.parametrize("extra,needles", [pytest.param(e, n, id=i) for i, e, n in BAD])
def test_bad_config(good_overrides, extra, needles, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent-bin")  # no sbatch, whatever the machine has
    with pytest.raises(ConfigError) as e:
        parse_quickstart("sft", good_overrides + extra)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_corpus_is_large():
    assert len(BAD) >= 15


def test_good_config_parses(good_overrides):
    parse_quickstart("sft", good_overrides)


def test_unknown_experiment():
    with pytest.raises(ConfigError) as e:
        parse_quickstart("sfft", [])
    assert "Unknown quickstart experiment 'sfft'" in str(e.value)
    assert "'sft'" in str(e.value)


def test_missing_experiment_name(good_overrides):
    ov = [o for o in good_overrides if not o.startswith("experiment_name")]
    with pytest.raises(ConfigError, match="experiment_name is required"):
        parse_quickstart("sft", ov)


def test_mismatched_family(good_overrides):
    with pytest.raises(ConfigError, match=r"model.path=.*family.*gpt2"):
        parse_quickstart("sft", good_overrides + ["model.type._class=gpt2"])


def test_bad_yaml_key(good_overrides, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(json.dumps({"model": {"optimiser": {"lr": 1}}}))
    with pytest.raises(ConfigError, match=r"unknown key 'model.optimiser'.*did you mean 'model.optimizer'"):
        parse_quickstart("sft", good_overrides, config_files=[str(y)])
