"""What is searched over: model shapes, per-call workloads, 3D layouts and meshes."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

GENERATE, INFERENCE, TRAIN = "generate", "inference", "train"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shape of a llama-family transformer (enough to count FLOPs and bytes)."""

    n_layers: int
    hidden: int
    intermediate: int
    n_q_heads: int
    n_kv_heads: int
    vocab: int
    is_critic: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_q_heads

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls: q,o (h x h), k,v (h x kv*hd), SwiGLU (3 x h x I)."""
        h, hd = self.hidden, self.head_dim
        return 2 * h * h + 2 * h * self.n_kv_heads * hd + 3 * h * self.intermediate

    @property
    def head_params(self) -> int:
        return self.hidden * (1 if self.is_critic else self.vocab)

    @property
    def n_params(self) -> int:
        """All parameters: blocks (with 2 norms), embedding, final norm, head."""
        return (self.n_layers * (self.layer_matmul_params + 2 * self.hidden) + self.vocab * self.hidden
                + self.hidden + self.head_params)

    def critic(self) -> "ModelShape":
        return dataclasses.replace(self, is_critic=True)

    @classmethod
    def from_real_config(cls, c: Any) -> "ModelShape":
        return cls(n_layers=c.n_layers, hidden=c.hidden_dim, intermediate=c.intermediate_dim,
                   n_q_heads=c.n_q_heads, n_kv_heads=c.n_kv_heads, vocab=c.vocab_size,
                   is_critic=bool(getattr(c, "is_critic", False)))


# LLaMA-2 7B/13B/70B and CodeLlama 34B shapes.
LLAMA = {
    "7b": ModelShape(32, 4096, 11008, 32, 32, 32000),
    "13b": ModelShape(40, 5120, 13824, 40, 40, 32000),
    "34b": ModelShape(48, 8192, 22016, 64, 8, 32000),
    "70b": ModelShape(80, 8192, 28672, 64, 8, 32000),
}


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """One model function call of the dataflow graph.

    :param role: the model it runs (calls of one role share weights: a
        trained role's other calls need its weights reallocated to their layout).
    :param kind: GENERATE, INFERENCE or TRAIN.
    :param deps: calls whose outputs it reads (within one step).
    :param n_seqs, prompt_len, gen_len: the batch; inference and training see
        ``prompt_len + gen_len`` tokens per sequence.
    :param n_minibatches: optimizer steps per train call.
    :param grad_ckpt: gradient checkpointing (activation memory of one layer input).
    """

    name: str
    role: str
    kind: str
    model: ModelShape
    deps: Tuple[str, ...] = ()
    n_seqs: int = 1
    prompt_len: int = 1
    gen_len: int = 0
    n_minibatches: int = 1
    grad_ckpt: bool = False
    trained_role: bool = False

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len


@dataclasses.dataclass(frozen=True, order=True)
class Layout:
    """3D layout (dp x tp x pp) and micro-batches of one call."""

    dp: int
    tp: int
    pp: int
    n_mbs: int = 1

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    def __str__(self) -> str:
        return f"d{self.dp}t{self.tp}p{self.pp}m{self.n_mbs}"


@dataclasses.dataclass(frozen=True, order=True)
class Mesh:
    """Devices ``start .. start+size-1`` of the cluster (aligned ranges only)."""

    start: int
    size: int

    @property
    def devices(self) -> range:
        return range(self.start, self.start + self.size)

    def spans_nodes(self, per_node: int) -> bool:
        return self.start // per_node != (self.start + self.size - 1) // per_node

    def overlaps(self, other: "Mesh") -> bool:
        return self.start < other.start + other.size and other.start < self.start + self.size

    def __str__(self) -> str:
        return f"[{self.start}:{self.start + self.size}]"


@dataclasses.dataclass(frozen=True, order=True)
class Assignment:
    """Where and how one call runs."""

    mesh: Mesh
    layout: Layout

    def __str__(self) -> str:
        return f"{self.mesh}{self.layout}"


def ppo_calls(actor: ModelShape, critic: Optional[ModelShape] = None, *, n_seqs: int, prompt_len: int,
              gen_len: int, n_minibatches: int = 4, grad_ckpt: bool = True,
              ref: Optional[ModelShape] = None, rew: Optional[ModelShape] = None) -> List[CallSpec]:
    """The six calls of one PPO step (graph of realhf/experiments/common/ppo_exp.py)."""
    critic = (critic or actor).critic()
    ref = ref or actor
    rew = (rew or critic).critic()
    common = dict(n_seqs=n_seqs, prompt_len=prompt_len, gen_len=gen_len)
    after_gen = ("actor_gen",)
    infs = ("actor_gen", "rew_inf", "ref_inf", "critic_inf")
    return [
        CallSpec("actor_gen", "actor", GENERATE, actor, (), trained_role=True, **common),
        CallSpec("rew_inf", "rew", INFERENCE, rew, after_gen, **common),
        CallSpec("ref_inf", "ref", INFERENCE, ref, after_gen, **common),
        CallSpec("critic_inf", "critic", INFERENCE, critic, after_gen, trained_role=True, **common),
        CallSpec("actor_train", "actor", TRAIN, actor, infs, n_minibatches=n_minibatches, grad_ckpt=grad_ckpt,
                 trained_role=True, **common),
        CallSpec("critic_train", "critic", TRAIN, critic, infs, n_minibatches=n_minibatches,
                 grad_ckpt=grad_ckpt, trained_role=True, **common),
    ]


def graph_order(calls: List[CallSpec]) -> Dict[str, int]:
    return {c.name: i for i, c in enumerate(calls)}


__all__ = ["GENERATE", "INFERENCE", "TRAIN", "ModelShape", "LLAMA", "CallSpec", "Layout", "Mesh", "Assignment",
           "ppo_calls"]
