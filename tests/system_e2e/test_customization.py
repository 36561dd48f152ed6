"""The customization idiom of the documentation works against our ExperimentConfig."""

import dataclasses
import os

import pytest

from realhf import PPOConfig, SFTConfig
from realhf.api.core import config as config_api
from realhf.api.core import dfg, model_api
from realhf.api.core.system_api import ExperimentConfig
from realhf.api.quickstart.entrypoint import QUICKSTART_EXPS, parse_quickstart, register_quickstart_exp
from realhf.assets import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")


class MySFT(SFTConfig):
    def initial_setup(self):
        cfg = super().initial_setup()
        for mw in cfg.model_worker:
            for s in mw.shards:
                if s.id.model_name.role == "default":
                    s.model = config_api.Model("tokenizer", args=dict(tokenizer_path=self.model.path))
                    s.backend = config_api.ModelBackend("null")
        idx = 0
        for rpc in cfg.model_rpcs:
            if rpc.model_name.role == "default":
                break
            idx += 1
        rpc = cfg.model_rpcs[idx]
        rpc.interface_impl = dfg.ModelInterface("my_scoring")
        rpc.post_hooks = []
        cfg.resolve()
        return cfg


def test_documented_customization_idiom():
    register_quickstart_exp("my-sft", MySFT)
    try:
        cfg = parse_quickstart("my-sft", [
            "experiment_name=custom", "trial_name=t", f"model.path={TINY}", "model.init_from_scratch=True",
            f"dataset.train_path={os.path.join(DATA_DIR, 'sft-train.jsonl')}", "n_gpus_per_node=2",
            "allocation_mode=d2p1m1", "dataset.train_bs_n_seqs=8",
        ])
        exp = cfg.initial_setup()
    finally:
        QUICKSTART_EXPS.unregister("my-sft")
    assert all(s.model.type_ == "tokenizer" and s.backend.type_ == "null"
               for mw in exp.model_worker for s in mw.shards)
    assert exp.model_rpcs[0].interface_impl.type_ == "my_scoring" and exp.model_rpcs[0].post_hooks == []
    assert len(exp.model_layouts) == 1


# ---------------------------------------------------------------------------
# The PPO reward customization, written exactly as the documentation shows it
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class DecodedTextReward(model_api.ModelInterface):
    """Reward 0.5 for every sequence whose text the reward "model"'s tokenizer decodes."""

    def inference(self, model, input_, mb_spec=None):
        import torch

        from realhf.api.core.data_api import SequenceSample

        assert model.module is None  # a tokenizer-only model on the null backend
        ids = input_.data["packed_input_ids"].cpu()
        lens = [sum(s) for s in input_.seqlens["packed_input_ids"]]
        texts = model.tokenizer.batch_decode([t.tolist() for t in torch.split(ids, lens)], skip_special_tokens=True)
        scores = [0.5 if isinstance(t, str) and t else -0.5 for t in texts]
        return SequenceSample(keys={"rewards"}, trailing_shapes={"rewards": ()}, dtypes={"rewards": torch.float32},
                              ids=list(input_.ids), seqlens={"rewards": [[1] for _ in input_.ids]},
                              data={"rewards": torch.tensor(scores, dtype=torch.float32)}, metadata={})


class MyPPOConfig(PPOConfig):

    def initial_setup(self) -> ExperimentConfig:
        cfg = super().initial_setup()
        for mw in cfg.model_worker:
            for s in mw.shards:
                if s.id.model_name.role == "reward":
                    # Remove the original reward model because we are using a customized one.
                    s.model = config_api.Model(
                        "tokenizer",
                        args=dict(
                            tokenizer_path=self.rew.path,
                        ),
                    )
                    s.backend = config_api.ModelBackend("null")
        # Change the MFC of Reward.
        idx = 0
        for rpc in cfg.model_rpcs:
            if rpc.model_name.role == "reward":
                break
            idx += 1
        inf_reward_rpc = cfg.model_rpcs[idx]
        inf_reward_rpc.interface_impl = dfg.ModelInterface("decoded_text_reward")
        inf_reward_rpc.post_hooks = []
        return cfg


@pytest.mark.distributed
def test_documented_ppo_reward_customization_runs(tmp_path):
    from realhf.system.pipe_runner import run_with_pipes

    model_api.register_interface("decoded_text_reward", DecodedTextReward)
    register_quickstart_exp("my-ppo-doc", MyPPOConfig)
    try:
        args = ["experiment_name=my-ppo", "trial_name=t", "n_gpus_per_node=2", "allocation_mode=d2p1m1",
                f"dataset.path={os.path.join(DATA_DIR, 'prompt-train.jsonl')}", "dataset.train_bs_n_seqs=4",
                "dataset.max_prompt_len=32", "ppo.max_new_tokens=6", "ppo.min_new_tokens=1",
                "ppo.kl_ctl=0.1", "ppo.top_p=0.9", "ppo.top_k=1000", "ppo.ppo_n_minibatches=1",
                "exp_ctrl.benchmark_steps=1"]
        for role in ("actor", "critic", "ref", "rew"):
            args += [f"{role}.path={TINY}", f"{role}.init_from_scratch=True"]
        config = parse_quickstart("my-ppo-doc", args)
        cfg = config.initial_setup()
        rew = [s for mw in cfg.model_worker for s in mw.shards if s.id.model_name.role == "reward"]
        assert rew and all(s.model.type_ == "tokenizer" and s.backend.type_ == "null" for s in rew)
        history = run_with_pipes(cfg, "my-ppo", "t", timeout=180, fileroot=str(tmp_path)).history
    finally:
        QUICKSTART_EXPS.unregister("my-ppo-doc")
        model_api.INTERFACES.unregister("decoded_text_reward")
    assert len(history) == 1
    assert history[0].stats["actor_train"]["task_reward"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# A new dataset through the ``datasets`` property, as the documentation shows
# ---------------------------------------------------------------------------
def test_custom_dataset_through_datasets_property(tmp_path):
    import json

    from tests.system_e2e._cli import run_quickstart, tiny_sft

    module = os.path.join(ROOT, "tests", "system_e2e", "_my_dataset.py")
    res, log_dir = run_quickstart(tmp_path, "my-sft-data", "my-data", tiny_sft(
        "n_records=6", "n_gpus_per_node=1", "allocation_mode=d1", "dataset.max_seqlen=128",
        "dataset.train_bs_n_seqs=4", "exp_ctrl.total_train_epochs=2"), imports=[module])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(log_dir, "stats.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"stats"' in line]
    # 6 records in batches of 4: 2 steps per epoch (the embedded file would give hundreds).
    assert len(steps) == 4, len(steps)
