"""ReaLModel (packed sequences) versus ``transformers`` Llama (padded batches).

Both models hold the same weights: a random ``LlamaForCausalLM`` is saved as a
Hugging Face checkpoint and ``ReaLModel.from_llama`` loads it.  For each
hidden size (default 256 and 512; 4 layers, vocab 4096, 8 heads, 4 KV heads,
fp32, CPU) the script measures:

* **training** (forward + backward, next-token cross entropy on every real
  token) on 16 sequences with lengths uniform in [32, 512]:

  - ``real/packed``: ReaLModel on the packed batch (no padding at all),
  - ``real/padded``: ReaLModel on every sequence right-padded to the longest
    (fed as equal-length packed rows, loss masked), which isolates the gain of
    packing from the gain of the implementation,
  - ``hf/padded``: ``LlamaForCausalLM`` on the padded batch with an attention
    mask.

  tokens/s counts only real tokens, so padding shows up as lost throughput.
* **generation**: greedy decoding of 8 prompts of mixed length with 64 new
  tokens and ``min_new_tokens == max_new_tokens``, so both sides produce the
  same number of tokens; ReaLModel's packed ``generate`` versus
  ``transformers``' ``generate`` on left-padded prompts.  tokens/s counts
  generated tokens.

Achieved GFLOP/s counts *useful* work only, identical for every row of a
section: training ``6 * N * tokens + 3 * 2 * layers * hidden * sum(L_i^2)``
(causal QK^T and AV, forward + backward), generation ``2 * N * (prompt +
generated tokens)``, with ``N`` the parameters used in matmuls (all but the
input embedding).  ``of_peak`` divides it by the fp32 GFLOP/s of a 2048^3
matmul timed in the same run.  The ``check`` column compares the models'
outputs: max |logit difference| for training, fraction of identical generated
tokens for generation.

Run ``python benchmarks/bench_model.py`` (a few minutes on 2 cores);
``--quick`` shrinks everything for a smoke test.  Results go to
``benchmarks/results/bench_model.json``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import llama_config, print_table, random_lengths, timeit, write_json  # noqa: E402

MODEL_MODULE = "realhf.impl.model.nn.real_llm_api"
GENERATE_MODULE = "realhf.impl.model.nn.real_llm_generate"
# Importing these registers the HF families (and their ``from_<family>`` loaders).
HF_MODULES = ("realhf.api.from_hf", "realhf.impl.model.nn.real_llm_hf")


def import_real_model() -> Tuple[Callable[[str], torch.nn.Module], Any]:
    """Return ``(load_llama, generate)`` or exit with a message naming what is missing.

    ``load_llama(load_dir)`` is ``ReaLModel.from_llama``; the family methods
    are attached when the HF families and the conversion module are imported.
    """
    try:
        model_mod = importlib.import_module(MODEL_MODULE)
        gen_mod = importlib.import_module(GENERATE_MODULE)
        for optional in HF_MODULES:
            try:
                importlib.import_module(optional)
            except ImportError:
                pass
        ReaLModel, generate = model_mod.ReaLModel, gen_mod.generate
        load = getattr(ReaLModel, "from_llama", None)
        if not callable(load):
            raise AttributeError("ReaLModel has no from_llama(load_dir)")
        return load, generate
    except (ImportError, AttributeError) as e:
        raise SystemExit(
            f"bench_model: cannot import ReaLModel.from_llama ({MODEL_MODULE}) or "
            f"generate ({GENERATE_MODULE}): {e}"
        ) from e


# ---------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------


def build_pair(cfg, load_llama: Callable[[str], torch.nn.Module],
               workdir: Path) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """A random HF Llama and a ReaLModel loaded from its checkpoint (same weights)."""
    from transformers import LlamaForCausalLM

    from realhf.impl.model.conversion.hf_io import save_hf_config, save_hf_state_dict

    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float()
    ckpt = workdir / f"llama_h{cfg.hidden_size}"
    save_hf_state_dict(hf.state_dict(), ckpt)
    save_hf_config(cfg.to_dict(), ckpt)
    real = load_llama(str(ckpt)).float()
    return hf, real


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: everything except the input embedding."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def make_batch(lengths: List[int], vocab: int, seed: int) -> Dict[str, torch.Tensor]:
    """Packed and right-padded views of the same random sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    packed = torch.cat(seqs)
    lens = torch.tensor(lengths)
    cu = F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
    # Next-token labels inside each sequence; a sequence's last token has none.
    labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    max_len = max(lengths)
    mask = torch.arange(max_len)[None, :] < lens[:, None]
    padded = torch.zeros(len(lengths), max_len, dtype=torch.long)
    padded[mask] = packed
    padded_labels = torch.full_like(padded, -100)
    padded_labels[mask] = labels
    return dict(packed=packed, cu=cu, labels=labels, max_len=torch.tensor(max_len),
                padded=padded, mask=mask, padded_labels=padded_labels)


