"""Autoregressive generation for packed prompts with a KV cache.

Prompts of different lengths are passed packed (no padding).  All prompts are
prefilled in one forward call (a run of identical consecutive prompts, such as
GRPO's group, once: its rows then copy the prefilled cache row); afterwards each unfinished row feeds exactly one
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
from typing import Any, Callable, Optional, Sequence, Union

import torch

from realhf.api.core.model_api import GenerationHyperparameters
from realhf.impl.model.nn import linear_replay
from realhf.impl.model.nn.fast_decode import FastDecoder, use_fast_decode
from realhf.impl.model.nn.prefix_tree import repeated_rows
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


def eos_id_list(eos_token_id: Optional[Union[int, list[int]]], vocab_size: Optional[int]) -> list[int]:
    """``eos_token_id`` as a list, checked against the vocabulary."""
    eos_ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if vocab_size is not None and any(not 0 <= e < vocab_size for e in eos_ids):
        raise ValueError(f"eos_token_id {eos_ids} outside the vocabulary of size {vocab_size}.")
    return eos_ids


def check_prompts(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Prompt lengths of ``cu_seqlens``; every prompt must be non-empty."""
    prompt_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(prompt_lens.numel()) == 0:
        raise ValueError("generate() needs at least one prompt.")
    if bool((prompt_lens <= 0).any()):
        raise ValueError("Every prompt must contain at least one token.")
    return prompt_lens


TokenSync = Callable[[torch.Tensor], torch.Tensor]


