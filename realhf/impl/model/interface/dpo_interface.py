"""Direct preference optimization.

Input items (the ``rw_pair`` dataset) hold ``packed_input_ids`` with pairs
alternating chosen and rejected answers of one prompt (``pos1, neg1, pos2,
neg2, ...``) and the prompt's token count ``prompt_lens`` (one per item).

The log-probability of a sequence is the sum of the log-probabilities of its
answer tokens: in the shifted tensor (entry ``t`` = log p(token t+1)) the
entries from ``prompt_len - 1`` on. The reference model's inference writes
it as ``seqlogp`` (one float per sequence); the trained policy recomputes it.

Loss over the ``P`` pairs of the global batch (``w`` chosen, ``l`` rejected)::

    L = (1 / P) * sum_pairs -logsigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))

A micro-batch returns the mean over its pairs and is weighted by its pair
count; the engine normalizes the weights over all micro-batches of all
data-parallel ranks, so the step is that of ``L`` on the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec, Model, register_interface
from realhf.impl.model.backend.inference import EngineModule, packed_inputs
from realhf.impl.model.interface.common import TrainedModelInterface, forward_sums, packed_shifted_log_probs
from realhf.impl.model.interface.rw_interface import (
    as_engine,
    pair_counts,
    per_sequence_output,
    save_model,
)

PROMPT_LENS = "prompt_lens"
SEQLOGP = "seqlogp"


def _vocab_size(module) -> Optional[int]:
    net = module.module if isinstance(module, EngineModule) else module
    return getattr(getattr(net, "config", None), "vocab_size", None)


def answer_logp(logits: torch.Tensor, mb: SequenceSample, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Sum of answer-token log-probs of every sequence of ``mb``, float32 [n_seqs] (with grad).

    Tensor-parallel (vocab-sharded) logits use the vocabulary-parallel kernel.
    """
    ids, cu, _ = packed_inputs(mb)
    dev = logits.device
    cu = cu.to(dev).long()
    lp = packed_shifted_log_probs(logits, cu, ids.to(dev), vocab_size).float()
    seq_lens = cu[1:] - cu[:-1]
    n_seqs = int(seq_lens.numel())
    shifted = seq_lens - 1
    seg = torch.repeat_interleave(torch.arange(n_seqs, device=dev), shifted)
    starts = torch.cumsum(shifted, 0) - shifted
    offset = torch.arange(int(shifted.sum()), device=dev) - starts[seg]
    per_item = torch.tensor([len(s) for s in mb.seqlens["packed_input_ids"]], device=dev)
    prompt_lens = mb.data[PROMPT_LENS].to(dev).long().reshape(-1)
    if prompt_lens.numel() != mb.bs:
        raise ValueError(f"'{PROMPT_LENS}' must hold one entry per item, got {prompt_lens.numel()} for {mb.bs} items.")
    seq_prompt = torch.repeat_interleave(prompt_lens, per_item)
    keep = (offset >= seq_prompt[seg] - 1).to(lp.dtype)
    return torch.zeros(n_seqs, dtype=lp.dtype, device=dev).index_add(0, seg, lp * keep)


