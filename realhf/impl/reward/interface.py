"""The ``rule_reward`` interface: rewards from decoded text, without a reward network.

It runs on a tokenizer-only model (model type ``tokenizer``, backend
``null``). For every sequence of ``packed_input_ids`` it decodes the prompt
and the completion (the completion stops at the first EOS), reads the
reference answer from the item's metadata (the dataset's extra fields, e.g.
``answer`` of the ``prompt`` dataset) and scores the texts with a reward spec
in a :class:`~realhf.impl.reward.pool.RewardPool`. Reward functions receive
as metadata the item's fields, its ``id`` and ``reference`` (the value of
``answer_key``).

Input keys: ``packed_input_ids`` and one of

* ``prompt_mask`` (True on prompt tokens; written by ``actor_gen``), or
* ``packed_prompts`` (the prompt tokens, a prefix of every sequence of the item).

The ``ppo`` experiment's ``rew_inf`` call only asks for ``packed_input_ids``,
so add ``"prompt_mask"`` to its ``input_keys`` when switching it to this
interface (see ``examples/ppo_sentiment.py`` for the same edit).

Output: ``rewards``, one float32 per sequence (seqlens ``[[n_seqs of the
item]]``, the layout of ``paired_rw``), ``(score - output_bias) * output_scaling``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec, Model, ModelInterface, register_interface
from realhf.base import constants, logging
from realhf.impl.reward.mixture import RewardSpec
from realhf.impl.reward.pool import RewardItem, RewardPool

logger = logging.getLogger("rule_reward")

INPUT_KEY = "packed_input_ids"
OUTPUT_KEY = "rewards"


def _last_pipe_stage() -> bool:
    """Whether this rank is the last pipeline stage of the active model (True outside a model scope)."""
    try:
        return constants.is_last_pipe_stage()
    except RuntimeError:
        return True


def _cut_at_eos(tokens: torch.Tensor, eos_id: Optional[int]) -> torch.Tensor:
    """Tokens before the first EOS: what follows it is not part of the answer."""
    if eos_id is None:
        return tokens
    hits = (tokens == eos_id).nonzero()
    return tokens[: int(hits[0, 0])] if hits.numel() else tokens


def split_prompt_completion(input_: SequenceSample, eos_id: Optional[int]
                            ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[int]]:
    """Prompt tokens, completion tokens (cut at EOS) and item index of every sequence."""
    if INPUT_KEY not in input_.keys:
        raise ValueError(f"rule_reward needs {INPUT_KEY!r}; the input has keys {sorted(input_.keys)}.")
    lens = [n for item in input_.seqlens[INPUT_KEY] for n in item]
    item_of = [i for i, item in enumerate(input_.seqlens[INPUT_KEY]) for _ in item]
    seqs = torch.split(input_.data[INPUT_KEY].cpu(), lens)
    if "prompt_mask" in input_.keys:
        masks = torch.split(input_.data["prompt_mask"].cpu().bool(), lens)
        prompts = [s[m] for s, m in zip(seqs, masks)]
        completions = [s[~m] for s, m in zip(seqs, masks)]
    elif "packed_prompts" in input_.keys:
        plens = [item[0] for item in input_.seqlens["packed_prompts"]]
        prompt_tokens = torch.split(input_.data["packed_prompts"].cpu(), plens)
        prompts, completions = [], []
        for s, i in zip(seqs, item_of):
            p = prompt_tokens[i]
            if len(s) < len(p) or not torch.equal(s[:len(p)], p):
                raise ValueError(f"item {input_.ids[i]!r}: packed_prompts is not a prefix of packed_input_ids.")
            prompts.append(p)
            completions.append(s[len(p):])
    else:
        raise ValueError("rule_reward needs the prompt length: add 'prompt_mask' (written by actor_gen) or "
                         f"'packed_prompts' to the reward call's input_keys; got {sorted(input_.keys)}.")
    return prompts, [_cut_at_eos(c, eos_id) for c in completions], item_of


@dataclasses.dataclass
class RuleRewardInterface(ModelInterface):
    """Reward = a rule or function mixture on decoded texts (see the module docstring).

    :param reward: reward spec, e.g. ``"math"`` or
        ``[{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1}]``.
    :param answer_key: metadata field holding the reference answer; passed to
        reward functions as ``reference``.
    :param n_workers: reward worker processes (0: in-process, no timeouts).
    :param timeout_s: limit of one reward function call on one sequence.
    :param default_reward: score of a sequence whose reward failed; None raises.
    :param output_scaling: rewards are ``(score - output_bias) * output_scaling``.
    :param output_bias: see ``output_scaling``.
    :param mp_context: start method of the workers (None: fork where available).
    """

    reward: RewardSpec = "math"
    answer_key: str = "answer"
    n_workers: int = 2
    timeout_s: float = 10.0
    default_reward: Optional[float] = 0.0
    output_scaling: float = 1.0
    output_bias: float = 0.0
    mp_context: Optional[str] = None
    pool: Optional[RewardPool] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        # Validates the spec and loads user files now; workers start on the first call.
        self.pool = RewardPool(self.reward, n_workers=self.n_workers, timeout_s=self.timeout_s,
                               default=self.default_reward, mp_context=self.mp_context)
        self._needs_reference = any(e["name"] == "math" for e in self.pool.entries)

    def texts(self, model: Model, input_: SequenceSample) -> Tuple[List[RewardItem], List[Hashable]]:
        """``(prompt, completion, metadata)`` of every sequence and the ids naming them in errors."""
        tok = model.tokenizer
        if tok is None:
            raise ValueError("rule_reward needs a model with a tokenizer (model type 'tokenizer').")
        if self._needs_reference and self.answer_key not in input_.metadata:
            raise ValueError(f"rule_reward: the 'math' reward needs the reference answer in metadata "
                             f"{self.answer_key!r}, but the items carry {sorted(input_.metadata)}; "
                             "set answer_key or add the field to the dataset.")
        prompts, completions, item_of = split_prompt_completion(input_, tok.eos_token_id)
        prompt_texts = tok.batch_decode([p.tolist() for p in prompts], skip_special_tokens=True)
        completion_texts = tok.batch_decode([c.tolist() for c in completions], skip_special_tokens=True)
        per_item: List[Dict[str, Any]] = []
        for i in range(input_.bs):
            meta = {k: v[i] for k, v in input_.metadata.items()}
            meta.setdefault("id", input_.ids[i])
            meta["reference"] = meta.get(self.answer_key)
            per_item.append(meta)
        n_seqs = [len(s) for s in input_.seqlens[INPUT_KEY]]
        seen: Dict[int, int] = {}
        ids: List[Hashable] = []
        for i in item_of:
            j = seen[i] = seen.get(i, -1) + 1
            ids.append(input_.ids[i] if n_seqs[i] == 1 else (input_.ids[i], j))
        items = [(p, c, per_item[i]) for p, c, i in zip(prompt_texts, completion_texts, item_of)]
        return items, ids

    def inference(self, model: Model, input_: SequenceSample,
                  mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``rewards`` per sequence; ``None`` off the last pipeline stage (like a reward network)."""
        if not _last_pipe_stage():
            return None
        items, ids = self.texts(model, input_)
        before = self.pool.stats
        scores = self.pool.score(items, ids)
        after = self.pool.stats
        if after["fallback"] > before["fallback"]:
            causes = {k: after[k] - before[k] for k in ("exceptions", "timeouts", "worker_deaths")}
            logger.warning(f"rule_reward: {after['fallback'] - before['fallback']} of {len(items)} sequences "
                           f"got default_reward={self.default_reward} ({causes}).")
        values = (torch.tensor(scores, dtype=torch.float64) - self.output_bias) * self.output_scaling
        return SequenceSample(
            keys={OUTPUT_KEY},
            trailing_shapes={OUTPUT_KEY: ()},
            dtypes={OUTPUT_KEY: torch.float32},
            ids=list(input_.ids),
            seqlens={OUTPUT_KEY: [[len(s)] for s in input_.seqlens[INPUT_KEY]]},
            data={OUTPUT_KEY: values.float()},
            metadata={},
        )

    def close(self) -> None:
        """Stop the reward workers (they are also stopped at exit)."""
        if self.pool is not None:
            self.pool.close()


register_interface("rule_reward", RuleRewardInterface)
