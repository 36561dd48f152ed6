"""A tiny SFT experiment built directly as an ExperimentConfig."""

from __future__ import annotations

import dataclasses

import realhf.impl.dataset  # noqa: F401
import realhf.impl.model  # noqa: F401
import realhf.impl.model.backend  # noqa: F401
import realhf.impl.model.interface  # noqa: F401
import realhf.impl.model.real_model_factory  # noqa: F401
from realhf.api.core import dfg
from realhf.api.core import system_api as sa
from realhf.api.core.config import ModelName
from realhf.api.core.model_api import get_hf_family
from realhf.assets import DATA_DIR, TOKENIZER_DIR
from realhf.base.topology import PipeDataModelParallelTopology

import os


def tiny_llama(vocab: int = 4096):
    return dataclasses.replace(get_hf_family("llama").real_config_maker(), vocab_size=vocab, n_layers=2,
                               hidden_dim=64, intermediate_dim=128, n_positions=512)


def sft_experiment(dp: int, tp: int, pp: int, n_seqs: int = 16, benchmark_steps=None, epochs: int = 1,
                   lr: float = 3e-3, eval_steps=None, save_steps=None) -> sa.ExperimentConfig:
    name = ModelName("default", 0)
    topo = PipeDataModelParallelTopology(pp, dp, tp)
    model = sa.Model("real_model", args=dict(family="llama", config=tiny_llama(), tokenizer_path=TOKENIZER_DIR,
                                             init_from_scratch=True))
    backend = sa.ModelBackend("train", args=dict(optimizer=dict(lr=lr, warmup_steps_proportion=0.0,
                                                               lr_scheduler_type="constant")))
    valid = sa.Dataset("prompt_answer", args=dict(max_length=256,
                                                  dataset_path=os.path.join(DATA_DIR, "sft-valid.jsonl")))
    shards = sa.make_layout_shards(name, topo, list(range(dp * tp * pp)), model, backend,
                                   eval_dataset=valid, eval_bs=32)
    train = sa.Dataset("prompt_answer", args=dict(max_length=256,
                                                  dataset_path=os.path.join(DATA_DIR, "sft-valid.jsonl")))
    workers = [sa.ModelWorker(base_seed=1, shards=[shards[r]], datasets=[train], tokenizer_name_or_path=TOKENIZER_DIR)
               for r in range(dp * tp * pp)]
    rpc = dfg.MFCDef("trainDefault", n_seqs, "train_step", dfg.ModelInterface("sft"), name,
                     input_keys=["packed_input_ids", "prompt_mask"], n_mbs=2)
    ctrl = sa.ExperimentSaveEvalControl(total_train_epochs=epochs, benchmark_steps=benchmark_steps,
                                        eval_freq_steps=eval_steps, save_freq_steps=save_steps)
    return sa.ExperimentConfig(ctrl, [rpc], workers, dataset_keys=["packed_input_ids", "prompt_mask"])
