"""A short end-to-end check of an installation, on the embedded assets only.

    python -m realhf.apps.selfcheck

It checks that the native operators agree with their fallbacks, loads the
embedded tokenizer and SFT data through the packed data loader, trains a tiny
ReaLModel on the packed batch (answer tokens only, no padding) for a few
steps, and generates from packed prompts with the KV cache. It exits non-zero if any
check fails, so it doubles as a smoke test of the install.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Tuple

import torch

from realhf.base import logging

logger = logging.getLogger("selfcheck")

Check = Tuple[str, bool, str]


def _random_intervals(n: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """n sorted, disjoint, non-empty [start, end) intervals inside [0, total)."""
    cuts = torch.randperm(total - 1, generator=gen)[: 2 * n - 1].add_(1).sort().values
    cuts = torch.cat([torch.zeros(1, dtype=torch.long), cuts])
    return cuts.view(n, 2)


def check_native_ops() -> List[Check]:
    from realhf.impl import ops
    from realhf.impl.model.utils.functional import cu_seqlens_from_lengths

    gen = torch.Generator().manual_seed(0)
    results: List[Check] = []

    src = torch.randn(1 << 20, generator=gen)
    iv = _random_intervals(2000, src.numel(), gen)
    backends = ops.available_backends("slice_intervals")
    ref = ops.slice_intervals(src, iv, backend="python")
    default = ops.slice_intervals(src, iv)
    dst = torch.zeros_like(src)
    ops.set_intervals(default, dst, iv)
    back = ops.slice_intervals(dst, iv, backend="python")
    ok = torch.equal(ref, default) and torch.equal(back, ref)
    results.append(("slice/set_intervals", ok, f"backends {backends}, 2000 intervals over 1M fp32"))

    lens = torch.randint(1, 64, (256,), generator=gen)
    cu = cu_seqlens_from_lengths(lens)
    values = torch.randn(int(lens.sum()), generator=gen)
    rewards = torch.randn(int(lens.sum()) - lens.numel(), generator=gen)
    trunc = torch.rand(lens.numel(), generator=gen) < 0.5
    a_ref, r_ref = ops.gae_1d(rewards, values, cu, trunc, 0.99, 0.95, backend="python")
    a, r = ops.gae_1d(rewards, values, cu, trunc, 0.99, 0.95)
    err = max((a - a_ref).abs().max().item(), (r - r_ref).abs().max().item())
    results.append(("gae_1d", err < 1e-5, f"backends {ops.available_backends('gae_1d')}, max abs diff {err:.1e}"))
    return results


def check_data_and_training(steps: int) -> List[Check]:
    from realhf import assets
    from realhf.api.core import data_api
    from realhf.api.core.config import DatasetAbstraction
    import realhf.impl.dataset  # noqa: F401  (registers the built-in datasets)

    results: List[Check] = []
    tokenizer = data_api.load_hf_tokenizer(assets.tokenizer_path())
    dataset = data_api.make_dataset(
        DatasetAbstraction("prompt_answer", args=dict(max_length=96, dataset_path=assets.dataset_path("sft-train"))),
        seed=1, dp_rank=0, world_size=1, tokenizer_or_tokenizer_name=tokenizer,
    )
    loader = data_api.PackedDataLoader(dataset, batch_size=16, shuffle=True, seed=1)
    batch = next(iter(loader))
    lens = [s[0] for s in batch.seqlens["packed_input_ids"]]
    n_tok = batch.data["packed_input_ids"].numel()
    results.append(("packed data", n_tok == sum(lens) and batch.bs == 16,
                    f"{len(dataset)} SFT items, batch of {batch.bs} packed into {n_tok} tokens (no padding)"))

    from realhf.api.core.model_api import GenerationHyperparameters
    from realhf.api.from_hf.llama import LLAMA
    from realhf.impl.model.nn.real_llm_api import ReaLModel
    from realhf.impl.model.nn.real_llm_generate import generate
    from realhf.impl.model.utils.functional import cu_seqlens_from_lengths, gather_packed_shifted_log_probs

    config = LLAMA.config_from_hf(dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        hidden_act="silu", tie_word_embeddings=False))
    model = ReaLModel(config).instantiate()
    model.init_weights(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    ids = batch.data["packed_input_ids"]
    cu = cu_seqlens_from_lengths(lens)
    # Loss on answer tokens: token t+1 is predicted at t, within each sequence.
    answer = torch.cat([~m[1:] for m in batch.data["prompt_mask"].split(lens)]).float()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(ids, cu, max(lens))
        logp = gather_packed_shifted_log_probs(logits, cu, ids)
        loss = -(logp * answer).sum() / answer.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dt = time.perf_counter() - t0
    one_buffer = all(p.untyped_storage().data_ptr() == model.flat_param.untyped_storage().data_ptr()
                     for p in model.parameters())
    results.append(("ReaLModel training", losses[-1] < 0.8 * losses[0] and one_buffer,
                    f"packed answer-token loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps "
                    f"({dt:.1f} s), {model.num_params()} params in one flat buffer"))

    prompts = [ids[cu[i]: cu[i] + int(m.sum())] for i, m in enumerate(batch.data["prompt_mask"].split(lens))][:4]
    p_cu = cu_seqlens_from_lengths([len(p) for p in prompts])
    with torch.no_grad():
        out = generate(model, torch.cat(prompts), p_cu,
                       GenerationHyperparameters(max_new_tokens=16, min_new_tokens=0, greedy=True),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    results.append(("KV-cache generation", len(out.sequences) == 4,
                    f"greedy, 4 packed prompts, lengths {out.gen_lengths.tolist()}; first: {text!r}"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of the tiny model")
    args = parser.parse_args(argv)

    import realhf

    print(f"realhf {realhf.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    sections: List[Tuple[str, Callable[[], List[Check]]]] = [
        ("native operators", check_native_ops),
        ("data and training", lambda: check_data_and_training(args.steps)),
    ]
    all_ok = True
    for title, fn in sections:
        try:
            checks = fn()
        except Exception as e:  # report every section, then fail
            logger.exception("%s failed", title)
            checks = [(title, False, f"{type(e).__name__}: {e}")]
        for name, ok, detail in checks:
            all_ok &= ok
            print(f"  [{'ok' if ok else 'FAIL'}] {name:<22} {detail}")
    print("self-check passed" if all_ok else "self-check FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
