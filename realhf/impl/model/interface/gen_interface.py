"""Generation to a JSONL file (the ``gen`` experiment).

Each call generates one answer per prompt of ``packed_prompts`` and appends
one line per item::

    {"id": <item id>, "prompt": <prompt text>, "answer": <answer text>, "seq": <prompt + answer text>}

Texts are decoded with the model's tokenizer: left padding of the prompt is
dropped and special tokens (EOS, padding) are skipped. Several data-parallel
ranks (and several calls) append to the same file; a file lock next to it
keeps lines whole. Within a model only tensor-parallel rank 0 of the last
pipeline stage writes (every tensor-parallel rank holds the same tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import torch

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import GenerationHyperparameters, MicroBatchSpec, Model, ModelInterface, register_interface
from realhf.base import constants
from realhf.impl.model.backend.inference import INPUT_KEY
from realhf.impl.model.interface.rw_interface import as_engine

PROMPT_KEY = "packed_prompts"


def _jsonable_id(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


@dataclasses.dataclass
class GenerationInterface(ModelInterface):
    """The ``generation`` interface.

    :param generation_config: sampling hyperparameters (a dict is accepted).
    :param output_file: JSONL file to append to; a relative path is resolved
        under ``constants.get_log_path()`` (the trial's log directory).
    :param seed: seed of the sampling RNG (``None``: torch's global RNG).
    """

    generation_config: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    output_file: str = "generated.jsonl"
    seed: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.generation_config, dict):
            self.generation_config = GenerationHyperparameters(**self.generation_config)
        if not self.output_file:
            raise ValueError("generation: output_file must be a non-empty path.")
        self._generator: Optional[torch.Generator] = None

    def output_path(self) -> str:
        if os.path.isabs(self.output_file):
            return self.output_file
        return os.path.join(constants.get_log_path(), self.output_file)

    def _rng(self, device: Any) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    @staticmethod
    def records(tokenizer: Any, sample: SequenceSample, answers: List[torch.Tensor]) -> List[Dict[str, Any]]:
        """The JSON records of ``sample``'s items given their generated tokens."""
        prompts = torch.split(sample.data[PROMPT_KEY].cpu(),
                              [sum(s) for s in sample.seqlens[PROMPT_KEY]])
        pad = getattr(tokenizer, "pad_token_id", None)
        out = []
        for item_id, p, a in zip(sample.ids, prompts, answers):
            p = p.tolist()
            if pad is not None:
                n = 0
                while n < len(p) and p[n] == pad:
                    n += 1
                p = p[n:]
            a = a.cpu().tolist()
            out.append({
                "id": _jsonable_id(item_id),
                "prompt": tokenizer.decode(p, skip_special_tokens=True),
                "answer": tokenizer.decode(a, skip_special_tokens=True),
                "seq": tokenizer.decode(p + a, skip_special_tokens=True),
            })
        return out

    def append(self, records: List[Dict[str, Any]]) -> str:
        """Append ``records`` as JSON lines under a file lock; returns the path."""
        from filelock import FileLock

        path = self.output_path()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with FileLock(path + ".lock"):
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        return path

    @torch.no_grad()
    def generate(self, model: Model, input_: SequenceSample, mb_spec: Optional[MicroBatchSpec] = None) -> None:
        """Generate for every item of ``input_`` (key ``packed_prompts``) and
        append the records to :meth:`output_path`. Collective over the model's
        mesh; returns ``None`` (the graph has no output keys)."""
        if PROMPT_KEY not in input_.keys:
            raise KeyError(f"generation needs '{PROMPT_KEY}' in the input (keys: {sorted(input_.keys)}).")
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError("generation needs the model's tokenizer to decode answers.")
        engine = as_engine(model.module)
        sample = input_.select([PROMPT_KEY])
        if model.device is not None and torch.device(model.device).type != "cpu":
            sample = sample.to(model.device)
        prompts = sample
        sample = sample.select([PROMPT_KEY]).remap_keys_({PROMPT_KEY: INPUT_KEY})
        gen = engine.generate(sample, mb_spec or MicroBatchSpec(), self.generation_config,
                              tokenizer.eos_token_id, generator=self._rng(model.device or "cpu"))
        if gen is None or not engine.par.is_last_stage or engine.par.tp_rank != 0:
            return None
        self.append(self.records(tokenizer, prompts, gen.sequences))
        return None


register_interface("generation", GenerationInterface)
