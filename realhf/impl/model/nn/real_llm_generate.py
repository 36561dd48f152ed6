"""Autoregressive generation for packed prompts with a KV cache.

Prompts of different lengths are passed packed (no padding).  All prompts are
prefilled in one forward call; afterwards each unfinished row feeds exactly one
token per step, and finished rows pass length 0 so the batch never has to be
re-packed or the cache compacted.

Log-probabilities
-----------------
The returned log-probability of a generated token is taken under the
distribution it was *sampled from*: after EOS masking (before
``min_new_tokens``) and after temperature/top-k/top-p.  PPO's importance
ratio compares the behaviour policy with the trained policy, so the behaviour
log-prob must be that of the actual sampler; the trained policy reproduces the
same distribution by dividing its logits by the temperature and applying the
returned ``logits_mask``.  Greedy decoding skips warping, so its log-probs are
those of the raw (EOS-masked) softmax.
"""

import dataclasses
from typing import Optional, Union

import torch

from realhf.api.core.model_api import GenerationHyperparameters
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
from realhf.impl.model.utils.logits_warper import LogitsWarper, mask_tokens


@dataclasses.dataclass
class PackedPPOInputs:
    """Prompt + answer concatenated per sequence, packed, in PPO's layout.

    :param packed_input_ids: int64 [total]; sequence i is prompt_i ++ answer_i.
    :param cu_seqlens: int64 [bs + 1] boundaries of ``packed_input_ids``.
    :param prompt_mask: bool [total], True on prompt tokens.
    :param packed_logprobs: float [total - bs]: L_i - 1 entries per sequence
        (log-prob of token t + 1), zeros where token t + 1 is a prompt token.
    :param packed_logits_mask: bool [total, vocab] or None, aligned with the
        logits rows: row t restricts the prediction of token t + 1; rows that
        predict prompt tokens, and each sequence's last row, keep everything.
    :param seq_no_eos_mask: bool [bs], True when the answer was truncated.
    """

    packed_input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    prompt_mask: torch.Tensor
    packed_logprobs: torch.Tensor
    packed_logits_mask: Optional[torch.Tensor]
    seq_no_eos_mask: torch.Tensor


