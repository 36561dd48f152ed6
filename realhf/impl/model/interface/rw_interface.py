"""Paired reward modeling (Bradley-Terry) with a critic model.

Input items (the ``rw_pair`` dataset) hold ``packed_input_ids`` with an even
number of sequences per item, alternating chosen and rejected answers of one
prompt: ``pos1, neg1, pos2, neg2, ...``. The score of a sequence is the
critic's value at its last token.

Loss of the global batch of ``N`` items, item ``i`` holding ``k_i`` pairs::

    L = (1 / N) * sum_i (1 / k_i) * sum_j -logsigmoid(s_pos_ij - s_neg_ij)

i.e. the mean over prompts of the mean pair loss of the prompt, so a prompt
with many pairs does not outweigh one with a single pair. A micro-batch
returns the mean over its items and is weighted by its item count; the
engine normalizes the weights over all micro-batches of all data-parallel
ranks, so the step is that of ``L`` on the concatenated global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec, Model, register_interface
from realhf.impl.model.interface.common import TrainedModelInterface, forward_sums
from realhf.impl.model.backend.inference import INPUT_KEY, EngineModule, packed_inputs


# --------------------------------------------------------------------- helpers
def as_engine(module: Any) -> EngineModule:
    """The engine in ``model.module`` (a bare network gets a plain inference engine)."""
    return module if isinstance(module, EngineModule) else EngineModule(module)


def pair_counts(mb: SequenceSample, key: str = INPUT_KEY) -> List[int]:
    """Pairs per item; raises if an item holds an odd number of sequences."""
    counts = []
    for i, seqs in enumerate(mb.seqlens[key]):
        if len(seqs) == 0 or len(seqs) % 2 != 0:
            raise ValueError(f"Item {mb.ids[i]!r} holds {len(seqs)} sequences; paired interfaces need "
                             "a positive even number (chosen, rejected, chosen, rejected, ...).")
        counts.append(len(seqs) // 2)
    return counts


def pair_item_weights(mb: SequenceSample, device: Any = None) -> torch.Tensor:
    """``1 / k_i`` for every pair, where ``k_i`` is the pair count of the pair's item."""
    counts = pair_counts(mb)
    k = torch.tensor(counts, dtype=torch.float32, device=device)
    return (1.0 / k).repeat_interleave(k.long())


def last_token_rows(mb: SequenceSample) -> torch.Tensor:
    """Packed row of the last token of every sequence of ``mb``."""
    _, cu, _ = packed_inputs(mb)
    return cu.long()[1:] - 1


