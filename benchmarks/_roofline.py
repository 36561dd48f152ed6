"""The machine's limit for one RL step on the benchmark shape.

Any system that runs the same algorithm in fp32 must do the step's matrix
multiplications: the transformer layers on every token of every sequence it
generates, scores or trains on, plus the output head where its output is used
(next-token logits of the answer positions, values of the answer positions, the
reward at the last position). :func:`step_flops` counts them per call from the
shape and the actual token counts; attention scores are counted causally. When
samples come in groups that share their prompt (GRPO's ``group_size``), a
prompt is counted once per group: its activations are the same for every
sample of the group, so a system need compute them only once (ours does, see
``realhf.impl.model.nn.prefix_tree``).

:func:`measure_rates` measures this machine's matmul rate at the shapes those
calls run, one single-threaded process per core, all cores at once (so the
shared cache and memory bandwidth are contended as in a real step): forward
GEMMs at the number of tokens of a training or scoring micro-batch, their
backward forms (``dY @ W`` and ``dY^T @ X``), and forward GEMMs of a decoding
step (one row per sequence a core generates).

:func:`floor_seconds` = core-seconds of matmul work / cores: the step time of a
system that spends nothing on anything but matrix multiplication and keeps
every core busy. The step time of the peer divided by this floor is the
highest speed-up over that peer any system could reach on this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Linear = Tuple[int, int]  # (in_features, out_features)


def layer_linears(shape: Dict[str, int]) -> List[Linear]:
    """The linear maps of one llama decoder layer: q, k, v, o, gate, up, down."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = head_dim * shape["num_key_value_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]


def _layers_flops(shape: Dict[str, int], n_tokens: int) -> float:
    per_token = 2 * sum(i * o for i, o in layer_linears(shape))
    return float(shape["num_hidden_layers"] * per_token * n_tokens)


def _causal_attention_flops(shape: Dict[str, int], length: int) -> float:
    # Q K^T and P V over the causal triangle: 2 * 2 * (L (L + 1) / 2) * hidden per layer.
    return float(shape["num_hidden_layers"] * 2 * length * (length + 1) * shape["hidden_size"])


def forward_flops(shape: Dict[str, int], lengths: Sequence[int], head_tokens: int, head_out: int) -> float:
    """Matmul FLOPs of one forward pass over sequences of ``lengths`` with an output head of
    ``head_out`` columns applied at ``head_tokens`` positions in all."""
    total = _layers_flops(shape, sum(lengths)) + sum(_causal_attention_flops(shape, n) for n in lengths)
    return total + 2.0 * shape["hidden_size"] * head_out * head_tokens


def grouped_forward_flops(shape: Dict[str, int], prompt_lengths: Sequence[int], new_tokens: int, group_size: int,
                          head_out: int, head_per_answer: bool) -> float:
    """Matmul FLOPs of one forward pass over ``group_size`` answers of ``new_tokens`` per prompt, the
    prompt computed once per group (each answer attends to it and to its own earlier tokens); the
    head at every answer-predicting position (the prompt's last one shared) or, without
    ``head_per_answer``, once per sequence."""
    prompts = list(prompt_lengths[::group_size])
    n_seqs = len(prompts) * group_size
    h, n = shape["hidden_size"], new_tokens
    total = _layers_flops(shape, sum(prompts) + n_seqs * n)
    for p in prompts:
        cells = p * (p + 1) / 2 + group_size * (n * p + n * (n + 1) / 2)
        total += shape["num_hidden_layers"] * 4.0 * h * cells
    head_rows = len(prompts) + n_seqs * (n - 1) if head_per_answer else n_seqs
    return total + 2.0 * h * head_out * head_rows


def generate_flops(shape: Dict[str, int], prompt_lengths: Sequence[int], new_tokens: int,
                   group_size: int = 1) -> Tuple[float, float]:
    """(prefill, decode) FLOPs of generating ``new_tokens`` after each prompt with a key/value cache:
    the prompt once (once per group of ``group_size`` consecutive equal prompts) with logits at its
    last position, then one token per step for the other ``new_tokens - 1`` tokens, attending over
    the cache."""
    vocab, h = shape["vocab_size"], shape["hidden_size"]
    unique = list(prompt_lengths[::group_size])
    prefill = forward_flops(shape, unique, len(unique), vocab)
    decode = 0.0
    for p in prompt_lengths:
        for t in range(1, new_tokens):
            ctx = p + t
            decode += _layers_flops(shape, 1) + shape["num_hidden_layers"] * 4.0 * ctx * h + 2.0 * h * vocab
    return prefill, decode


