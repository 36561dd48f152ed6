"""Supervised fine-tuning: next-token NLL on the answer tokens only.

Input items (the ``prompt_answer`` dataset) carry ``packed_input_ids`` and a
``prompt_mask`` aligned with them (True on prompt and padding tokens). A
token is a label when it is not the first token of its sequence and its
``prompt_mask`` entry is False; the loss is the NLL summed over labels
divided by their number, over the whole global batch (micro-batch losses are
weighted by their label count, and the engine normalizes the weights over
all micro-batches of all data-parallel ranks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, Optional

import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import MicroBatchSpec, Model, register_interface
from realhf.impl.model.backend.inference import EngineModule
from realhf.impl.model.interface.common import TrainedModelInterface, answer_token_count, forward_sums, masked_nll

MASK_KEY = "prompt_mask"


def _network(module: Any) -> torch.nn.Module:
    """The ReaLModel inside an engine (or the module itself)."""
    return module.module if isinstance(module, EngineModule) else module


def _vocab_size(module: Any) -> Optional[int]:
    config = getattr(_network(module), "config", None)
    return getattr(config, "vocab_size", None)


def _n_seqs(sample: SequenceSample) -> int:
    return sum(len(item) for item in sample.seqlens["packed_input_ids"])


@dataclasses.dataclass
class SFTInterface(TrainedModelInterface):
    """The ``sft`` interface.

    :param hf_family: HF family used by :meth:`save` when the model does not
        record one itself (models loaded by ``from_<family>`` do).
    :param eval_n_mbs: micro-batches per evaluation batch (at least the
        number of pipeline stages is used, so the pipeline is kept busy).
    """


    # ------------------------------------------------------------------ loss
    @staticmethod
    def loss_fn(logits: torch.Tensor, mb: SequenceSample, vocab_size: Optional[int] = None):
        """Mean answer-token NLL of one micro-batch (0 when it has no answer token)."""
        nll_sum, n = masked_nll(logits, mb, vocab_size, MASK_KEY)
        return nll_sum / n.clamp(min=1).to(nll_sum.dtype), {}

    @staticmethod
    def loss_weight_fn(mb: SequenceSample) -> float:
        return float(answer_token_count(mb, MASK_KEY))

    # ------------------------------------------------------------- train step
    def train_step(self, model: Model, input_: SequenceSample,
                   mb_spec: Optional[MicroBatchSpec] = None) -> Dict[str, float]:
        """One optimizer step on this rank's share of the global batch.

        Collective over the model's mesh; every rank returns the same stats:
        ``loss`` (answer-token NLL over the global batch), ``ppl`` (exp of
        it), ``n_tokens`` (answer tokens) and ``n_seqs`` of the global batch,
        ``grad_norm`` and ``lr`` (plus ``loss_scale``/``skipped_step`` for
        fp16). Does not touch ``model.version`` (the model worker calls
        ``model.inc_version()`` after every train step).
        """
        module = model.module
        if not hasattr(module, "train_batch"):
            raise TypeError(f"sft train_step needs a training engine in model.module, got {type(module).__name__}.")
        if MASK_KEY not in input_.keys:
            raise KeyError(f"sft train_step needs '{MASK_KEY}' in the input (keys: {sorted(input_.keys)}).")
        vocab = _vocab_size(module)
        stats = module.train_batch(
            input_,
            mb_spec or MicroBatchSpec(),
            loss_fn=lambda logits, mb: self.loss_fn(logits, mb, vocab),
            loss_weight_fn=self.loss_weight_fn,
        )
        counts = torch.tensor([answer_token_count(input_, MASK_KEY), _n_seqs(input_)], dtype=torch.float64)
        module.par.all_reduce(counts, module.par.dp_group)
        out = {k: float(v) for k, v in stats.items()}
        out["ppl"] = math.exp(min(out["loss"], 700.0))
        out["n_tokens"] = float(counts[0])
        out["n_seqs"] = float(counts[1])
        return out

    # --------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, model: Model, eval_dataloader: Iterable[SequenceSample]) -> Dict[str, float]:
        """Answer-token NLL and perplexity over the whole validation set.

        Token-weighted over all batches and data-parallel ranks (ranks may
        hold different numbers of batches: the only data-parallel collective
        comes after the loop). Collective over the model's mesh; every rank
        returns the same numbers. The network is left in eval mode. Without a
        loader (``None``) there is nothing to evaluate and ``{}`` is returned.
        """
        if eval_dataloader is None:
            return {}
        module = model.module
        engine = module if isinstance(module, EngineModule) else EngineModule(module)
        vocab = _vocab_size(engine)
        mb_spec = MicroBatchSpec(n_mbs=max(self.eval_n_mbs, engine.par.pp_size))

        def hook(logits: torch.Tensor, mb: SequenceSample) -> torch.Tensor:
            nll_sum, n = masked_nll(logits, mb, vocab, MASK_KEY)
            return torch.stack([nll_sum.double().cpu(), n.double().cpu(),
                                torch.tensor(float(_n_seqs(mb)), dtype=torch.float64)])

        # nll, answer tokens, sequences
        totals = forward_sums(model, engine, eval_dataloader, mb_spec, hook, 3)
        n_tokens = float(totals[1])
        loss = float(totals[0]) / n_tokens if n_tokens > 0 else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)) if n_tokens > 0 else float("nan"),
                "n_tokens": n_tokens, "n_seqs": float(totals[2])}

    # ------------------------------------------------------------------- save
    def save(self, model: Model, save_dir: str) -> None:
        """Write the whole model as one HF checkpoint at ``save_dir`` (atomically).

        Collective over the model's mesh; the file writer is dp 0 / tp 0 /
        stage 0. ``save_dir`` is the final checkpoint directory, e.g.
        ``<fileroot>/checkpoints/<user>/<exp>/<trial>/<role>/epoch{E}epochstep{S}globalstep{G}`` (1-based, as in the step log).
        """
        from realhf.impl.model.conversion.parallel_save import save_hf_checkpoint

        net = _network(model.module)
        family = getattr(net, "hf_family", None) or self.hf_family
        if family is None:
            raise ValueError("sft save: the model records no HF family; set the interface's hf_family argument.")
        save_hf_checkpoint(net, family, model.tokenizer, save_dir)


register_interface("sft", SFTInterface)
