"""The compute-bound shape shared by the benchmarks that compare with TRL.

A llama small enough to train in seconds on two CPU cores, yet large enough
that the matrix multiplications, not Python, dominate a step:

* hidden 256, SwiGLU width 688, 4 layers, 4 query heads over 2 key/value
  heads (head_dim 64), vocabulary 1024, untied embeddings, fp32,
  1024 positions (``SHAPE``);
* a byte-level BPE tokenizer of exactly ``VOCAB_SIZE`` ids with the special
  tokens ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, trained at run time
  with the ``tokenizers`` library on every text of the committed
  ``realhf/assets/data/*.jsonl`` (files in name order, records in file
  order, duplicates dropped). Like the bundled 4096-id tokenizer it has a
  ByteLevel pre-tokenizer and decoder (no prefix space) and adds no BOS/EOS
  when encoding; datasets append ``</s>`` themselves. The bundled tokenizer
  cannot serve this model: a model whose vocabulary is smaller than its
  tokenizer's is refused.

:func:`materialize` writes the HuggingFace model directory (``config.json``
whose bos/eos/pad ids are read from the trained tokenizer, ``tokenizer.json``,
``tokenizer_config.json``; no weights: both benchmark sides initialize from
the config with a fixed seed) and returns its path. Without an argument it
builds once into ``benchmarks/results/.cache/compute-shape-<key>`` (ignored by
git; ``<key>`` hashes the shape, the source texts and the ``tokenizers``
version), so later calls and the processes of one run reuse it.

Synthetic data in realhf's JSONL formats, built from the same committed
texts, with exact token counts under this tokenizer (a sequence is
``prompt + answer`` followed by one ``</s>`` id, as both realhf's datasets
and TRL's trainers build it; a prompt ends inside a word run and its answer
starts with a space, so the prompt's tokens are a prefix of the sequence's):

* :func:`write_sft` (``prompt_answer``: ``{"id", "prompt", "answer"}``):
  32 sequences whose lengths are spread evenly over 32..256 tokens
  (``lengths(32, 32, 256)``) in a seeded random order; the prompt is about
  a third of each sequence;
* :func:`write_pairs` (``rw_pair``: ``{"id", "prompt", "pos_answers": [a],
  "neg_answers": [b]}``): 16 prompts with one pair each; the 32 chosen and
  rejected sequence lengths are spread evenly over 32..256 and paired in a
  seeded random order; the shared prompt is about a third of the shorter
  sequence, the two answers come from different places of the text;
* :func:`write_prompts` (``prompt``: ``{"id", "prompt"}``): 16 prompts of
  10..28 tokens, spread evenly, for PPO.

Every function takes the tokenizer (``load_tokenizer(model_dir)``) and a
seed (``SEED`` by default); the same arguments give byte-identical files.
Each written file's lengths are re-checked by encoding it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "realhf" / "assets" / "data"
CACHE = Path(__file__).resolve().parent / "results" / ".cache"
SEED = 1234
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
SHAPE: Dict[str, Any] = {
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 1024,
}
SFT_N, SFT_MIN, SFT_MAX = 32, 32, 256
PAIRS_N, PAIR_MIN, PAIR_MAX = 16, 32, 256
PROMPTS_N, PROMPT_MIN, PROMPT_MAX = 16, 10, 28


# --------------------------------------------------------------------------- #
# Model directory and tokenizer
# --------------------------------------------------------------------------- #
def corpus_texts() -> List[str]:
    """Every text field of the committed datasets, deduplicated, in a fixed order."""
    seen, out = set(), []
    for path in sorted(DATA.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                for key in ("prompt", "answer", "pos_answers", "neg_answers"):
                    values = rec.get(key)
                    for text in values if isinstance(values, list) else [values]:
                        if isinstance(text, str) and text and text not in seen:
                            seen.add(text)
                            out.append(text)
    return out


def _cache_key() -> str:
    import tokenizers

    h = hashlib.sha256(json.dumps([SHAPE, SPECIAL_TOKENS, tokenizers.__version__]).encode())
    for path in sorted(DATA.glob("*.jsonl")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def train_tokenizer(out_dir: Path, texts: Optional[Sequence[str]] = None) -> Any:
    """Train the BPE on ``texts`` (default: :func:`corpus_texts`), save it, return the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus_texts() if texts is None else texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=2048)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the generic fast class loads on every version
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return hf


