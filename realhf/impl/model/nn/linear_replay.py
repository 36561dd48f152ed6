"""A rollout's matrix products, replayed in the training forward that follows it.

On-policy RL (GRPO here; a PPO actor's first minibatch would qualify too)
trains on sequences the same weights have just generated, so the training forward recomputes, token for
token, every matrix product the decoding already computed: a third of the
step's arithmetic. When the CPU decoding loop runs
(:class:`~realhf.impl.model.nn.fast_decode.FastDecoder`), a generation can keep
each product's output per fed token (a :class:`RolloutCapture`); a training
forward over the same sequences with the weights unchanged then takes those
outputs instead of multiplying (:class:`_Replayed`), and its backward is the
linear layer's own (``dX = dY W``, ``dW = dY^T X``, ``db = sum dY``). Norms,
rotary, attention and activations still run, so every tensor the backward
reads exists; the values equal a recomputed forward up to float rounding of
the two product kernels.

Sequences are found by their tokens (prompt + answer, or without the last
token), so micro-batching, reordering and dp dispatch between the calls do
not matter; a sequence not in the capture is multiplied. Changed weights
(the flat buffer's data pointer or version counter, an optimizer step or a
parameter reallocation, which declare themselves: :func:`weights_updated`),
dropout or gradient checkpointing make the forward compute as usual, and an
update releases the captures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

# The products of a block a capture keeps, in the native loop's order.
PRODUCTS = ("qkv", "o", "gate_up", "down")
# Largest capture a generation keeps (it holds every product's output of every fed token:
# ~50 MB a worker at the GRPO benchmark's shape, gigabytes for large models and long answers).
MAX_CAPTURE_BYTES = int(float(os.environ.get("REALHF_ROLLOUT_CAPTURE_MAX_MB", "1024")) * (1 << 20))


def _weights_version(model: torch.nn.Module) -> Optional[Tuple[int, int, int]]:
    """Changes whenever the weights may have: their buffer moved, a torch in-place op wrote it
    (its version counter), or an optimizer step declared an update (:func:`weights_updated`;
    fused optimizer kernels and raw transfers into the buffer leave the counter as it was)."""
    flat = getattr(model, "flat_param", None)
    if flat is None:
        return None
    return flat.data_ptr(), flat._version, getattr(model, "_weight_updates", 0)


def weights_updated(model: torch.nn.Module) -> None:
    """Declare that ``model``'s weights changed (after an optimizer step): captures of the
    old weights are no longer replayed, and are released."""
    model._weight_updates = getattr(model, "_weight_updates", 0) + 1
    drop(model)


def _key(tokens: torch.Tensor) -> bytes:
    return tokens.to(torch.int64).cpu().numpy().tobytes()


@dataclasses.dataclass
class RolloutCapture:
    """Outputs of one generation's products, by capture row.

    ``blocks[b]`` holds the :data:`PRODUCTS` of block b, each [rows, width];
    ``head`` the logits [rows, vocab]. A sequence's tokens map to capture rows,
    -1 for a token whose products were never computed (each answer's last,
    which decoding does not feed): the replaying forward computes those.
    """

    blocks: List[Dict[str, torch.Tensor]]
    head: torch.Tensor
    version: Tuple[int, int, int]
    sequences: Dict[bytes, torch.Tensor] = dataclasses.field(default_factory=dict)  # tokens -> capture rows

    @staticmethod
    def _widths(model: torch.nn.Module) -> Dict[str, int]:
        cfg = model.config
        d, h, f = cfg.head_dim, cfg.hidden_dim, cfg.intermediate_dim
        return {"qkv": (cfg.n_q_heads + 2 * cfg.n_kv_heads) * d, "o": h, "gate_up": 2 * f, "down": h}

    @classmethod
    def nbytes(cls, model: torch.nn.Module, n_rows: int) -> int:
        """Size of a capture of ``n_rows`` tokens (float32)."""
        cfg = model.config
        return 4 * n_rows * (cfg.n_layers * sum(cls._widths(model).values()) + cfg.vocab_size)

    @classmethod
    def allocate(cls, model: torch.nn.Module, n_rows: int) -> Optional["RolloutCapture"]:
        """A capture of ``n_rows`` tokens, or None when it would exceed :data:`MAX_CAPTURE_BYTES`
        (the training forward then multiplies)."""
        if cls.nbytes(model, n_rows) > MAX_CAPTURE_BYTES:
            return None
        widths = cls._widths(model)
        blocks = [{name: torch.empty(n_rows, w) for name, w in widths.items()} for _ in range(model.config.n_layers)]
        return cls(blocks, torch.empty(n_rows, model.config.vocab_size), _weights_version(model))

    def flat(self) -> List[torch.Tensor]:
        """The block tensors in the native loop's order (block by block, :data:`PRODUCTS`)."""
        return [blk[name] for blk in self.blocks for name in PRODUCTS]

    def add_sequences(self, prompts: List[torch.Tensor], prompt_rows: List[torch.Tensor],
                      answers: List[torch.Tensor], answer_rows: List[torch.Tensor]) -> None:
        """Record each (prompt, answer) sequence's capture rows: the prompt's tokens at
        ``prompt_rows``, the answer's j-th token at ``answer_rows[j]`` for the tokens that
        were fed (all but the last), -1 for the last."""
        for p, pr, a, ar in zip(prompts, prompt_rows, answers, answer_rows):
            n = int(a.numel())
            fed = ar[:max(n - 1, 0)].to(torch.int64)
            last = torch.full((min(n, 1),), -1, dtype=torch.int64)
            tokens, rows = torch.cat([p, a.to(p.device)]), torch.cat([pr.to(torch.int64), fed, last])
            self.sequences[_key(tokens)] = rows
            if n > 0:  # the sequence without its last token: what a training forward that reads no last row feeds
                self.sequences.setdefault(_key(tokens[:-1]), rows[:-1])


