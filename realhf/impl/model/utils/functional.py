"""Tensor utilities for packed (padding-free) batches.

Sequences are concatenated along the first dimension and delimited by
``cu_seqlens`` (int [bs + 1], ``cu_seqlens[0] == 0``), so sequence ``i`` is
``x[cu_seqlens[i]:cu_seqlens[i + 1]]``.
"""

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from realhf.impl.ops import fused_layers


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Fail early on malformed boundaries; silent misalignment is hard to debug."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with >= 1 entry, got shape {tuple(cu_seqlens.shape)}.")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at {total}, got "
            f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}."
        )
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing.")


def seqlens_from_cu(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence lengths (int64 [bs]) from cumulative boundaries."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def cu_seqlens_from_lengths(lengths: Union[torch.Tensor, Sequence[int]],
                            dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Cumulative boundaries [bs + 1] (starting at 0) of sequences of the given lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(dtype)


def packed_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of every packed token inside its own sequence (restarts at 0).

    Built with vectorised ops (no Python loop over sequences) because it is on
    the path of every forward pass.
    """
    seqlens = seqlens_from_cu(cu_seqlens)
    total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
    device = cu_seqlens.device
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), seqlens)
    return torch.arange(total, device=device, dtype=torch.long) - starts


def shifted_label_indices(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (pred, label) pairing logits at t with token t + 1 in the same sequence.

    The last token of each sequence has no successor, so it is dropped from
    ``pred``; the first token is never predicted, so it is dropped from
    ``label``.  Both have ``sum(L_i - 1)`` entries (empty sequences add none).
    """
    total = int(cu_seqlens[-1])
    device = cu_seqlens.device
    keep_pred = torch.ones(total, dtype=torch.bool, device=device)
    seqlens = seqlens_from_cu(cu_seqlens)
    nonempty = seqlens > 0
    ends = cu_seqlens[1:].long()[nonempty] - 1
    keep_pred[ends] = False
    pred = torch.nonzero(keep_pred, as_tuple=False).flatten()
    return pred, pred + 1


def gather_packed_shifted_log_probs(
    logits: torch.Tensor, cu_seqlens: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Log-probability of each next token, never crossing sequence boundaries.

    :param logits: [T, V] scores of the packed tokens.
    :param cu_seqlens: [bs + 1] boundaries.
    :param labels: [T] packed token ids (the inputs themselves).
    :return: float [sum(L_i - 1)], entry t of sequence i is
        ``log p(labels[t + 1] | logits[t])``.

    Normalised via ``logsumexp`` rather than a full ``log_softmax`` copy (for
    a large vocabulary the [T, V] intermediates are the dominant memory
    cost), in float32 whatever the logits' dtype; see :func:`realhf.impl.ops.fused_layers.token_logprobs`.
    """
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Expected logits [T, V] and labels [T], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    _check_cu_seqlens(cu_seqlens, logits.shape[0])
    pred, lab = shifted_label_indices(cu_seqlens)
    return fused_layers.token_logprobs(logits, pred, labels[lab].long())


def log_probs_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits[i])[labels[i]]`` for every row of ``logits`` [R, V] (float32):
    log-probabilities when only the rows a loss reads were computed."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"Expected logits [R, V] and labels [R], got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return fused_layers.token_logprobs(logits, rows, labels.to(logits.device).long())


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None, dim=None) -> torch.Tensor:
    """Mean over the entries where ``mask`` is true (all entries when None).

    An all-false mask gives 0 instead of NaN so that empty micro-batches do
    not poison the loss.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    m = mask.to(x.dtype)
    num = (x * m).sum() if dim is None else (x * m).sum(dim=dim)
    den = m.sum() if dim is None else m.sum(dim=dim)
    return num / den.clamp(min=1)


@torch.no_grad()
def _masked_moments(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    dim,
    unbiased: bool,
    group: Optional[dist.ProcessGroup],
    all_reduce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from summed statistics, so ranks can be combined exactly."""
    xf = x.double()
    m = torch.ones_like(xf) if mask is None else mask.to(xf.dtype)
    dims = tuple(range(x.dim())) if dim is None else dim
    factor = m.sum(dim=dims, keepdim=True)
    s1 = (xf * m).sum(dim=dims, keepdim=True)
    s2 = (xf.square() * m).sum(dim=dims, keepdim=True)
    if all_reduce and dist.is_available() and dist.is_initialized():
        stacked = torch.stack([factor, s1, s2])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        factor, s1, s2 = stacked[0], stacked[1], stacked[2]
    n = factor.clamp(min=1)
    mean = s1 / n
    var = (s2 / n - mean.square()).clamp(min=0)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return mean, var


def masked_normalization(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    dim=None,
    eps: float = 1e-5,
    unbiased: bool = False,
    all_reduce: bool = True,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Whiten ``x`` with the mean/std of its masked entries; masked-out entries become 0.

    Used for advantage normalisation in PPO.  With ``all_reduce`` and an
    initialised process group, the statistics are those of the union of all
    ranks' data (each rank holds a shard of the batch), computed from summed
    counts, sums and squared sums in float64 to limit cancellation.
    """
    mean, var = _masked_moments(x, mask, dim, unbiased, group, all_reduce)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out.to(x.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution of each row (natural log), shape ``logits.shape[:-1]``.

    Positions where a logit is -inf (removed by top-k/top-p) contribute 0
    instead of NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