@dataclasses.dataclass
class DPOInterface(TrainedModelInterface):
    """The ``dpo`` interface: ``inference`` for the reference model, ``train_step`` for the policy.

    :param beta: inverse temperature of the implicit reward.
    :param enable_save: whether :meth:`save` writes a checkpoint (off for the reference).
    :param hf_family: HF family for :meth:`save` when the model records none.
    :param eval_n_mbs: micro-batches per evaluation batch.
    :param reference_is_initial_policy: the frozen reference starts from the
        policy's own weights (same checkpoint), so the policy's log-probs of the
        valid set before the first step are the reference's; evaluation uses them.
    """

    beta: float = 0.1
    enable_save: bool = True
    reference_is_initial_policy: bool = False
    _eval_ref: Dict[object, torch.Tensor] = dataclasses.field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------ loss
    @staticmethod
    def dpo_terms(pi: torch.Tensor, ref: torch.Tensor, beta: float) -> Dict[str, torch.Tensor]:
        """Per-pair quantities from per-sequence log-probs laid out chosen, rejected, ..."""
        if pi.numel() % 2 or pi.shape != ref.shape:
            raise ValueError(f"Need matching per-sequence log-probs of pairs, got {tuple(pi.shape)} and {tuple(ref.shape)}.")
        pos = beta * (pi[0::2] - ref[0::2])
        neg = beta * (pi[1::2] - ref[1::2])
        return {"loss": -F.logsigmoid(pos - neg), "pos": pos, "neg": neg,
                "kl": (ref - pi).reshape(-1, 2).mean(-1)}

    def loss_fn(self, logits: torch.Tensor, mb: SequenceSample,
                vocab_size: Optional[int] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean DPO loss over the pairs of ``mb``; stats are pair means."""
        pair_counts(mb)
        pi = answer_logp(logits, mb, vocab_size)
        ref = mb.data[SEQLOGP].to(pi.device).float().reshape(-1)
        t = self.dpo_terms(pi, ref, self.beta)
        with torch.no_grad():
            stats = {"pos_score": float(t["pos"].mean()), "neg_score": float(t["neg"].mean()),
                     "kl": float(t["kl"].mean()), "margin": float((t["pos"] - t["neg"]).mean()),
                     "acc": float((t["pos"] > t["neg"]).float().mean())}
        return t["loss"].mean(), stats

    @staticmethod
    def loss_weight_fn(mb: SequenceSample) -> float:
        return float(sum(pair_counts(mb)))

    # -------------------------------------------------------------- inference
    def inference(self, model: Model, input_: SequenceSample,
                  mb_spec: Optional[MicroBatchSpec] = None) -> Optional[SequenceSample]:
        """``seqlogp``: the answer log-prob sum of every sequence (seqlens
        ``[[n_seqs of the item]]``, float32). With pipeline parallelism only the
        last stage returns it (others ``None``)."""
        engine = as_engine(model.module)
        vocab = _vocab_size(engine)
        if model.device is not None and torch.device(model.device).type != "cpu":
            input_ = input_.to(model.device)

        def hook(logits: torch.Tensor, mb: SequenceSample) -> SequenceSample:
            return per_sequence_output(mb, SEQLOGP, answer_logp(logits, mb, vocab))

        return engine.forward(input_, mb_spec or MicroBatchSpec(), post_hook=hook)

    # ------------------------------------------------------------- train step
    def train_step(self, model: Model, input_: SequenceSample,
                   mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, float]:
        """One optimizer step; every rank returns the same global-batch stats
        (means over pairs): ``loss``, ``pos_score`` = beta (pi_w - ref_w),
        ``neg_score`` = beta (pi_l - ref_l), ``margin`` = pos_score - neg_score,
        ``acc`` (fraction of pairs with a positive margin), ``kl`` (mean over
        sequences of ref - pi log-probs), ``n_pairs``, ``grad_norm``, ``lr``."""
        module = model.module
        if not hasattr(module, "train_batch"):
            raise TypeError(f"dpo train_step needs a training engine in model.module, got {type(module).__name__}.")
        for key in (SEQLOGP, PROMPT_LENS):
            if key not in input_.keys:
                raise KeyError(f"dpo train_step needs '{key}' in the input (keys: {sorted(input_.keys)}).")
        vocab = _vocab_size(module)
        stats = module.train_batch(input_, mb_spec or MicroBatchSpec(),
                                   loss_fn=lambda logits, mb: self.loss_fn(logits, mb, vocab),
                                   loss_weight_fn=self.loss_weight_fn)
        n = torch.tensor([sum(pair_counts(input_))], dtype=torch.float64)
        module.par.all_reduce(n, module.par.dp_group)
        out = {k: float(v) for k, v in stats.items()}
        out["n_pairs"] = float(n[0])
        return out

    # --------------------------------------------------------------- evaluate
    def _eval_mb_spec(self, engine) -> MicroBatchSpec:
        return MicroBatchSpec(n_mbs=max(self.eval_n_mbs, engine.par.pp_size))

    def prepare_evaluation(self, model: Model, eval_dataloader: Optional[Iterable[SequenceSample]]) -> None:
        """With ``reference_is_initial_policy``, record the answer log-probs of every
        valid sequence before training (the reference's, as the two start equal)."""
        if not self.reference_is_initial_policy or eval_dataloader is None:
            return
        engine = as_engine(model.module)
        vocab = _vocab_size(engine)

        def hook(logits: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
            lp = answer_logp(logits, mb, vocab).detach().float().cpu()
            counts = [len(s) for s in mb.seqlens["packed_input_ids"]]
            for id_, part in zip(mb.ids, torch.split(lp, counts)):
                self._eval_ref[id_] = part
            return torch.zeros(1, dtype=torch.float64)

        forward_sums(model, engine, eval_dataloader, self._eval_mb_spec(engine), hook, 1)

    def _eval_reference(self, mb: SequenceSample, pi: torch.Tensor) -> torch.Tensor:
        if SEQLOGP in mb.keys:
            return mb.data[SEQLOGP].to(pi.device).float().reshape(-1)
        if self._eval_ref:
            return torch.cat([self._eval_ref[i] for i in mb.ids]).to(pi.device)
        return torch.zeros_like(pi)

    def evaluate(self, model: Model, eval_dataloader: Optional[Iterable[SequenceSample]]) -> Dict[str, float]:
        """Pair-mean DPO ``loss``, ``margin`` and ``acc`` (fraction of positive
        margins) and ``n_pairs`` over a validation set.

        The reference log-probs come from the batch's ``seqlogp`` when it
        carries them, else from :meth:`prepare_evaluation` (the ``dpo``
        experiment sets ``reference_is_initial_policy`` when ``ref`` and
        ``actor`` load the same weights), else the reference is uniform:
        ``margin`` is then beta * (chosen - rejected) answer log-prob of the
        policy and ``loss`` = mean -logsigmoid(margin). The same on every rank;
        ``None`` loader: ``{}``."""
        if eval_dataloader is None:
            return {}
        engine = as_engine(model.module)
        vocab = _vocab_size(engine)
        mb_spec = self._eval_mb_spec(engine)

        def hook(logits: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
            pi = answer_logp(logits, mb, vocab)
            ref = self._eval_reference(mb, pi)
            t = self.dpo_terms(pi, ref, self.beta)
            margin = t["pos"] - t["neg"]
            return torch.stack([t["loss"].sum(), margin.sum(), (margin > 0).float().sum(),
                                torch.tensor(float(margin.numel()), device=pi.device)]).double().cpu()

        s = forward_sums(model, engine, eval_dataloader, mb_spec, hook, 4)
        n = float(s[3])
        if n == 0:
            return {"loss": float("nan"), "margin": float("nan"), "acc": float("nan"), "n_pairs": 0.0}
        return {"loss": float(s[0]) / n, "margin": float(s[1]) / n, "acc": float(s[2]) / n, "n_pairs": n}

    # ------------------------------------------------------------------- save
    def save(self, model: Model, save_dir: str) -> None:
        """Whole-model HF checkpoint at ``save_dir`` (collective; no-op unless ``enable_save``)."""
        if self.enable_save:
            save_model(model, save_dir, self.hf_family, "dpo")


register_interface("dpo", DPOInterface)