@dataclasses.dataclass
class GenerationOutput:
    """Generated answers, packed in row order.

    :param gen_tokens: int64 [total_gen]; answer i is
        ``gen_tokens[cu_gen[i]:cu_gen[i + 1]]`` (EOS included when emitted).
    :param gen_lengths: int64 [bs].
    :param logprobs: float32 [total_gen], see the module docstring.
    :param logits_mask: bool [total_gen, vocab] (True = token could be
        sampled) or None when nothing was truncated or masks were disabled.
    :param no_eos: bool [bs], True when the row stopped at ``max_new_tokens``
        without emitting EOS.
    """

    gen_tokens: torch.Tensor
    gen_lengths: torch.Tensor
    logprobs: torch.Tensor
    logits_mask: Optional[torch.Tensor]
    no_eos: torch.Tensor

    @property
    def bs(self) -> int:
        return int(self.gen_lengths.numel())

    @property
    def cu_gen_lengths(self) -> torch.Tensor:
        """Cumulative answer boundaries, int64 [bs + 1]."""
        return cu_seqlens_from_lengths(self.gen_lengths)

    @property
    def sequences(self) -> list[torch.Tensor]:
        """One tensor of generated tokens per row."""
        return list(torch.split(self.gen_tokens, self.gen_lengths.tolist()))

    @property
    def logprobs_per_row(self) -> list[torch.Tensor]:
        return list(torch.split(self.logprobs, self.gen_lengths.tolist()))

    def to_padded(self, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded view for consumers that need a rectangle.

        :return: tokens int64 [bs, max_len] (``pad_token_id`` fill),
            logprobs float [bs, max_len] (0 fill), attention mask bool [bs, max_len].
        """
        max_len = int(self.gen_lengths.max()) if self.bs > 0 else 0
        device = self.gen_tokens.device
        attn = torch.arange(max_len, device=device)[None, :] < self.gen_lengths[:, None]
        tokens = torch.full((self.bs, max_len), pad_token_id, dtype=torch.long, device=device)
        lps = torch.zeros((self.bs, max_len), dtype=self.logprobs.dtype, device=device)
        tokens[attn] = self.gen_tokens
        lps[attn] = self.logprobs
        return tokens, lps, attn

    def packed_ppo_inputs(self, prompt_ids: torch.Tensor, prompt_cu_seqlens: torch.Tensor) -> PackedPPOInputs:
        """Concatenate each prompt with its answer into PPO's packed layout."""
        prompt_lens = (prompt_cu_seqlens[1:] - prompt_cu_seqlens[:-1]).long().tolist()
        gen_lens = self.gen_lengths.tolist()
        if len(prompt_lens) != self.bs:
            raise ValueError(f"{len(prompt_lens)} prompts for {self.bs} generated rows.")
        prompts = torch.split(prompt_ids, prompt_lens)
        answers = self.sequences
        answer_lps = self.logprobs_per_row
        answer_masks = (
            torch.split(self.logits_mask, gen_lens) if self.logits_mask is not None else None
        )
        device = prompt_ids.device
        ids, pmask, lps, lmasks = [], [], [], []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids += [p, a.to(device)]
            pmask += [
                torch.ones(len(p), dtype=torch.bool, device=device),
                torch.zeros(len(a), dtype=torch.bool, device=device),
            ]
            lps += [torch.zeros(max(len(p) - 1, 0), dtype=self.logprobs.dtype, device=device),
                    answer_lps[i].to(device)]
            if answer_masks is not None:
                vocab = self.logits_mask.shape[-1]
                lmasks += [
                    torch.ones(max(len(p) - 1, 0), vocab, dtype=torch.bool, device=device),
                    answer_masks[i].to(device),
                    torch.ones(1, vocab, dtype=torch.bool, device=device),
                ]
        seqlens = torch.tensor([p + g for p, g in zip(prompt_lens, gen_lens)], dtype=torch.long)
        return PackedPPOInputs(
            packed_input_ids=torch.cat(ids),
            cu_seqlens=cu_seqlens_from_lengths(seqlens).to(device),
            prompt_mask=torch.cat(pmask),
            packed_logprobs=torch.cat(lps),
            packed_logits_mask=torch.cat(lmasks) if answer_masks is not None else None,
            seq_no_eos_mask=self.no_eos.to(device),
        )


def _allocate_cache(model: torch.nn.Module, bs: int, capacity: int, dtype, device):
    """A fresh cache for ``bs`` rows.

    A model may provide ``allocate_kv_cache(bs, capacity)`` itself (a backend
    with its own cache layout); otherwise the standard :class:`KVCache` is used.
    """
    custom = getattr(model, "allocate_kv_cache", None)
    if callable(custom):
        return custom(bs, capacity)
    from realhf.impl.model.nn.kv_cache import KVCache

    return KVCache.allocate(model.config, bs, capacity, dtype, device)


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters(), None)
    if p is None:
        return torch.float32, torch.device("cpu")
    return p.dtype, p.device


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gconfig: GenerationHyperparameters,
    eos_token_id: Optional[Union[int, list[int]]],
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> GenerationOutput:
    """Generate answers for packed prompts.

    :param model: follows the packed forward/KV-cache contract of ReaLModel.
    :param input_ids: int64 [total_prompt_tokens], packed prompts (each non-empty).
    :param cu_seqlens: [bs + 1] prompt boundaries.
    :param gconfig: sampling hyperparameters.
    :param eos_token_id: id(s) that end a row; None generates until
        ``max_new_tokens``.
    :param pad_token_id: unused by decoding itself (outputs are packed); kept
        so callers can pass it through to :meth:`GenerationOutput.to_padded`.
    :param generator: RNG for sampling, for reproducible rollouts.

    ``gconfig.use_cuda_graph`` and ``force_cudagraph_recapture`` are accepted
    but have no effect here: decoding runs eagerly on every device.  The model
    is not switched to eval mode; callers control dropout.
    """
    del pad_token_id
    if getattr(model.config, "is_critic", False):
        raise ValueError("Cannot generate with a critic model (it outputs values, not logits).")
    device = input_ids.device
    cu_seqlens = cu_seqlens.to(device)
    prompt_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    bs = int(prompt_lens.numel())
    if bs == 0:
        raise ValueError("generate() needs at least one prompt.")
    if bool((prompt_lens <= 0).any()):
        raise ValueError("Every prompt must contain at least one token.")
    eos_ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and any(not 0 <= e < vocab_size for e in eos_ids):
        raise ValueError(f"eos_token_id {eos_ids} outside the vocabulary of size {vocab_size}.")

    max_new = gconfig.max_new_tokens
    max_prompt = int(prompt_lens.max())
    dtype, _ = _model_dtype_device(model)
    cache = _allocate_cache(model, bs, max_prompt + max_new, dtype, device)

    logits = model(input_ids, cu_seqlens, max_prompt, kv_cache=cache)
    vocab = logits.shape[-1]
    last_logits = logits[cu_seqlens[1:].long() - 1].float()  # [n_active, V], active rows in order

    warper = None
    if not gconfig.greedy:
        top_k = gconfig.top_k if gconfig.top_k < vocab else None
        warper = LogitsWarper(temperature=gconfig.temperature, top_k=top_k, top_p=gconfig.top_p)
    record_mask = warper is not None and not gconfig.force_no_logits_mask and warper.truncates(vocab)

    tokens = torch.zeros(bs, max_new, dtype=torch.long, device=device)
    logprobs = torch.zeros(bs, max_new, dtype=torch.float32, device=device)
    gen_lengths = torch.zeros(bs, dtype=torch.long, device=device)
    ended_by_eos = torch.zeros(bs, dtype=torch.bool, device=device)
    active = torch.arange(bs, device=device)  # rows still generating
    step_masks: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    for step in range(max_new):
        lg = last_logits
        if step < gconfig.min_new_tokens and eos_ids:
            lg = mask_tokens(lg, eos_tensor)
        if warper is None:
            next_tok = lg.argmax(dim=-1)
            logp_all = torch.log_softmax(lg, dim=-1)
        else:
            warped, keep = warper(lg)
            probs = torch.softmax(warped, dim=-1)
            next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            logp_all = torch.log_softmax(warped, dim=-1)
            if record_mask:
                step_masks.append((step, active, keep))
        tokens[active, step] = next_tok
        logprobs[active, step] = logp_all.gather(-1, next_tok[:, None]).squeeze(-1)
        gen_lengths[active] += 1

        hit_eos = torch.isin(next_tok, eos_tensor) if eos_ids else torch.zeros_like(next_tok, dtype=torch.bool)
        ended_by_eos[active[hit_eos]] = True
        still = ~hit_eos
        if step == max_new - 1 or not bool(still.any()):
            break
        # Feed one token per unfinished row; finished rows pass length 0.
        feed_lengths = torch.zeros(bs, dtype=torch.long, device=device)
        feed_lengths[active[still]] = 1
        active = active[still]
        out = model(next_tok[still], cu_seqlens_from_lengths(feed_lengths), 1, kv_cache=cache)
        last_logits = out.float()

    cu_gen = cu_seqlens_from_lengths(gen_lengths)
    valid = torch.arange(max_new, device=device)[None, :] < gen_lengths[:, None]
    logits_mask = None
    if record_mask:
        logits_mask = torch.ones(int(cu_gen[-1]), vocab, dtype=torch.bool, device=device)
        for step, rows, keep in step_masks:
            logits_mask[cu_gen[rows] + step] = keep
    return GenerationOutput(
        gen_tokens=tokens[valid],
        gen_lengths=gen_lengths,
        logprobs=logprobs[valid],
        logits_mask=logits_mask,
        no_eos=~ended_by_eos,
    )
