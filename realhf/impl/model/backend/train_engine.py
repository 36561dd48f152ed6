"""Data-parallel training engine over a ReaLModel's flat parameter buffer.

Because all parameters of a stage are views of one flat buffer, gradients are
kept in one flat buffer of the same layout as well. That makes the
data-parallel all-reduce a handful of large bucketed collectives, the global
grad norm a single reduction, and ZeRO-1 sharding a contiguous slice per rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import FinetuneSpec, MicroBatchSpec, Model, ModelBackend, register_backend
from realhf.impl.model.backend.inference import INPUT_KEY, PostHook, micro_batched_forward, packed_inputs
from realhf.impl.model.backend.optim import FlatAdamW, OptimizerConfig, make_lr_lambda
from realhf.impl.model.parallelism.micro_batch import split_packed_batch

LossFn = Callable[[torch.Tensor, SequenceSample], Tuple[torch.Tensor, Dict[str, Any]]]
WeightFn = Callable[[SequenceSample], float]


def token_weight(mb: SequenceSample) -> float:
    """Weight a micro-batch loss by its tokens (for per-token mean losses)."""
    key = INPUT_KEY if INPUT_KEY in mb.keys else mb._largest_key()
    return float(mb.total_tokens(key))


def item_weight(mb: SequenceSample) -> float:
    """Weight a micro-batch loss by its items (for per-sequence mean losses)."""
    return float(mb.bs)


def _resolve_dp_group(group: Any) -> Any:
    """Explicit group, else the current model's dp group, else the world (None if not distributed)."""
    if group is not None or not dist.is_initialized():
        return group
    try:
        from realhf.base import constants

        return constants.data_parallel_group()
    except Exception:
        return dist.group.WORLD