def real_logits(model, ids: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    out = model(ids, cu, max_len)
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train_steps(hf, real, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Closures that run one forward + backward each, all on the same tokens."""
    bs, max_len = batch["padded"].shape
    cu_padded = (torch.arange(bs + 1) * max_len).to(torch.int32)

    def real_packed() -> None:
        logits = real_logits(real, batch["packed"], batch["cu"], max_len)
        F.cross_entropy(logits.float(), batch["labels"], ignore_index=-100).backward()

    def real_padded() -> None:
        logits = real_logits(real, batch["padded"].flatten(), cu_padded, max_len)
        F.cross_entropy(logits.float(), batch["padded_labels"].flatten(),
                        ignore_index=-100).backward()

    def hf_padded() -> None:
        logits = hf(input_ids=batch["padded"], attention_mask=batch["mask"].long()).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch["padded_labels"].flatten(),
                        ignore_index=-100).backward()

    return {"real/packed": real_packed, "real/padded": real_padded, "hf/padded": hf_padded}


@torch.no_grad()
def logits_gap(hf, real, batch: Dict[str, torch.Tensor]) -> float:
    """Max |logit difference| between ReaLModel (packed) and HF (padded) on real tokens."""
    a = real_logits(real, batch["packed"], batch["cu"], int(batch["max_len"]))
    b = hf(input_ids=batch["padded"], attention_mask=batch["mask"].long()).logits[batch["mask"]]
    return float((a.float() - b.float()).abs().max())


def bench_training(hf, real, cfg, lengths: List[int], args, peak: float) -> List[Dict[str, Any]]:
    batch = make_batch(lengths, cfg.vocab_size, seed=1)
    tokens = sum(lengths)
    attn = 3 * 2 * cfg.num_hidden_layers * cfg.hidden_size * sum(n * n for n in lengths)
    flops = 6 * matmul_params(hf) * tokens + attn
    gap = logits_gap(hf.eval(), real.eval(), batch)
    hf.train()
    real.train()
    rows = []
    for name, step in train_steps(hf, real, batch).items():
        model = hf if name.startswith("hf") else real

        def run() -> None:
            model.zero_grad(set_to_none=True)
            step()

        t = timeit(run, warmup=args.warmup, repeat=args.repeat, max_seconds=args.max_seconds)
        model.zero_grad(set_to_none=True)
        padded_tokens = len(lengths) * max(lengths) if "padded" in name else tokens
        rows.append({
            "hidden": cfg.hidden_size, "task": "train", "impl": name, "seqs": len(lengths),
            "real_tokens": tokens, "computed_tokens": padded_tokens,
            "sec": t["median"], "tokens_per_s": tokens / t["median"],
            "gflops": flops / t["median"] / 1e9, "of_peak": flops / t["median"] / 1e9 / peak,
            "check": gap if name == "real/packed" else "", "runs": t["runs"],
        })
    base = next(r["tokens_per_s"] for r in rows if r["impl"] == "hf/padded")
    for r in rows:
        r["speedup_vs_hf"] = r["tokens_per_s"] / base
    return rows


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def bench_generation(hf, real, generate, cfg, prompt_lengths: List[int], new_tokens: int,
                     args, peak: float) -> List[Dict[str, Any]]:
    from realhf.api.core.model_api import GenerationHyperparameters

    hf.eval()
    real.eval()
    batch = make_batch(prompt_lengths, cfg.vocab_size, seed=2)
    bs = len(prompt_lengths)
    max_len = max(prompt_lengths)
    # transformers decodes left-padded prompts.
    left = torch.zeros(bs, max_len, dtype=torch.long)
    left_mask = torch.zeros(bs, max_len, dtype=torch.long)
    for i, n in enumerate(prompt_lengths):
        left[i, max_len - n:] = batch["padded"][i, :n]
        left_mask[i, max_len - n:] = 1
    gconfig = GenerationHyperparameters(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        greedy=True)
    outputs: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def run_real() -> None:
        out = generate(real, batch["packed"], batch["cu"], gconfig,
                       eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        outputs["real"] = out.to_padded(cfg.pad_token_id)[0]

    @torch.no_grad()
    def run_hf() -> None:
        out = hf.generate(input_ids=left, attention_mask=left_mask, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        outputs["hf"] = out[:, max_len:]

    generated = bs * new_tokens
    flops = 2 * matmul_params(hf) * (sum(prompt_lengths) + generated)
    rows = []
    for name, fn in (("real/packed", run_real), ("hf/padded", run_hf)):
        t = timeit(fn, warmup=args.warmup, repeat=args.repeat, max_seconds=args.max_seconds)
        rows.append({
            "hidden": cfg.hidden_size, "task": "generate", "impl": name, "seqs": bs,
            "real_tokens": generated, "computed_tokens": "",
            "sec": t["median"], "tokens_per_s": generated / t["median"],
            "gflops": flops / t["median"] / 1e9, "of_peak": flops / t["median"] / 1e9 / peak,
            "runs": t["runs"],
        })
    same = outputs["real"].shape == outputs["hf"].shape
    match = float((outputs["real"] == outputs["hf"]).float().mean()) if same else 0.0
    rows[0]["check"] = match
    base = rows[1]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_hf"] = r["tokens_per_s"] / base
    return rows


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """This machine's fp32 matmul throughput, the yardstick for ``of_peak``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: torch.mm(a, b), warmup=1, repeat=repeat)
    return 2 * n ** 3 / t["min"] / 1e9


# ---------------------------------------------------------------------------


COLUMNS = ["hidden", "task", "impl", "seqs", "real_tokens", "computed_tokens", "sec",
           "tokens_per_s", "speedup_vs_hf", "gflops", "of_peak", "check"]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seqs", type=int, default=None, help="training sequences")
    parser.add_argument("--min-len", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=8.0,
                        help="stop repeating a case after this long (at least 3 runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--name", default=None, help="results file name")
    args = parser.parse_args(argv)
    q = args.quick
    hiddens = args.hidden or ([128] if q else [256, 512])
    seqs = args.seqs or (4 if q else 16)
    min_len = args.min_len or (16 if q else 32)
    max_len = args.max_len or (64 if q else 512)
    n_prompts = args.prompts or (2 if q else 8)
    new_tokens = args.new_tokens or (8 if q else 64)
    name = args.name or ("bench_model_quick" if q else "bench_model")
    if args.threads:
        torch.set_num_threads(args.threads)

    load_llama, generate = import_real_model()
    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        print(f"warning: 1-minute load average is {load_start:.1f}; if other processes still compete "
              f"for the CPU, timings will be pessimistic and noisy\n")
    peak = matmul_gflops(1024 if q else 2048)
    print(f"fp32 matmul: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)\n")

    train_lengths = random_lengths(seqs, min_len, max_len, seed=0)
    prompt_lengths = random_lengths(n_prompts, max(4, min_len // 2), max(8, max_len // 4), seed=1)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        for hidden in hiddens:
            cfg = llama_config(hidden, args.layers, args.vocab, heads=8, kv_heads=4,
                               max_positions=max_len + max(prompt_lengths) + new_tokens)
            hf, real = build_pair(cfg, load_llama, Path(tmp))
            rows += bench_training(hf, real, cfg, train_lengths, args, peak)
            rows += bench_generation(hf, real, generate, cfg, prompt_lengths, new_tokens,
                                     args, peak)
            print_table([r for r in rows if r["hidden"] == hidden], COLUMNS,
                        title=f"hidden {hidden}, params {sum(p.numel() for p in hf.parameters()):,}")
            del hf, real

    # A second measurement guards against a start-up hiccup deflating the yardstick.
    peak_end = matmul_gflops(1024 if q else 2048)
    if peak_end > peak:
        for r in rows:
            r["of_peak"] = r["gflops"] / peak_end
        peak = peak_end
    results = {"matmul_gflops": peak, "loadavg_1m": [load_start, os.getloadavg()[0]],
               "train_lengths": train_lengths, "prompt_lengths": prompt_lengths, "new_tokens": new_tokens, "rows": rows}
    print_table(rows, COLUMNS, title=(
        "training: fwd+bwd, tokens/s over real tokens; generation: greedy, generated tokens/s; "
        "check = max|logit diff| (train) / identical tokens (generate); "
        f"of_peak vs {peak:.0f} GFLOP/s fp32 matmul"))
    path = write_json(name, results, extra={"args": vars(args)})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
