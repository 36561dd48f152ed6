"""The customization idiom of the documentation works against our ExperimentConfig."""

import os

from realhf.api.core import config as config_api
from realhf.api.core import dfg
from realhf.api.quickstart.entrypoint import QUICKSTART_EXPS, parse_quickstart, register_quickstart_exp
from realhf.assets import DATA_DIR
from realhf.experiments.common.sft_exp import SFTExperiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")


class MySFT(SFTExperiment):
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