def sample_categorical(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per row of ``probs`` [n, V], drawn with probability ``probs[i, j]``.

    Inverse-CDF sampling: one uniform number per row against the row's
    cumulative sum. ``torch.multinomial`` draws an exponential variate for
    every entry of the row, which for a 1k-32k vocabulary costs more than the
    rest of a CPU decoding step's sampling. Entries of zero probability are
    never drawn: ``right=True`` returns the first index whose cumulative sum
    exceeds the draw, and a draw that rounding pushes past the total falls
    back to the row's last non-zero entry.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    over = idx >= probs.shape[-1]
    if bool(over.any()):
        last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
        idx = torch.where(over, last_nonzero, idx)
    return idx


class DecodeState:
    """Sampling state of one batch of rows, independent of how logits are computed.

    The caller computes the logits of the last position of every active row,
    in row order, and passes them to :meth:`step`, which samples one token
    per active row and says what to feed next. Keeping this apart from the
    forward pass lets a single process and a pipeline (where only the last
    stage sees logits) share one sampler.

    :param sync_tokens: called on the sampled tokens before they are used;
        tensor-parallel ranks pass a broadcast so all ranks keep the same rows.
    """

    def __init__(
        self,
        bs: int,
        gconfig: GenerationHyperparameters,
        eos_ids: list[int],
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        sync_tokens: Optional[TokenSync] = None,
    ):
        self.bs = bs
        self.gconfig = gconfig
        self.max_new = gconfig.max_new_tokens
        self.eos_ids = eos_ids
        self.eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.device = device
        self.generator = generator
        self.sync_tokens = sync_tokens
        self.tokens = torch.zeros(bs, self.max_new, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(bs, self.max_new, dtype=torch.float32, device=device)
        self.gen_lengths = torch.zeros(bs, dtype=torch.long, device=device)
        self.ended_by_eos = torch.zeros(bs, dtype=torch.bool, device=device)
        self.active = torch.arange(bs, device=device)  # rows still generating
        self.n_steps = 0
        self.finished = False
        self.vocab: Optional[int] = None
        self.warper: Optional[LogitsWarper] = None
        self.record_mask = False
        self.step_masks: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._sampler: Any = None  # the native sampler, chosen with the warper on the first step

    def _setup(self, vocab: int) -> None:
        g = self.gconfig
        self.vocab = vocab
        if not g.greedy:
            top_k = g.top_k if g.top_k < vocab else None
            self.warper = LogitsWarper(temperature=g.temperature, top_k=top_k, top_p=g.top_p)
        self.record_mask = self.warper is not None and not g.force_no_logits_mask and self.warper.truncates(vocab)
        self._sampler = self._native_sampler()

    def step(self, last_logits: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Sample from ``last_logits`` [n_active, V] (active rows in order).

        :return: None when every row is finished, else ``(next_tokens,
            feed_lengths)``: the tokens to feed (one per still-active row, in
            row order) and per-row input lengths (1 for active rows, 0 else).
        """
        if self.finished:
            raise RuntimeError("DecodeState.step called after generation finished.")
        step = self.n_steps
        if self.vocab is None:
            self._setup(last_logits.shape[-1])
        lg = last_logits.float()
        eos_banned = step < self.gconfig.min_new_tokens and bool(self.eos_ids)
        if self._sampler is not None:
            # Temperature, EOS ban, the draw and its log-probability in one native pass per row.
            u = torch.rand(lg.shape[0], 1, generator=self.generator, device=lg.device, dtype=lg.dtype).reshape(-1)
            banned = self.eos_tensor if eos_banned else self.eos_tensor[:0]
            next_tok, chosen_logp = self._sampler.sample_rows(lg.contiguous(), u, banned,
                                                              float(self.gconfig.temperature))
            return self._advance(step, next_tok, chosen_logp, eos_banned)
        if eos_banned:
            lg = mask_tokens(lg, self.eos_tensor)
        if self.warper is None:
            next_tok = lg.argmax(dim=-1)
            if self.sync_tokens is not None:
                next_tok = self.sync_tokens(next_tok)
            logp_all = torch.log_softmax(lg, dim=-1)
        else:
            warped, keep = self.warper(lg, with_mask=self.record_mask)
            probs = torch.softmax(warped, dim=-1)
            next_tok = sample_categorical(probs, self.generator)
            if self.sync_tokens is not None:
                next_tok = self.sync_tokens(next_tok)
            logp_all = torch.log_softmax(warped, dim=-1)
            if self.record_mask:
                self.step_masks.append((step, self.active, keep))
        return self._advance(step, next_tok, logp_all.gather(-1, next_tok[:, None]).squeeze(-1), eos_banned)

    def native_sampler(self, vocab: int) -> bool:
        """Whether the steps sample with the native sampler (so a native loop may run them all);
        only asked before the first step."""
        if self.n_steps != 0:
            return False
        if self.vocab is None:
            self._setup(vocab)
        return self._sampler is not None

    def finish(self, n_steps: int) -> None:
        """Mark ``n_steps`` steps done by a native loop (which filled the tensors) and the state finished."""
        self.n_steps, self.finished = n_steps, True

    def _native_sampler(self) -> Any:
        """The native sampler when the steps need nothing it does not do (CPU logits, plain
        sampling without top-k/top-p, no tensor-parallel token sync), else None."""
        if (self.warper is None or self.warper.truncates(self.vocab) or self.record_mask
                or self.sync_tokens is not None or torch.device(self.device).type != "cpu"):
            return None
        from realhf.impl.ops import native

        ext = native.load("decode_step")
        return ext if ext is not None and hasattr(ext, "sample_rows") else None  # older builds lack it

    def _advance(self, step: int, next_tok: torch.Tensor, chosen_logp: torch.Tensor,
                 eos_banned: bool) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Record the sampled tokens of the active rows; what to feed next, or None when done."""
        active = self.active
        self.tokens[active, step] = next_tok
        self.logprobs[active, step] = chosen_logp
        self.gen_lengths[active] += 1
        self.n_steps += 1

        if self.eos_ids and not eos_banned:
            hit_eos = torch.isin(next_tok, self.eos_tensor)
            self.ended_by_eos[active[hit_eos]] = True
            still = ~hit_eos
            any_left = bool(still.any())
        else:  # no EOS could be drawn: every row goes on
            still, any_left = None, True
        if step == self.max_new - 1 or not any_left:
            self.finished = True
            return None
        # Feed one token per unfinished row; finished rows pass length 0.
        if still is not None:
            active, next_tok = active[still], next_tok[still]
        feed_lengths = torch.zeros(self.bs, dtype=torch.long, device=self.device)
        feed_lengths[active] = 1
        self.active = active
        return next_tok, feed_lengths

    def output(self) -> GenerationOutput:
        max_new = self.max_new
        cu_gen = cu_seqlens_from_lengths(self.gen_lengths)
        valid = torch.arange(max_new, device=self.device)[None, :] < self.gen_lengths[:, None]
        logits_mask = None
        if self.record_mask:
            logits_mask = torch.ones(int(cu_gen[-1]), self.vocab, dtype=torch.bool, device=self.device)
            for step, rows, keep in self.step_masks:
                logits_mask[cu_gen[rows] + step] = keep
        return GenerationOutput(
            gen_tokens=self.tokens[valid],
            gen_lengths=self.gen_lengths,
            logprobs=self.logprobs[valid],
            logits_mask=logits_mask,
            no_eos=~self.ended_by_eos,
        )


def concat_generation_outputs(outputs: Sequence[GenerationOutput],
                              order: Optional[Sequence[int]] = None) -> GenerationOutput:
    """Rows of several outputs (e.g. micro-batches) as one output.

    ``order[i]`` is the position, in the concatenated rows, of output row i
    (the ``backward_indices`` of a micro-batch split); None keeps the order.
    """
    if len(outputs) == 0:
        raise ValueError("No generation outputs to concatenate.")
    masks = [o.logits_mask for o in outputs]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        vocab = next(m.shape[-1] for m in masks if m is not None)
        masks = [m if m is not None else torch.ones(int(o.gen_lengths.sum()), vocab, dtype=torch.bool,
                                                    device=o.gen_tokens.device)
                 for m, o in zip(masks, outputs)]
    lengths = torch.cat([o.gen_lengths for o in outputs])
    rows = list(range(int(lengths.numel()))) if order is None else list(order)

    def per_row(t: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, lengths.tolist())
        return torch.cat([parts[j] for j in rows]) if rows else t

    mask = None if masks[0] is None else per_row(torch.cat(masks))
    idx = torch.as_tensor(rows, dtype=torch.long)
    return GenerationOutput(
        gen_tokens=per_row(torch.cat([o.gen_tokens for o in outputs])),
        gen_lengths=lengths[idx.to(lengths.device)],
        logprobs=per_row(torch.cat([o.logprobs for o in outputs])),
        logits_mask=mask,
        no_eos=torch.cat([o.no_eos for o in outputs])[idx.to(lengths.device)],
    )


def tensor_parallel_token_sync(model: torch.nn.Module) -> Optional[TokenSync]:
    """Broadcast of sampled tokens from tp rank 0, for a tensor-parallel model."""
    if getattr(model, "tp_size", 1) <= 1:
        return None
    import torch.distributed as dist

    group = model.tp_info().group
    src = dist.get_global_rank(group, 0)

    def sync(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=src, group=group)
        return tokens

    return sync


def _takes_output_rows(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward accepts ``output_rows`` (ReaLModel does; test doubles may not)."""
    import inspect

    try:
        return "output_rows" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_kwargs(model: torch.nn.Module) -> dict:
    """Forward kwargs that make a tensor-parallel actor return full-vocabulary logits."""
    return {"gather_logits": True} if getattr(model, "tp_size", 1) > 1 else {}


def _start_capture(model: torch.nn.Module, fast: Optional[FastDecoder], state: "DecodeState", n_prompt_tokens: int,
                   bs: int, max_new: int) -> Optional[linear_replay.RolloutCapture]:
    """A capture of this generation's products for the training forward that follows
    (:mod:`linear_replay`), when asked for and the native loop runs every step."""
    if (fast is None or not fast.native or fast.head_panels is None or not linear_replay.capture_requested(model)
            or not state.native_sampler(model.config.vocab_size)):
        return None
    capture = linear_replay.RolloutCapture.allocate(model, n_prompt_tokens + bs * max(max_new - 1, 0))
    if capture is None:  # over the size limit
        return None
    fast.capture, fast.capture_base = capture, n_prompt_tokens
    fast.capture_slots = torch.full((bs, max(max_new, 1)), -1, dtype=torch.int64)
    return capture


def _finish_capture(model: torch.nn.Module, capture: linear_replay.RolloutCapture, answer_rows: torch.Tensor,
                    out: GenerationOutput, prompts: torch.Tensor, cu: torch.Tensor, prefill_cu: torch.Tensor,
                    prefilled_as: Optional[torch.Tensor]) -> None:
    """Record where each row's tokens sit in ``capture`` and keep it on ``model``: row r's
    prompt was prefilled as prompt ``prefilled_as[r]`` (r itself when None), its fed answer
    tokens went to ``answer_rows[r]``."""
    lens = (cu[1:] - cu[:-1]).tolist()
    rows_of = range(out.bs) if prefilled_as is None else prefilled_as.tolist()
    pcu = prefill_cu.tolist()
    capture.add_sequences(list(torch.split(prompts.cpu(), lens)),
                          [torch.arange(pcu[u], pcu[u + 1]) for u in rows_of],
                          [a.cpu() for a in out.sequences], list(answer_rows))
    linear_replay.keep(model, capture)


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

    :param model: follows the packed forward/KV-cache contract of ReaLModel
        (a tensor-parallel ReaLModel samples from all-gathered logits and
        broadcasts the tokens, so every tp rank returns the same output).
    :param input_ids: int64 [total_prompt_tokens], packed prompts (each non-empty).
    :param cu_seqlens: [bs + 1] prompt boundaries.
    :param gconfig: sampling hyperparameters.
    :param eos_token_id: id(s) that end a row; None generates until
        ``max_new_tokens``.
    :param pad_token_id: unused by decoding itself (outputs are packed); kept
        so callers can pass it through to :meth:`GenerationOutput.to_padded`.
    :param generator: RNG for sampling, for reproducible rollouts.

    ``gconfig.use_cuda_graph`` and ``force_cudagraph_recapture`` are accepted
    but have no effect here. On the CPU, steps after the prefill of a llama-family
    model run through :class:`~realhf.impl.model.nn.fast_decode.FastDecoder`
    (same arithmetic, fewer operations). The model is not switched to eval
    mode; callers control dropout.
    """
    del pad_token_id
    if getattr(model.config, "is_critic", False):
        raise ValueError("Cannot generate with a critic model (it outputs values, not logits).")
    device = input_ids.device
    cu_seqlens = cu_seqlens.to(device)
    prompt_lens = check_prompts(cu_seqlens)
    bs = int(prompt_lens.numel())
    eos_ids = eos_id_list(eos_token_id, getattr(model.config, "vocab_size", None))

    max_prompt = int(prompt_lens.max())
    dtype, _ = _model_dtype_device(model)
    kw = logits_kwargs(model)
    state = DecodeState(bs, gconfig, eos_ids, device, generator, tensor_parallel_token_sync(model))

    # Runs of identical prompts (GRPO's group) are prefilled once; their rows then copy the cache row.
    capacity = max_prompt + gconfig.max_new_tokens
    first = repeated_rows(input_ids, cu_seqlens)
    all_prompts, all_cu = input_ids, cu_seqlens
    if first is not None:
        unique = (first == torch.arange(bs)).to(device)
        slot = (unique.cumsum(0) - 1)[first.to(device)]  # row of the prefill cache each row copies
        cache = _allocate_cache(model, int(unique.sum()), capacity, dtype, device)
        if hasattr(cache, "gather_rows"):
            input_ids = input_ids[torch.repeat_interleave(unique, prompt_lens)]
            cu_seqlens = cu_seqlens_from_lengths(prompt_lens[unique]).to(device)
        else:  # a cache layout of the model's own: prefill every row
            first = None
    if first is None:
        cache = _allocate_cache(model, bs, capacity, dtype, device)
    fast = FastDecoder(model, cache) if use_fast_decode(model, device) else None
    capture = _start_capture(model, fast, state, int(input_ids.numel()), bs, gconfig.max_new_tokens)
    if fast is not None and fast.native:
        # [bs, V]: the native block loop; the head on last tokens only (on every token with a capture)
        last_logits = fast.prefill(input_ids, cu_seqlens)
    else:
        # The model's own forward (no weight copies); the last block and head on last tokens only
        # where the model offers it.
        last = cu_seqlens[1:].long() - 1
        if _takes_output_rows(model):
            last_logits = model(input_ids, cu_seqlens, max_prompt, kv_cache=cache, output_rows=last, **kw)
        else:
            last_logits = model(input_ids, cu_seqlens, max_prompt, kv_cache=cache, **kw)[last]
        # [n_active, V], active rows in order
    if first is not None:
        cache, last_logits = cache.gather_rows(slot), last_logits.index_select(0, slot)
        if fast is not None:
            fast.use_cache(cache)
    if fast is not None:
        n_steps = fast.run_steps(last_logits, state)
        if n_steps is not None:
            state.finish(n_steps)
            out = state.output()
            if capture is not None:
                _finish_capture(model, capture, fast.capture_slots, out, all_prompts, all_cu, cu_seqlens,
                                None if first is None else slot)
            return out
    while True:
        feed = state.step(last_logits)
        if feed is None:
            return state.output()
        next_tok, feed_lengths = feed
        if fast is not None:
            last_logits = fast.step(next_tok, state.active)
        else:
            last_logits = model(next_tok, cu_seqlens_from_lengths(feed_lengths), 1, kv_cache=cache, **kw)
