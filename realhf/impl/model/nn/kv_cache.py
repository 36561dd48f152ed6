"""Key/value cache for incremental decoding of packed sequences.

Row i of every tensor belongs to sequence i of the batch; ``seqlens[i]`` tokens
of it are valid. A forward with the cache appends each sequence's new tokens
after its valid prefix and advances ``seqlens`` (see ``ReaLModel.forward``).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from realhf.api.core.model_api import ReaLModelConfig


@dataclasses.dataclass
class KVCache:
    k: List[torch.Tensor]  # per block: [bs, capacity, n_kv_heads, head_dim]
    v: List[torch.Tensor]
    seqlens: torch.Tensor  # int64 [bs]

    @classmethod
    def allocate(
        cls,
        config: ReaLModelConfig,
        bs: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        n_blocks: Optional[int] = None,
    ) -> "KVCache":
        """``n_blocks`` defaults to all blocks; a pipeline stage passes its own count."""
        n = config.n_layers if n_blocks is None else n_blocks
        shape = (bs, capacity, config.n_kv_heads, config.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            seqlens=torch.zeros(bs, dtype=torch.int64, device=device),
        )

    @property
    def bs(self) -> int:
        return self.seqlens.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def gather_rows(self, rows: torch.Tensor) -> "KVCache":
        """A new cache whose row i is a copy of this cache's row ``rows[i]``."""
        rows = rows.to(self.seqlens.device)
        return KVCache(k=[t.index_select(0, rows) for t in self.k], v=[t.index_select(0, rows) for t in self.v],
                       seqlens=self.seqlens.index_select(0, rows))