def last_token_scores(values: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
    """Critic value at the last token of every sequence, float32 [n_seqs]."""
    return values.reshape(-1)[last_token_rows(mb).to(values.device)].float()




def per_sequence_output(mb: SequenceSample, key: str, values: torch.Tensor) -> SequenceSample:
    """A sample holding one float32 value per sequence of ``mb`` under ``key``."""
    return SequenceSample(
        keys={key},
        trailing_shapes={key: ()},
        dtypes={key: torch.float32},
        ids=list(mb.ids),
        seqlens={key: [[len(s)] for s in mb.seqlens[INPUT_KEY]]},
        data={key: values.detach().float().cpu()},
        metadata={},
    )


def save_model(model: Model, save_dir: str, hf_family: Optional[str], who: str) -> None:
    """Whole-model HF checkpoint at ``save_dir`` (collective over the model's mesh)."""
    from realhf.impl.model.conversion.parallel_save import save_hf_checkpoint

    module = model.module
    net = module.module if isinstance(module, EngineModule) else module
    family = getattr(net, "hf_family", None) or hf_family
    if family is None:
        raise ValueError(f"{who} save: the model records no HF family; set the interface's hf_family argument.")
    save_hf_checkpoint(net, family, model.tokenizer, save_dir)


# ------------------------------------------------------------------ interface
@dataclasses.dataclass
class PairedRewardInterface(TrainedModelInterface):
    """The ``paired_rw`` interface (a critic scoring whole sequences).

    :param output_scaling: inference returns ``(score - output_bias) * output_scaling``.
    :param output_bias: see ``output_scaling``.
    :param enable_save: whether :meth:`save` writes a checkpoint.
    :param hf_family: HF family for :meth:`save` when the model records none.
    :param eval_n_mbs: micro-batches per evaluation batch (at least the number
        of pipeline stages is used).
    """

    output_scaling: float = 1.0
    output_bias: float = 0.0
    enable_save: bool = True

    # ------------------------------------------------------------------ loss
    @staticmethod
    def pair_terms(values: torch.Tensor, mb: SequenceSample) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen scores, rejected scores, 1/k_i per pair) of a micro-batch."""
        scores = last_token_scores(values, mb)
        w = pair_item_weights(mb, scores.device)
        return scores[0::2], scores[1::2], w

    @classmethod
    def loss_fn(cls, values: torch.Tensor, mb: SequenceSample) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean over the items of ``mb`` of their mean pair loss.

        The returned stats are per-pair *sums* divided by the item count, so
        that after the engine's item weighting they add up to global sums
        divided by the global item count (``train_step`` turns them into
        per-pair means).
        """
        pos, neg, w = cls.pair_terms(values, mb)
        loss = -(F.logsigmoid(pos - neg) * w).sum() / mb.bs
        with torch.no_grad():
            stats = {
                "_correct": float((pos > neg).float().sum()) / mb.bs,
                "_pos": float(pos.sum()) / mb.bs,
                "_neg": float(neg.sum()) / mb.bs,
            }
        return loss, stats

    @staticmethod
    def loss_weight_fn(mb: SequenceSample) -> float:
        return float(mb.bs)

    # ------------------------------------------------------------- train step
    def train_step(self, model: Model, input_: SequenceSample,
                   mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, float]:
        """One optimizer step; every rank returns the same global-batch stats:
        ``loss`` (see the module docstring), ``acc`` (fraction of pairs with
        chosen score > rejected score), ``pos_score``/``neg_score`` (mean
        scores), ``n_pairs``, ``n_items``, ``grad_norm``, ``lr``."""
        module = model.module
        if not hasattr(module, "train_batch"):
            raise TypeError(f"paired_rw train_step needs a training engine in model.module, got {type(module).__name__}.")
        n_pairs_local = sum(pair_counts(input_))
        stats = module.train_batch(input_, mb_spec or MicroBatchSpec(), loss_fn=self.loss_fn,
                                   loss_weight_fn=self.loss_weight_fn)
        counts = torch.tensor([input_.bs, n_pairs_local], dtype=torch.float64)
        module.par.all_reduce(counts, module.par.dp_group)
        n_items, n_pairs = float(counts[0]), float(counts[1])
        per_pair = n_items / n_pairs
        out = {k: float(v) for k, v in stats.items() if not k.startswith("_")}
        out["acc"] = stats["_correct"] * per_pair
        out["pos_score"] = stats["_pos"] * per_pair
        out["neg_score"] = stats["_neg"] * per_pair
        out["n_pairs"] = n_pairs
        out["n_items"] = n_items
        return out

    # --------------------------------------------------------------- evaluate
    def evaluate(self, model: Model, eval_dataloader: Optional[Iterable[SequenceSample]]) -> Dict[str, float]:
        """Loss (as in training, item-weighted over the whole set), pair accuracy
        and mean chosen/rejected scores over the validation set; the same on
        every rank. ``None`` loader: ``{}``."""
        if eval_dataloader is None:
            return {}
        engine = as_engine(model.module)
        mb_spec = MicroBatchSpec(n_mbs=max(self.eval_n_mbs, engine.par.pp_size))

        def hook(values: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
            pos, neg, w = self.pair_terms(values, mb)
            loss_sum = -(F.logsigmoid(pos - neg) * w).sum()
            return torch.stack([loss_sum.double().cpu(), torch.tensor(float(mb.bs), dtype=torch.float64),
                                (pos > neg).double().sum().cpu(), torch.tensor(float(pos.numel()), dtype=torch.float64),
                                pos.double().sum().cpu(), neg.double().sum().cpu()])

        t = forward_sums(model, engine, eval_dataloader, mb_spec, hook, 6)
        n_items, n_pairs = float(t[1]), float(t[3])
        if n_pairs == 0:
            return {"loss": float("nan"), "acc": float("nan"), "pos_score": float("nan"),
                    "neg_score": float("nan"), "n_pairs": 0.0, "n_items": n_items}
        return {"loss": float(t[0]) / n_items, "acc": float(t[2]) / n_pairs, "pos_score": float(t[4]) / n_pairs,
                "neg_score": float(t[5]) / n_pairs, "n_pairs": n_pairs, "n_items": n_items}

    # -------------------------------------------------------------- inference
    def inference(self, model: Model, input_: SequenceSample,
                  mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``rewards``: ``(score - output_bias) * output_scaling`` per sequence
        (seqlens ``[[n_seqs of the item]]``, i.e. ``[[1]]`` for PPO rollouts).
        With pipeline parallelism only the last stage returns it (others ``None``)."""
        engine = as_engine(model.module)
        if model.device is not None and torch.device(model.device).type != "cpu":
            input_ = input_.to(model.device)

        def hook(values: torch.Tensor, mb: SequenceSample) -> SequenceSample:
            scores = values.reshape(-1).float()  # the last token of every sequence (output_rows)
            return per_sequence_output(mb, "rewards", (scores - self.output_bias) * self.output_scaling)

        hook.output_rows = last_token_rows

        return engine.forward(input_, mb_spec or MicroBatchSpec(), post_hook=hook)

    # ------------------------------------------------------------------- save
    def save(self, model: Model, save_dir: str) -> None:
        """Whole-model HF checkpoint at ``save_dir`` (collective; no-op unless ``enable_save``)."""
        if self.enable_save:
            save_model(model, save_dir, self.hf_family, "paired_rw")


register_interface("paired_rw", PairedRewardInterface)