def model_config(tokenizer: Any) -> Dict[str, Any]:
    """``config.json`` of the shape, special ids taken from ``tokenizer``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 10000.0,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _build(out_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = train_tokenizer(out_dir)
    (out_dir / "config.json").write_text(json.dumps(model_config(hf), indent=2) + "\n")
    again = AutoTokenizer.from_pretrained(str(out_dir))
    sample = "Question: What is 12 + 7?\nAnswer: 12 + 7 = 19.\n#### 19 She was not sorry."
    if len(again) != VOCAB_SIZE or again(sample)["input_ids"] != hf(sample)["input_ids"]:
        raise RuntimeError(f"the tokenizer saved in {out_dir} does not reload identically")
    if again.decode(again(sample)["input_ids"]) != sample:
        raise RuntimeError("the tokenizer does not round-trip text")
    ids = [again.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")


def materialize(path: Optional[os.PathLike] = None) -> Path:
    """The model directory of the shape: built into ``path``, or once into the cache."""
    if path is not None:
        out = Path(path)
        _build(out)
        return out
    out = CACHE / f"compute-shape-{_cache_key()}"
    if (out / "config.json").is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE))
    try:
        _build(tmp)
        try:
            os.replace(tmp, out)  # atomic; another process may have finished first
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(model_dir: os.PathLike) -> Any:
    """The tokenizer as realhf loads it (``realhf.api.core.data_api.load_hf_tokenizer``)."""
    from realhf.api.core.data_api import load_hf_tokenizer

    return load_hf_tokenizer(str(model_dir))


# --------------------------------------------------------------------------- #
# Texts of exact token counts
# --------------------------------------------------------------------------- #
def lengths(n: int, lo: int, hi: int) -> List[int]:
    """``n`` integers spread evenly over ``[lo, hi]`` (both ends included)."""
    if n == 1:
        return [lo]
    return [lo + round(i * (hi - lo) / (n - 1)) for i in range(n)]


class _Words:
    """The committed texts as one stream of words, cut into texts of exact token counts."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tok = tokenizer
        self.words = [w for text in corpus_texts() for w in text.split()]
        self.rng = random.Random(seed)

    def ids(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def _fit_from(self, start: int, n_tokens: int, leading_space: bool) -> Optional[str]:
        """Words from ``start`` joined by spaces (and led by one with ``leading_space``),
        the last one cut to a prefix, so that the text is exactly ``n_tokens`` tokens; or None."""
        text, i = "", start
        while i < len(self.words):
            word = self.words[i]
            base = text + " " if (text or leading_space) else text
            n = self.count(base + word)
            if n == n_tokens:
                return base + word
            if n > n_tokens:
                for cut in range(len(word) - 1, 0, -1):
                    if self.count(base + word[:cut]) == n_tokens:
                        return base + word[:cut]
                return None
            text, i = base + word, i + 1
        return None

    def text(self, n_tokens: int, leading_space: bool = False) -> str:
        """A text of exactly ``n_tokens`` tokens from a seeded random place of the stream."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        for _ in range(1000):
            out = self._fit_from(self.rng.randrange(len(self.words)), n_tokens, leading_space)
            if out is not None:
                return out
        raise RuntimeError(f"no text of exactly {n_tokens} tokens found")

    def prompt_answer(self, n_prompt: int, n_answers: Sequence[int], tries: int = 1000) -> Tuple[str, List[str]]:
        """A prompt of ``n_prompt`` tokens and answers starting with a space such that the
        tokens of ``prompt + answer`` are the prompt's followed by the answer's."""
        for _ in range(tries):
            prompt = self.text(n_prompt)
            prompt_ids = self.ids(prompt)
            answers = []
            for n in n_answers:
                answer = self.text(n, leading_space=True)
                if self.ids(prompt + answer) != prompt_ids + self.ids(answer):
                    break
                answers.append(answer)
            if len(answers) == len(n_answers):
                return prompt, answers
        raise RuntimeError(f"no prompt/answers of {n_prompt}/{list(n_answers)} tokens found")


def _write_jsonl(path: os.PathLike, rows: Sequence[Dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _seq_len(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` plus the appended EOS id."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def _split(total: int) -> Tuple[int, int]:
    """(prompt, answer) tokens of a sequence of ``total`` tokens including EOS: the prompt about a third."""
    n_prompt = max(1, (total - 1) // 3)
    return n_prompt, total - 1 - n_prompt


def sft_records(tokenizer: Any, n: int = SFT_N, lo: int = SFT_MIN, hi: int = SFT_MAX,
                seed: int = SEED) -> List[Dict[str, Any]]:
    """``prompt_answer`` records whose sequence lengths (with EOS) are ``lengths(n, lo, hi)``, shuffled."""
    words = _Words(tokenizer, seed)
    order = lengths(n, lo, hi)
    random.Random(f"{seed}-sft-order").shuffle(order)
    rows = []
    for i, total in enumerate(order):
        n_prompt, n_answer = _split(total)
        prompt, (answer,) = words.prompt_answer(n_prompt, [n_answer])
        rows.append({"id": f"sft-{i:03d}-len{total}", "prompt": prompt, "answer": answer})
    return rows


def pair_records(tokenizer: Any, n: int = PAIRS_N, lo: int = PAIR_MIN, hi: int = PAIR_MAX,
                 seed: int = SEED) -> List[Dict[str, Any]]:
    """``rw_pair`` records of one pair each; the ``2 n`` sequence lengths are ``lengths(2 n, lo, hi)``."""
    words = _Words(tokenizer, seed + 1)
    order = lengths(2 * n, lo, hi)
    random.Random(f"{seed}-pair-order").shuffle(order)
    rows = []
    for i in range(n):
        pos_len, neg_len = order[2 * i], order[2 * i + 1]
        n_prompt = max(1, (min(pos_len, neg_len) - 1) // 3)
        prompt, (pos, neg) = words.prompt_answer(n_prompt, [pos_len - 1 - n_prompt, neg_len - 1 - n_prompt])
        rows.append({"id": f"pair-{i:03d}-len{pos_len}-{neg_len}", "prompt": prompt, "pos_answers": [pos],
                     "neg_answers": [neg]})
    return rows


def prompt_records(tokenizer: Any, n: int = PROMPTS_N, lo: int = PROMPT_MIN, hi: int = PROMPT_MAX,
                   seed: int = SEED) -> List[Dict[str, Any]]:
    """``prompt`` records of ``lengths(n, lo, hi)`` tokens (no EOS), shuffled."""
    words = _Words(tokenizer, seed + 2)
    order = lengths(n, lo, hi)
    random.Random(f"{seed}-prompt-order").shuffle(order)
    return [{"id": f"prompt-{i:03d}-len{m}", "prompt": words.text(m)} for i, m in enumerate(order)]


def sft_lengths(tokenizer: Any, rows: Sequence[Dict[str, Any]]) -> List[int]:
    """Sequence lengths (prompt + answer + EOS) of ``prompt_answer`` records."""
    return [_seq_len(tokenizer, r["prompt"] + r["answer"]) for r in rows]


def pair_lengths(tokenizer: Any, rows: Sequence[Dict[str, Any]]) -> List[int]:
    """Chosen and rejected sequence lengths (with EOS) of ``rw_pair`` records, in packing order."""
    return [_seq_len(tokenizer, r["prompt"] + a) for r in rows
            for pair in zip(r["pos_answers"], r["neg_answers"]) for a in pair]


def _check(kind: str, got: Sequence[int], want: Sequence[int]) -> None:
    if sorted(got) != sorted(want):
        raise RuntimeError(f"{kind}: token lengths {sorted(got)} differ from the targets {sorted(want)}")


def write_sft(path: os.PathLike, tokenizer: Any, n: int = SFT_N, lo: int = SFT_MIN, hi: int = SFT_MAX,
              seed: int = SEED) -> Path:
    rows = sft_records(tokenizer, n, lo, hi, seed)
    _check("sft", sft_lengths(tokenizer, rows), lengths(n, lo, hi))
    return _write_jsonl(path, rows)


def write_pairs(path: os.PathLike, tokenizer: Any, n: int = PAIRS_N, lo: int = PAIR_MIN, hi: int = PAIR_MAX,
                seed: int = SEED) -> Path:
    rows = pair_records(tokenizer, n, lo, hi, seed)
    _check("pairs", pair_lengths(tokenizer, rows), lengths(2 * n, lo, hi))
    return _write_jsonl(path, rows)


def write_prompts(path: os.PathLike, tokenizer: Any, n: int = PROMPTS_N, lo: int = PROMPT_MIN,
                  hi: int = PROMPT_MAX, seed: int = SEED) -> Path:
    rows = prompt_records(tokenizer, n, lo, hi, seed)
    _check("prompts", [_seq_len(tokenizer, r["prompt"]) - 1 for r in rows], lengths(n, lo, hi))
    return _write_jsonl(path, rows)


def read_jsonl(path: os.PathLike) -> Iterator[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


if __name__ == "__main__":  # build the cached shape and print a summary
    model_dir = materialize()
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in (("sft", write_sft), ("pairs", write_pairs), ("prompts", write_prompts)):
            rows = list(read_jsonl(write(Path(tmp) / f"{name}.jsonl", tok)))
            print(f"{name}: {len(rows)} records, first id {rows[0]['id']}")
    print(f"model directory: {model_dir} (vocab {len(tok)})")