# ------------------------------------------------------------------ the store
def capture_requested(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_capture_rollouts", False))


@contextlib.contextmanager
def capturing(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Generations of ``model`` within the block keep a :class:`RolloutCapture` (where the
    native decoding loop runs them)."""
    before = capture_requested(model)
    model._capture_rollouts = enabled
    try:
        yield
    finally:
        model._capture_rollouts = before


def keep(model: torch.nn.Module, capture: RolloutCapture) -> None:
    """Keep ``capture`` for the training forward; captures of the same weights accumulate
    (several generation micro-batches), older ones are dropped."""
    held: List[RolloutCapture] = getattr(model, "_rollout_captures", [])
    model._rollout_captures = [c for c in held if c.version == capture.version] + [capture]


def drop(model: torch.nn.Module) -> None:
    model._rollout_captures = []


def replay_rows(model: torch.nn.Module, input_ids: torch.Tensor,
                cu_seqlens: torch.Tensor) -> Optional[Tuple[RolloutCapture, torch.Tensor]]:
    """The capture of the current weights holding the most sequences of this packed batch,
    and the capture row of each token (flat layout; -1 for the tokens of a sequence it does
    not hold, which are computed), when a training forward of ``model`` may replay it; else None."""
    held: List[RolloutCapture] = getattr(model, "_rollout_captures", [])
    if not held or not _replay_allowed(model):
        return None
    version = _weights_version(model)
    cu = cu_seqlens.tolist()
    ids = input_ids.cpu()
    keys = [_key(ids[cu[i]:cu[i + 1]]) for i in range(len(cu) - 1)]
    best, hits = None, 0
    for capture in held:
        n = sum(k in capture.sequences for k in keys) if capture.version == version else 0
        if n > hits:
            best, hits = capture, n
    if best is None:
        return None
    rows = [best.sequences.get(k) for k in keys]
    rows = [r if r is not None else torch.full((cu[i + 1] - cu[i],), -1, dtype=torch.int64)
            for i, r in enumerate(rows)]
    return best, (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64))


def _replay_allowed(model: torch.nn.Module) -> bool:
    cfg = model.config
    dropout = model.training and (cfg.attn_pdrop > 0 or cfg.resid_pdrop > 0 or cfg.embd_pdrop > 0)
    return (getattr(model, "tp_size", 1) == 1 and model.has_embedding and model.has_head and not dropout
            and not getattr(model, "gradient_checkpointing", False) and not cfg.is_critic
            and cfg.mlp_type == "llama" and torch.is_grad_enabled() and model.flat_param.device.type == "cpu")


# ----------------------------------------------------------------- replaying
class _Replayed(torch.autograd.Function):
    """A linear layer whose output is given: forward returns it, backward is the layer's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.t() @ x if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


@dataclasses.dataclass
class _Rows:
    """Capture rows of a forward's tokens: where to read, and the tokens to compute instead."""

    read: torch.Tensor  # int64 [n], -1 replaced by 0
    missing: torch.Tensor  # int64 [m]: positions whose row is -1

    @classmethod
    def of(cls, rows: torch.Tensor) -> "_Rows":
        absent = rows < 0
        return cls(rows.masked_fill(absent, 0), absent.nonzero().squeeze(1))


def _replaying(linear: torch.nn.Linear, source: torch.Tensor, rows: _Rows):
    """A forward for ``linear`` returning ``source``'s rows (columns of one product); tokens
    without a captured row are multiplied."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != rows.read.shape[0]:
            raise RuntimeError(f"Replayed {tuple(source.shape)} product: {x.shape[0]} input rows for "
                               f"{rows.read.shape[0]} captured ones.")
        out = source.index_select(0, rows.read)
        if rows.missing.numel():
            with torch.no_grad():
                out.index_copy_(0, rows.missing, F.linear(x.index_select(0, rows.missing), linear.weight, linear.bias))
        return _Replayed.apply(x, linear.weight, linear.bias, out)

    return forward


@contextlib.contextmanager
def replayed(model: torch.nn.Module, capture: RolloutCapture, rows: torch.Tensor,
             last_rows: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model``'s linear layers return the captured outputs: ``rows``
    [tokens of this forward's layout] picks each token's capture row; ``last_rows`` (capture
    rows of the output rows, or None for all) those of the last block's o/MLP and the head."""
    cfg = model.config
    nq, nkv, f = cfg.n_q_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_dim
    rows = _Rows.of(rows)
    tail = rows if last_rows is None else _Rows.of(last_rows)
    patched = []

    def patch(linear: torch.nn.Linear, source: torch.Tensor, r: _Rows) -> None:
        linear.forward = _replaying(linear, source, r)
        patched.append(linear)

    blocks = [layer for layer in model.layers if hasattr(layer, "attn")]
    try:
        for i, (blk, cap) in enumerate(zip(blocks, capture.blocks)):
            out_rows = tail if i == len(blocks) - 1 else rows
            c = blk.attn.c_attn
            qkv = cap["qkv"]
            patch(c.q_attn, qkv[:, :nq], rows)
            patch(c.k_attn, qkv[:, nq:nq + nkv], rows)
            patch(c.v_attn, qkv[:, nq + nkv:], rows)
            patch(blk.attn.c_proj, cap["o"], out_rows)
            patch(blk.mlp.gate_proj, cap["gate_up"][:, :f], out_rows)
            patch(blk.mlp.up_proj, cap["gate_up"][:, f:], out_rows)
            patch(blk.mlp.down_proj, cap["down"], out_rows)
        patch(model.layers[-1], capture.head, tail)
        yield
    finally:
        for linear in patched:
            del linear.forward