def step_flops(shape: Dict[str, int], prompt_lengths: Sequence[int], new_tokens: int,
               calls: Dict[str, str], group_size: int = 1) -> Dict[str, Dict[str, float]]:
    """FLOPs per call, by kind of work (``prefill``/``decode``/``forward``/``train``).

    ``calls`` maps a call name to what it computes: ``generate``, ``logprobs`` (next-token
    log-probabilities of the answers), ``values`` (a scalar per answer position), ``reward``
    (a scalar at the last position), ``train_logprobs`` / ``train_values`` (forward and backward,
    the backward costing twice the forward), ``replayed_train_logprobs`` (the backward only: the
    forward replays the generation's products, see ``realhf/impl/model/nn/linear_replay.py``). ``group_size`` > 1: consecutive runs of that many
    samples share their prompt, which is counted once per run (see the module docstring)."""
    lengths = [p + new_tokens for p in prompt_lengths]
    answers = len(prompt_lengths) * new_tokens
    vocab = shape["vocab_size"]
    heads = {"logprobs": (answers, vocab), "values": (answers, 1), "reward": (len(lengths), 1)}
    out: Dict[str, Dict[str, float]] = {}

    def forward(head: str) -> float:
        if group_size == 1:
            return forward_flops(shape, lengths, *heads[head])
        return grouped_forward_flops(shape, prompt_lengths, new_tokens, group_size, heads[head][1],
                                     head_per_answer=head != "reward")

    for name, kind in calls.items():
        if kind == "generate":
            prefill, decode = generate_flops(shape, prompt_lengths, new_tokens, group_size)
            out[name] = {"prefill": prefill, "decode": decode}
        elif kind in heads:
            out[name] = {"forward": forward(kind)}
        elif kind.startswith("train_"):
            out[name] = {"train": 3 * forward(kind[len("train_"):])}
        elif kind.startswith("replayed_train_"):  # the forward's products come from the rollout
            out[name] = {"backward": 2 * forward(kind[len("replayed_train_"):])}
        else:
            raise ValueError(f"unknown call kind {kind!r} for {name!r}")
    return out


def _gemm_set(shape: Dict[str, int], rows: int, kind: str) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """(A shape, B shape) of the GEMMs of one layer for ``rows`` tokens: ``forward`` (and ``decode``)
    ``X @ W^T``, or for ``backward`` the two gradient products ``dY @ W`` and ``dY^T @ X``."""
    gemms = []
    for i, o in layer_linears(shape) + [(shape["hidden_size"], shape["vocab_size"])]:
        if kind in ("forward", "decode"):
            gemms.append(((rows, i), (i, o)))
        else:
            gemms += [((rows, o), (o, i)), ((o, rows), (rows, i))]
    return gemms


def _panel_products(pairs: List[Any]) -> Optional[Callable[[], Any]]:
    """The same products through the decoding steps' own kernel (weights packed in panels,
    ``realhf._C.decode_step``), or None where it does not run (no extension, no AVX2 + FMA)."""
    try:
        import torch

        from realhf.impl.model.nn import fast_decode
        from realhf.impl.ops import native
    except ImportError:
        return None
    if not fast_decode.panel_kernel_supported():
        return None
    ext, none = native.load("decode_step"), torch.empty(0)
    packed = [(a, ext.pack_panels([b.t().contiguous()]), b.shape[1]) for a, b in pairs]
    return lambda: [ext.packed_linear(a, w, n, none) for a, w, n in packed]


def _flops_per_second(products: Callable[[], Any], flops_per_round: float, seconds: float) -> float:
    products()  # warm the allocator and the kernels' caches
    rounds, t0 = 0, time.perf_counter()
    while True:
        products()
        rounds += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return rounds * flops_per_round / elapsed


def _rate_worker(shape: Dict[str, int], rows: int, kind: str, seconds: float, start: Any, out: Any) -> None:
    """One core's rate; for ``decode`` the faster of a BLAS sgemm and the decoding kernel."""
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(a, generator=gen), torch.randn(b, generator=gen)) for a, b in _gemm_set(shape, rows, kind)]
    flops_per_round = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)
    candidates = [lambda: [a @ b for a, b in pairs]]
    if kind == "decode":
        panels = _panel_products(pairs)
        if panels is not None:
            candidates.append(panels)
    start.wait()
    out.put(max(_flops_per_second(c, flops_per_round, seconds / len(candidates)) for c in candidates))