def _decay_mask(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """1 where weight decay applies (matrices), 0 for 1-D tensors (norms, biases)."""
    mask = torch.ones(model.flat_size, dtype=dtype, device=model.flat_param.device)
    for slot in model.param_spec.values():
        if len(slot.shape) <= 1:
            mask[slot.start:slot.end] = 0.0
    return mask


class TrainModule:
    """What the training backend puts in ``Model.module``.

    Holds the network, the flat grad buffer, the fp32 master weights (only
    when the model is not fp32) and the (possibly sharded) AdamW states.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: OptimizerConfig,
        total_steps: int,
        group: Any = None,
        use_zero_optimization: bool = False,
        gradient_clipping: float = 1.0,
        bucket_size: int = 4 * 1024 * 1024,
    ):
        if getattr(module, "flat_param", None) is None:
            raise TypeError("TrainModule needs an instantiated model with a flat parameter buffer.")
        self.module = module
        self.cfg = optimizer
        self.group = _resolve_dp_group(group)
        self.distributed = dist.is_initialized() and self.group is not None
        self.dp_size = dist.get_world_size(self.group) if self.distributed else 1
        self.dp_rank = dist.get_rank(self.group) if self.distributed else 0
        self.zero = use_zero_optimization and self.dp_size > 1
        self.gradient_clipping = gradient_clipping
        self.bucket_size = int(bucket_size)
        self.lr_lambda = make_lr_lambda(max(1, total_steps), optimizer)
        self.step_count = 0

        flat = module.flat_param
        self.numel = flat.numel()
        # Gradients of all parameters live in one buffer; param.grad are its views.
        self.flat_grad = torch.zeros_like(flat)
        self._params: List[Tuple[torch.nn.Parameter, torch.Tensor]] = []
        seen = set()
        for key, slot in module.param_spec.items():
            if slot in seen:
                continue
            seen.add(slot)
            p = module.get_param(key)
            view = self.flat_grad[slot.start:slot.end].view(slot.shape)
            p.requires_grad_(True)
            p.grad = view
            self._params.append((p, view))

        # The slice of the flat buffer this rank updates (everything without ZeRO).
        if self.zero:
            self.shard = -(-self.numel // self.dp_size)
            self.lo = min(self.numel, self.dp_rank * self.shard)
            self.hi = min(self.numel, self.lo + self.shard)
        else:
            self.shard, self.lo, self.hi = self.numel, 0, self.numel
        master = flat.detach()[self.lo:self.hi]
        self.master = master if flat.dtype == torch.float32 else master.float().clone()
        mask = _decay_mask(module, torch.float32)[self.lo:self.hi]
        self.optim = FlatAdamW(self.master, optimizer, decay_mask=mask)

    # ------------------------------------------------------------------ utils
    @property
    def lr(self) -> float:
        return self.cfg.lr * self.lr_lambda(self.step_count)

    def zero_grad(self) -> None:
        self.flat_grad.zero_()
        for p, view in self._params:
            p.grad = view

    def _collect_stray_grads(self) -> None:
        """Fold gradients autograd stored outside the flat buffer back into it."""
        for p, view in self._params:
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.add_(p.grad)
                p.grad = view

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, group=self.group)
        return t

    def _all_reduce_grads(self) -> None:
        """Average the flat grad over dp, bucket by bucket to bound message size."""
        if not self.distributed or self.dp_size == 1:
            return
        for s in range(0, self.numel, self.bucket_size):
            bucket = self.flat_grad[s:s + self.bucket_size]
            dist.all_reduce(bucket, group=self.group)
            bucket.div_(self.dp_size)

    def _all_gather_params(self) -> None:
        """Every rank updated its own shard; assemble the full buffer everywhere."""
        flat = self.module.flat_param
        local = torch.zeros(self.shard, dtype=flat.dtype, device=flat.device)
        local[: self.hi - self.lo] = self.master.to(flat.dtype)
        parts = [torch.empty_like(local) for _ in range(self.dp_size)]
        dist.all_gather(parts, local, group=self.group)
        with torch.no_grad():
            flat.copy_(torch.cat(parts)[: self.numel])

    # -------------------------------------------------------------- interface
    def forward(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec] = None,
                post_hook: Optional[PostHook] = None) -> Any:
        self.module.eval()
        return micro_batched_forward(self.module, sample, mb_spec or MicroBatchSpec(), post_hook)

    __call__ = forward

    @torch.no_grad()
    def eval_batch(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec], loss_fn: LossFn,
                   loss_weight_fn: WeightFn = token_weight) -> Dict[str, float]:
        """Weighted loss over the batch (averaged over dp) without touching weights."""
        self.module.eval()
        split = split_packed_batch(sample, mb_spec or MicroBatchSpec())
        tot = torch.zeros(2, dtype=torch.float64)
        for mb in split.micro_batches:
            ids, cu, max_seqlen = packed_inputs(mb)
            loss, _ = loss_fn(self.module(ids, cu, max_seqlen), mb)
            w = float(loss_weight_fn(mb))
            tot += torch.tensor([float(loss) * w, w], dtype=torch.float64)
        self._all_reduce(tot)
        return {"loss": float(tot[0] / tot[1])}

    def train_batch(
        self,
        sample: SequenceSample,
        mb_spec: Optional[MicroBatchSpec],
        loss_fn: LossFn,
        loss_weight_fn: WeightFn = token_weight,
    ) -> Dict[str, float]:
        """One optimizer step on ``sample`` (this rank's share of the global batch).

        ``loss_fn(logits, mb)`` returns a loss that is a mean over ``mb``;
        micro-batch losses are weighted by ``loss_weight_fn(mb)`` divided by the
        weight summed over all micro-batches of all dp ranks, so the step is
        the one a single process would take on the concatenated global batch.
        """
        self.module.train()
        split = split_packed_batch(sample, mb_spec or MicroBatchSpec())
        mbs = split.micro_batches
        weights = [float(loss_weight_fn(mb)) for mb in mbs]
        total_w = float(self._all_reduce(torch.tensor(sum(weights), dtype=torch.float64)))
        if total_w <= 0:
            raise ValueError(f"Micro-batch loss weights must sum to a positive value, got {total_w}.")

        self.zero_grad()
        loss_sum = 0.0
        extra: Dict[str, float] = {}
        for mb, w in zip(mbs, weights):
            ids, cu, max_seqlen = packed_inputs(mb)
            logits = self.module(ids, cu, max_seqlen)
            loss, stats = loss_fn(logits, mb)
            # Gradients are averaged over dp later, hence the dp_size factor.
            (loss * (w * self.dp_size / total_w)).backward()
            self._collect_stray_grads()
            loss_sum += float(loss.detach()) * w
            for k, v in (stats or {}).items():
                extra[k] = extra.get(k, 0.0) + float(v) * w
        self._all_reduce_grads()

        grad_norm = float(self.flat_grad.float().norm())
        if self.gradient_clipping and self.gradient_clipping > 0 and grad_norm > self.gradient_clipping:
            self.flat_grad.mul_(self.gradient_clipping / (grad_norm + 1e-6))

        lr = self.lr
        self.optim.step(self.flat_grad[self.lo:self.hi], lr)
        flat = self.module.flat_param
        if self.zero:
            self._all_gather_params()
        elif self.master.data_ptr() != flat.data_ptr():
            with torch.no_grad():
                flat.copy_(self.master)
        self.step_count += 1

        agg = torch.tensor([loss_sum] + list(extra.values()), dtype=torch.float64)
        self._all_reduce(agg)
        out = {"loss": float(agg[0]) / total_w, "grad_norm": grad_norm, "lr": lr}
        for i, k in enumerate(extra):
            out[k] = float(agg[i + 1]) / total_w
        return out

    # ---------------------------------------------------------------- states
    def state_dict(self) -> Dict[str, Any]:
        return {"optim": self.optim.state_dict(), "master": self.master, "step": self.step_count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optim.load_state_dict(state["optim"])
        with torch.no_grad():
            self.master.copy_(state["master"])
        self.step_count = int(state["step"])


@dataclasses.dataclass
class TrainEngine(ModelBackend):
    """Backend that makes a model trainable with AdamW over data parallelism.

    :param optimizer: optimizer and LR schedule settings.
    :param use_zero_optimization: shard Adam states and master weights over dp
        (ZeRO-1); each rank updates 1/dp of the buffer, then all-gathers.
    :param gradient_clipping: max global grad norm (<= 0 disables clipping).
    :param gradient_checkpointing: accepted for config compatibility; the
        model does not recompute activations yet, so it has no effect.
    :param bucket_size: elements per gradient all-reduce.
    :param group: dp process group; defaults to the current model's.
    """

    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(type="adam"))
    use_zero_optimization: bool = False
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = False
    bucket_size: int = 4 * 1024 * 1024
    group: Any = None

    def __post_init__(self):
        if isinstance(self.optimizer, dict):
            self.optimizer = OptimizerConfig(**self.optimizer)
        if self.bucket_size < 1:
            raise ValueError(f"TrainEngine.bucket_size must be >= 1, got {self.bucket_size}.")

    def _initialize(self, model: Model, spec: FinetuneSpec) -> Model:
        if model.module is None:
            raise ValueError(f"Model {model.name} has no module to train.")
        model.module = TrainModule(
            model.module,
            self.optimizer,
            total_steps=spec.total_train_steps,
            group=self.group,
            use_zero_optimization=self.use_zero_optimization,
            gradient_clipping=self.gradient_clipping,
            bucket_size=self.bucket_size,
        )
        return model

    def save(self, model: Model, save_dir: str) -> None:
        import os

        os.makedirs(save_dir, exist_ok=True)
        rank = model.module.dp_rank
        torch.save(model.module.state_dict(), os.path.join(save_dir, f"engine_state_dp{rank}.pt"))

    def load(self, model: Model, load_dir: str) -> None:
        import os

        rank = model.module.dp_rank
        model.module.load_state_dict(torch.load(os.path.join(load_dir, f"engine_state_dp{rank}.pt")))


register_backend("train", TrainEngine)
