"""A slow but obviously-correct model behind the packed forward/KV-cache contract.

It wraps a ``transformers.LlamaForCausalLM`` and does no real caching: the
"cache" only remembers each row's token history, and every call recomputes the
whole row and returns the logits of the new tokens.  Generation can thus be
checked against an independent implementation without depending on ReaLModel.
"""

import dataclasses

import torch
import transformers


@dataclasses.dataclass
class ReferenceConfig:
    """The fields of the model config that generation reads."""

    vocab_size: int
    n_layers: int
    is_critic: bool = False


@dataclasses.dataclass
class HistoryCache:
    """Per-row token history standing in for k/v tensors."""

    history: list[list[int]]
    seqlens: torch.Tensor
    capacity: int


def tiny_llama_config(vocab_size: int = 96, eos_token_id: int = 2, n_layers: int = 2) -> transformers.LlamaConfig:
    """A very small Llama so that a test runs in well under a second."""
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
        # Larger than the default so that next-token distributions are peaked
        # and greedy choices are not decided by rounding noise.
        initializer_range=0.2,
    )


class ReferenceLM(torch.nn.Module):
    """Packed-contract adapter over a Hugging Face causal LM."""

    def __init__(self, hf_model: transformers.PreTrainedModel):
        super().__init__()
        self.hf = hf_model.eval()
        self.config = ReferenceConfig(
            vocab_size=hf_model.config.vocab_size, n_layers=hf_model.config.num_hidden_layers
        )
        self.calls: list[list[int]] = []  # per-call sequence lengths, for assertions

    def allocate_kv_cache(self, bs: int, capacity: int) -> HistoryCache:
        return HistoryCache(
            history=[[] for _ in range(bs)], seqlens=torch.zeros(bs, dtype=torch.long), capacity=capacity
        )

    def _row_logits(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)
        return self.hf(input_ids=x, use_cache=False).logits[0].float()

    def forward(self, input_ids, cu_seqlens, max_seqlen, kv_cache=None) -> torch.Tensor:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        assert max(lens) <= max_seqlen, (lens, max_seqlen)
        self.calls.append(lens)
        chunks = torch.split(input_ids, lens)
        if kv_cache is not None:
            assert len(lens) == len(kv_cache.history), "bs must equal the cache's bs"
        out = []
        for i, chunk in enumerate(chunks):
            if len(chunk) == 0:
                continue
            new = chunk.tolist()
            if kv_cache is None:
                out.append(self._row_logits(new))
                continue
            hist = kv_cache.history[i]
            assert len(hist) + len(new) <= kv_cache.capacity, "cache capacity exceeded"
            hist.extend(new)
            kv_cache.seqlens[i] += len(new)
            out.append(self._row_logits(hist)[-len(new):])
        if not out:
            return torch.zeros(0, self.config.vocab_size)
        return torch.cat(out)


class LogitBiasLM(torch.nn.Module):
    """Adds a fixed [vocab] offset to another packed model's logits.

    Makes a chosen token (e.g. EOS) dominant so stopping rules can be tested
    deterministically on any backend; the cache is the wrapped model's own.
    """

    def __init__(self, inner: torch.nn.Module, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.register_buffer("bias", bias.float())

    def allocate_kv_cache(self, bs: int, capacity: int):
        return self.inner.allocate_kv_cache(bs, capacity)

    def forward(self, input_ids, cu_seqlens, max_seqlen, kv_cache=None) -> torch.Tensor:
        return self.inner(input_ids, cu_seqlens, max_seqlen, kv_cache=kv_cache) + self.bias