def measure_rates(shape: Dict[str, int], rows: Dict[str, Tuple[int, str]], cores: int = 0,
                  seconds: float = 1.0) -> Dict[str, float]:
    """Matmul FLOP/s of one core while every core runs the same GEMMs, for each named
    ``(rows, forward|backward|decode)`` case; the mean over the cores."""
    cores = cores or os.cpu_count() or 1
    ctx = mp.get_context("fork")
    rates = {}
    for name, (n_rows, kind) in rows.items():
        start, out = ctx.Barrier(cores), ctx.Queue()
        procs = [ctx.Process(target=_rate_worker, args=(shape, n_rows, kind, seconds, start, out))
                 for _ in range(cores)]
        for p in procs:
            p.start()
        per_core = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        rates[name] = sum(per_core) / len(per_core)
    return rates


def floor_seconds(flops: Dict[str, Dict[str, float]], rate_of: Dict[str, float], cores: int) -> Dict[str, Any]:
    """Core-seconds of each call at the measured rates (``rate_of`` maps a kind of work to a
    per-core FLOP/s; ``train`` work is one third forward, two thirds backward) and the step's
    floor: all calls' core-seconds spread over ``cores``."""
    per_call = {}
    for call, parts in flops.items():
        secs = 0.0
        for kind, f in parts.items():
            if kind == "train":
                secs += f / 3 / rate_of["forward"] + 2 * f / 3 / rate_of["backward"]
            elif kind == "backward":
                secs += f / rate_of["backward"]
            else:
                secs += f / rate_of[kind]
        per_call[call] = secs
    total_flops = sum(sum(p.values()) for p in flops.values())
    return {"core_seconds": per_call, "gflop": total_flops / 1e9, "floor_s": sum(per_call.values()) / cores}


def roofline(shape: Dict[str, int], prompt_lengths: Sequence[int], new_tokens: int, calls: Dict[str, str],
             train_rows: int, decode_rows: int, cores: int = 0, group_size: int = 1) -> Dict[str, Any]:
    """Measure the rates at this step's shapes and return FLOPs, rates and the floor.

    ``train_rows``: tokens per micro-batch of a training or scoring pass on one core;
    ``decode_rows``: sequences one core decodes at a time."""
    cores = cores or os.cpu_count() or 1
    flops = step_flops(shape, prompt_lengths, new_tokens, calls, group_size)
    rates = measure_rates(shape, {"forward": (train_rows, "forward"), "backward": (train_rows, "backward"),
                                  "decode": (decode_rows, "decode")}, cores)
    rate_of = {"forward": rates["forward"], "prefill": rates["forward"], "backward": rates["backward"],
               "decode": rates["decode"]}
    result = floor_seconds(flops, rate_of, cores)
    result.update({"cores": cores, "gflops_per_core": {k: v / 1e9 for k, v in rates.items()},
                   "train_rows": train_rows, "decode_rows": decode_rows,
                   "call_gflop": {c: sum(p.values()) / 1e9 for c, p in flops.items()}})
    return result


def roofline_rows(result: Dict[str, Any], peer_seconds: Dict[str, float]) -> List[Dict[str, Any]]:
    """Table rows: each call's GFLOP and core-seconds at the measured rates, then the floor and,
    for each named step time (ours, the peer's), its ratio to the floor."""
    rows = [{"what": call, "gflop": result["call_gflop"][call], "seconds": secs}
            for call, secs in result["core_seconds"].items()]
    rows.append({"what": f"floor (all calls / {result['cores']} cores)", "gflop": result["gflop"],
                 "seconds": result["floor_s"], "x_floor": 1.0})
    for name, secs in peer_seconds.items():
        rows.append({"what": name, "seconds": secs, "x_floor": secs / result["floor_s"]})
    return rows


def ratio_bound(result: Dict[str, Any], peer_rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Each peer's step time over the floor: no system doing the same matmuls beats that peer by
    more on this machine."""
    return {row["system"]: row["median_step_s"] / result["floor_s"] for row in peer_rows}


def print_limit(result: Dict[str, Any], rows: Sequence[Dict[str, Any]], bound: Dict[str, float]) -> None:
    """The measured rates, the table of :func:`roofline_rows` and the ratio bound."""
    from _common import print_table

    rates = ", ".join(f"{k} {v:.1f}" for k, v in result["gflops_per_core"].items())
    print(f"\nThe machine's limit: matmul GFLOP/s per core with all {result['cores']} cores busy ({rates}); "
          "seconds = core-seconds of each call's matmuls, x_floor = step time / floor")
    print_table(rows, ["what", "gflop", "seconds", "x_floor"])
    print(f"highest reachable ratio over trl: {bound}")
