"""The fused CPU kernels of a training step versus their torch formulas.

``realhf.impl.ops.fused_layers`` runs a llama block's non-matmul parts as
native float32 kernels (``realhf._C.fused_layers``); the ``python`` backend is
the plain torch formula each kernel replaces. For each operator at the shape
the benchmarks' training steps run it (the compute-bound llama of
``_shape.py``: hidden 256, SwiGLU width 688, 4 query / 2 KV heads of 64,
vocabulary 1024, one core), this prints the median time of the forward and of
forward + backward for both backends and their ratio:

* ``varlen_attention`` at the PPO training shape (a minibatch of 8 sequences
  of 42-60 tokens) and the SFT shape (one worker's 16 sequences of 32-256);
* ``tree_attention`` at the GRPO shape (one worker's 8 prompts of 10-28
  tokens with 4 answers of 32 each), against the attention layer's batched
  products over the padded segments (its fallback);
* ``swiglu`` and ``rms_norm`` over the GRPO worker's 1172 tokens;
* ``token_logprobs`` over 1024 rows of the 1024-wide vocabulary.

Run ``python benchmarks/bench_fused_layers.py`` (about a minute);
``--quick`` runs fewer repetitions. Results go to
``benchmarks/results/bench_fused_layers.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, timeit, write_json  # noqa: E402

from realhf.impl.ops import fused_layers as fl  # noqa: E402

HIDDEN, INTER, N_Q, N_KV, HEAD_DIM, VOCAB = 256, 688, 4, 2, 64, 1024


def _lengths(n: int, lo: int, hi: int) -> List[int]:
    return [lo + (i * (hi - lo)) // max(n - 1, 1) for i in range(n)]


def _leaves(*shapes: Sequence[int], seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


def _tree_layout(prompts: Sequence[int], group: int, answer: int):
    """Segments (query run, prefix) and runs of a tree batch, and the padded-segment context of the fallback."""
    from realhf.impl.model.nn.prefix_tree import _segment_list, _segments

    segs = _segment_list([(p, [answer] * group) for p in prompts])
    total = sum(n for _, n, _, _ in segs)
    return _segments(segs, torch.arange(total), torch.device("cpu")), total


def _varlen_case(name: str, lens: List[int]) -> Dict[str, Any]:
    T = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0)
    q, k, v = _leaves((T, N_Q, HEAD_DIM), (T, N_KV, HEAD_DIM), (T, N_KV, HEAD_DIM))
    return dict(name=name, shape=f"{len(lens)} seqs, {T} tokens", leaves=[q, k, v], fns={
        b: (lambda b=b: fl.varlen_attention(q, k, v, cu, HEAD_DIM ** -0.5, backend=b)) for b in ("cpp", "python")})


def _tree_case() -> Dict[str, Any]:
    from realhf.impl.model.modules import attention

    tree, T = _tree_layout(_lengths(8, 10, 28), 4, 32)
    ctx = attention.PackedContext(cu_seqlens=torch.tensor([0, T]), max_seqlen=T, seqlens=torch.tensor([T]),
                                  positions=torch.arange(T), seq_ids=torch.zeros(T, dtype=torch.long), tree=tree)
    q, k, v = _leaves((T, N_Q, HEAD_DIM), (T, N_KV, HEAD_DIM), (T, N_KV, HEAD_DIM))
    scale = HEAD_DIM ** -0.5
    segments = tree.segments

    def fallback() -> torch.Tensor:  # the layer's own path: without segments it takes the padded products
        tree.segments = None
        try:
            return attention._attn_tree(q, k, v, ctx, scale, None)
        finally:
            tree.segments = segments

    return dict(name="tree_attention (GRPO worker)", shape=f"8 prompts x 4 answers, {T} tokens", leaves=[q, k, v],
                fns={"cpp": lambda: fl.tree_attention(q, k, v, segments, tree.groups, scale), "python": fallback})


def _elementwise_cases() -> List[Dict[str, Any]]:
    tokens = 1172
    gate, up = _leaves((tokens, INTER), (tokens, INTER))
    x, w = _leaves((tokens, HIDDEN), (HIDDEN,))
    (logits,) = _leaves((1024, VOCAB))
    rows = torch.arange(1024)
    labels = torch.randint(0, VOCAB, (1024,), generator=torch.Generator().manual_seed(1))
    backends = ("cpp", "python")
    return [
        dict(name="swiglu", shape=f"{tokens} x {INTER}", leaves=[gate, up],
             fns={b: (lambda b=b: fl.swiglu(gate, up, backend=b)) for b in backends}),
        dict(name="rms_norm", shape=f"{tokens} x {HIDDEN}", leaves=[x, w],
             fns={b: (lambda b=b: fl.rms_norm(x, w, 1e-5, backend=b)) for b in backends}),
        dict(name="token_logprobs", shape=f"1024 x {VOCAB}", leaves=[logits],
             fns={b: (lambda b=b: fl.token_logprobs(logits, rows, labels, backend=b)) for b in backends}),
    ]


def cases() -> List[Dict[str, Any]]:
    """Every measured operator: name, shape, leaves (its differentiable inputs), {backend: forward}."""
    return [_varlen_case("varlen_attention (PPO minibatch)", _lengths(8, 42, 60)),
            _varlen_case("varlen_attention (SFT worker)", _lengths(16, 32, 256)),
            _tree_case()] + _elementwise_cases()


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not fl.native_attention(torch.device("cpu")):
        print("bench_fused_layers: skipped, the native kernels need the built extension and a CPU with AVX2 + FMA",
              file=sys.stderr)
        return []
    repeat = 5 if args.quick else 25
    rows = []
    for case in cases():
        ms: Dict[str, float] = {}
        for backend, fn in case["fns"].items():
            with torch.no_grad():
                ms[f"{backend}_fwd"] = timeit(fn, repeat=repeat)["median"] * 1e3
            ms[f"{backend}_fwd_bwd"] = timeit(_fwd_bwd(fn, case["leaves"]), repeat=repeat)["median"] * 1e3
        rows.append({"op": case["name"], "shape": case["shape"],
                     "native_fwd_ms": ms["cpp_fwd"], "torch_fwd_ms": ms["python_fwd"],
                     "fwd_speedup": ms["python_fwd"] / ms["cpp_fwd"],
                     "native_fwd_bwd_ms": ms["cpp_fwd_bwd"], "torch_fwd_bwd_ms": ms["python_fwd_bwd"],
                     "fwd_bwd_speedup": ms["python_fwd_bwd"] / ms["cpp_fwd_bwd"]})
    print("\nFused CPU kernels vs their torch formulas (one thread, median ms; speedup = torch / native)")
    print_table(rows)
    path = write_json("bench_fused_layers", rows, extra={"setup": {
        "hidden": HIDDEN, "intermediate": INTER, "heads": N_Q, "kv_heads": N_KV, "head_dim": HEAD_DIM,
        "vocab": VOCAB, "repeat": repeat, "threads": 1}})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
