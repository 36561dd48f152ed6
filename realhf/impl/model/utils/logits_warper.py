"""Sampling-time transforms of next-token logits.

The order is fixed: temperature, then top-k, then top-p, matching the usual
definition of nucleus sampling on the temperature-scaled distribution.  Removed
entries are set to ``-inf`` so that ``softmax`` assigns them exactly zero mass
and ``log_softmax`` of the result is the log-probability under the distribution
actually sampled from.
"""

import dataclasses
from typing import Optional

import torch

NEG_INF = float("-inf")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature`` (> 0); 1.0 returns the input unchanged."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}.")
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_keep_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool mask of the ``top_k`` largest entries of each row.

    Exactly ``min(top_k, V)`` entries are kept per row even with ties, so the
    number of candidates is predictable.
    """
    vocab = logits.shape[-1]
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if top_k >= vocab:
        return torch.ones_like(logits, dtype=torch.bool)
    idx = torch.topk(logits, top_k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool)
    return keep.scatter_(-1, idx, True)


def top_p_keep_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the nucleus: the smallest high-probability set with mass >= ``top_p``.

    A token is kept when the mass of the strictly more likely tokens (in sorted
    order) is still below ``top_p``; the most likely token always qualifies,
    so at least one token survives.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_p >= 1.0:
        # Rounding in the cumulative sum could otherwise drop tiny-mass tokens.
        return torch.ones_like(logits, dtype=torch.bool)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(logits, dtype=torch.bool)
    return keep.scatter_(-1, order, keep_sorted)


def mask_tokens(logits: torch.Tensor, token_ids, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return a copy with ``token_ids`` set to -inf (in ``rows`` only, when given).

    Used to forbid EOS before ``min_new_tokens`` tokens were generated.
    """
    out = logits.clone()
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device).reshape(-1)
    if rows is None:
        out[..., ids] = NEG_INF
    else:
        sel = out[rows]
        sel[..., ids] = NEG_INF
        out[rows] = sel
    return out


@dataclasses.dataclass
class LogitsWarper:
    """Temperature, top-k and top-p with one set of hyperparameters.

    :param temperature: > 0.
    :param top_k: keep this many tokens; ``None`` or >= vocab disables it.
    :param top_p: nucleus threshold in (0, 1]; 1 disables it.
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

    def truncates(self, vocab_size: int) -> bool:
        """Whether top-k/top-p can remove tokens at all for this vocabulary."""
        return self.top_p < 1.0 or (self.top_k is not None and self.top_k < vocab_size)

    def __call__(self, logits: torch.Tensor, with_mask: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Warp ``logits`` [..., V]; returns (warped logits, keep mask).

        The keep mask is True where the warped logit is finite, so it also
        reflects tokens that were -inf on input (e.g. a masked EOS); it is
        None with ``with_mask=False`` (a decoding step that records no mask).
        """
        out = apply_temperature(logits.float(), self.temperature)
        if self.top_k is not None and self.top_k < out.shape[-1]:
            out = out.masked_fill(~top_k_keep_mask(out, self.top_k), NEG_INF)
        if self.top_p < 1.0:
            out = out.masked_fill(~top_p_keep_mask(out, self.top_p), NEG_INF)
        return out, (torch.isfinite(out) if with_mask else None)


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0
) -> torch.Tensor:
    """Functional form of :class:`LogitsWarper`; returns only the warped logits."""
    return LogitsWarper(temperature=temperature, top_k=top_k, top_p=top_p)(logits)[0]
