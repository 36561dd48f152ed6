"""Data-parallel training engine over a ReaLModel's flat parameter buffer.

Because all parameters of a stage are views of one flat buffer, gradients are
kept in one flat buffer of the same layout as well. That makes the
data-parallel all-reduce a handful of large bucketed collectives, the global
grad norm a single reduction, and ZeRO-1 sharding a contiguous slice per rank.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from realhf.api.core.data_api import SequenceSample
from realhf.api.core.model_api import FinetuneSpec, MicroBatchSpec, Model, ModelBackend, register_backend
from realhf.impl.model.backend.grad_sync import GradNormRanges, global_grad_norm, sync_tied_embedding_grads
from realhf.impl.model.backend.inference import (INPUT_KEY, EngineModule, packed_inputs, rows_applied,
                                                  without_unread_last_tokens)
from realhf.impl.model.backend.loss_scaler import DynamicLossScaler
from realhf.impl.model.backend.optim import FlatAdamW, OptimizerConfig, make_lr_lambda
from realhf.impl.model.comm import global_comm
from realhf.impl.model.nn import linear_replay
from realhf.impl.model.parallelism.micro_batch import MicroBatchSplit, split_packed_batch

LossFn = Callable[[torch.Tensor, SequenceSample], Tuple[torch.Tensor, Dict[str, Any]]]
WeightFn = Callable[[SequenceSample], float]


def token_weight(mb: SequenceSample) -> float:
    """Weight a micro-batch loss by its tokens (for per-token mean losses)."""
    key = INPUT_KEY if INPUT_KEY in mb.keys else mb._largest_key()
    return float(mb.total_tokens(key))


def item_weight(mb: SequenceSample) -> float:
    """Weight a micro-batch loss by its items (for per-sequence mean losses)."""
    return float(mb.bs)


def weighted_split(sample: SequenceSample, mb_spec: Optional[MicroBatchSpec], loss_weight_fn: WeightFn,
                   reduce_total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                   key: str = INPUT_KEY) -> Tuple[MicroBatchSplit, List[float], float]:
    """Micro-batches of ``sample``, their loss weights, and the total weight.

    ``reduce_total`` sums the local total across data-parallel ranks when the
    losses are normalized over the global batch.
    """
    split = split_packed_batch(sample, mb_spec or MicroBatchSpec(), key=key)
    weights = [float(loss_weight_fn(mb)) for mb in split.micro_batches]
    total_w = float(reduce_total(torch.tensor(sum(weights), dtype=torch.float64)))
    if total_w <= 0:
        raise ValueError(f"Micro-batch loss weights must sum to a positive value, got {total_w}.")
    return split, weights, total_w


def _decay_mask(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """1 where weight decay applies (matrices), 0 for 1-D tensors (norms, biases)."""
    mask = torch.ones(model.flat_size, dtype=dtype, device=model.flat_param.device)
    for slot in model.param_spec.values():
        if len(slot.shape) <= 1:
            mask[slot.start:slot.end] = 0.0
    return mask


class TrainModule(EngineModule):
    """What the training backend puts in ``Model.module``.

    Holds the network, the flat grad buffer, the fp32 master weights (only
    when the model is not fp32) and the (possibly sharded) AdamW states.
    Forward and generation come from :class:`EngineModule`.
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
        loss_scaler: Optional[DynamicLossScaler] = None,
    ):
        if getattr(module, "flat_param", None) is None:
            raise TypeError("TrainModule needs an instantiated model with a flat parameter buffer.")
        super().__init__(module, group)
        self.cfg = optimizer
        self.group = self.par.dp_group
        self.distributed = dist.is_initialized() and self.group is not None
        self.dp_size = self.par.dp_size
        self.dp_rank = self.par.dp_rank
        self.zero = use_zero_optimization and self.dp_size > 1
        self.gradient_clipping = gradient_clipping
        self.bucket_size = int(bucket_size)
        self.lr_lambda = make_lr_lambda(max(1, total_steps), optimizer)
        self.step_count = 0  # optimizer steps taken
        # The schedule's position: the model's global step (train calls done), set by the worker before each
        # call, so every optimizer step of a call (PPO/GRPO minibatches) takes that step's learning rate and the
        # schedule spans the whole run. None (no worker): one position per optimizer step.
        self.schedule_step: Optional[int] = None
        self._sharded_grads = False  # the last gradient sum reduced this rank's ZeRO shard only

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
        # ZeRO: rank i updates [shard_bounds[i], shard_bounds[i + 1]), the chunk its reduce-scatter sums.
        if self.zero:
            self.shard = -(-self.numel // self.dp_size)
            self.shard_bounds = [min(self.numel, i * self.shard) for i in range(self.dp_size + 1)]
            self.lo, self.hi = self.shard_bounds[self.dp_rank], self.shard_bounds[self.dp_rank + 1]
        else:
            self.shard, self.lo, self.hi = self.numel, 0, self.numel
            self.shard_bounds = [0, self.numel]
        master = flat.detach()[self.lo:self.hi]
        self.master = master if flat.dtype == torch.float32 else master.float().clone()
        mask = _decay_mask(module, torch.float32)[self.lo:self.hi]
        self.optim = FlatAdamW(self.master, optimizer, decay_mask=mask)
        self.norm_ranges = GradNormRanges(module, self.par)
        # Loss scaling only matters for fp16 parameters (and gradients).
        if flat.dtype == torch.float16:
            self.scaler: Optional[DynamicLossScaler] = loss_scaler or DynamicLossScaler()
        else:
            self.scaler = None

    # ------------------------------------------------------------------ utils
    @property
    def lr(self) -> float:
        return self.cfg.lr * self.lr_lambda(self.step_count if self.schedule_step is None else self.schedule_step)

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
            global_comm.all_reduce(t, self.group)
        return t

    def _all_reduce_grads(self) -> None:
        """Average the flat grad over dp, bucket by bucket to bound message size (or, between
        the workers of one host, in one sum over their local links)."""
        self._sharded_grads = False
        if not self.distributed or self.dp_size == 1:
            return
        if self.zero and self.scaler is None:
            # ZeRO updates this rank's shard only: a reduce-scatter (half an all-reduce) will do.
            if global_comm.reduce_scatter_over_links(self.flat_grad, self.shard_bounds, self.group):
                self.flat_grad[self.lo:self.hi].div_(self.dp_size)
                self._sharded_grads = True
                return
        if global_comm.link_ranks(self.flat_grad, self.group) is not None:
            global_comm.all_reduce(self.flat_grad, self.group)
            self.flat_grad.div_(self.dp_size)
            return
        for s in range(0, self.numel, self.bucket_size):
            bucket = self.flat_grad[s:s + self.bucket_size]
            dist.all_reduce(bucket, group=self.group)
            bucket.div_(self.dp_size)

    def _all_gather_params(self) -> None:
        """Every rank updated its own shard; assemble the full buffer everywhere."""
        flat = self.module.flat_param
        with torch.no_grad():
            own = flat[self.lo:self.hi]
            if self.numel == self.dp_size * self.shard and global_comm.link_ranks(flat, self.group) is not None:
                # Equal shards over the local links: gather straight into the buffer.
                if own.data_ptr() != self.master.data_ptr():
                    own.copy_(self.master)
                global_comm.all_gather(list(flat.chunk(self.dp_size)), own, self.group)
                return
            local = torch.zeros(self.shard, dtype=flat.dtype, device=flat.device)
            local[: self.hi - self.lo] = self.master.to(flat.dtype)
            gathered = torch.empty(self.dp_size * self.shard, dtype=flat.dtype, device=flat.device)
            global_comm.all_gather(list(gathered.chunk(self.dp_size)), local, self.group)
            flat.copy_(gathered[: self.numel])

    # -------------------------------------------------------------- interface
    def _weighted_split(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec],
                        loss_weight_fn: WeightFn) -> Tuple[MicroBatchSplit, List[float], float]:
        """Micro-batches, their loss weights, and the weight summed over dp."""
        return weighted_split(sample, mb_spec, loss_weight_fn, self._all_reduce)

    def _finish_stats(self, sums: Dict[str, float], total_w: float) -> Dict[str, float]:
        """Weighted sums of this rank -> weighted means over the global batch."""
        keys = list(sums)
        agg = self._all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        return {k: float(agg[i]) / total_w for i, k in enumerate(keys)}

    @torch.no_grad()
    def eval_batch(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec], loss_fn: LossFn,
                   loss_weight_fn: WeightFn = token_weight) -> Dict[str, float]:
        """Weighted loss over the global batch (every rank gets it) without touching weights."""
        self.module.eval()
        split, weights, total_w = self._weighted_split(sample, mb_spec, loss_weight_fn)
        if self.runner is not None:
            losses = self.runner.forward(sample, mb_spec, post_hook=lambda out, mb: loss_fn(out, mb)[0],
                                         split=split, assemble=False)
            local = torch.zeros(1, dtype=torch.float64)
            if self.is_last_stage:
                local[0] = sum(float(l) * w for l, w in zip(losses, weights))
            self.par.broadcast_from_last_stage(local)
            return self._finish_stats({"loss": float(local[0])}, total_w)
        loss_sum = 0.0
        for mb, w in zip(split.micro_batches, weights):
            ids, cu, max_seqlen = packed_inputs(mb)
            loss, _ = loss_fn(self.module(ids, cu, max_seqlen), mb)
            loss_sum += float(loss) * w
        return self._finish_stats({"loss": loss_sum}, total_w)

    def _forward_backward(self, sample: SequenceSample, mb_spec: Optional[MicroBatchSpec], split: MicroBatchSplit,
                          weights: List[float], total_w: float, loss_fn: LossFn) -> Dict[str, float]:
        """Accumulate gradients of the weighted losses; weighted stat sums of this rank."""
        # Gradients are averaged over dp afterwards, hence the dp_size factor.
        scale = self.dp_size / total_w
        if self.scaler is not None:
            scale *= self.scaler.scale
        rows_fn = getattr(loss_fn, "output_rows", None)
        if self.runner is not None:
            return self.runner.run_train_schedule(sample, split, rows_applied(loss_fn), weights, scale)
        sums: Dict[str, float] = {"loss": 0.0}
        for mb, w in zip(split.micro_batches, weights):
            ids, cu, max_seqlen = packed_inputs(mb)
            if rows_fn is None:
                out = self.module(ids, cu, max_seqlen)
            else:
                ids, cu, max_seqlen, rows = without_unread_last_tokens(self.module, ids, cu, rows_fn(mb))
                out = self.module(ids, cu, max_seqlen, output_rows=rows)
            loss, stats = loss_fn(out, mb)
            (loss * (w * scale)).backward()
            self._collect_stray_grads()
            sums["loss"] += float(loss.detach()) * w
            for k, v in (stats or {}).items():
                sums[k] = sums.get(k, 0.0) + float(v) * w
        return sums

    def _reduce_grads(self) -> None:
        """Complete this rank's flat gradient: SP partial sums, tied copies, dp average."""
        self._collect_stray_grads()
        reduce_sp = getattr(self.module, "reduce_sequence_parallel_grads", None)
        if callable(reduce_sp):
            reduce_sp()
        sync_tied_embedding_grads(self.module, self.par)
        self._all_reduce_grads()

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
        Every rank (all stages) returns the same stats.
        """
        self.module.train()
        split, weights, total_w = self._weighted_split(sample, mb_spec, loss_weight_fn)
        self.zero_grad()
        sums = self._forward_backward(sample, mb_spec, split, weights, total_w, loss_fn)
        self._reduce_grads()

        grads = self.flat_grad
        lr = self.lr
        if self.scaler is not None:
            grads = self.flat_grad.float().div_(self.scaler.scale)
            if self._found_inf(grads):
                # Overflow: no update, no LR step; retry later with a smaller scale.
                out = self._finish_stats(sums, total_w)
                out.update(grad_norm=float("nan"), lr=lr, loss_scale=self.scaler.scale, skipped_step=1.0)
                self.scaler.update(True)
                return out
        shard = (self.lo, self.hi, self.group) if self._sharded_grads else None
        grad_norm = global_grad_norm(grads, self.norm_ranges, self.par, shard)
        if self.gradient_clipping and self.gradient_clipping > 0 and grad_norm > self.gradient_clipping:
            (grads[self.lo:self.hi] if shard else grads).mul_(self.gradient_clipping / (grad_norm + 1e-6))

        self.optim.step(grads[self.lo:self.hi], lr)
        linear_replay.weights_updated(self.module)
        flat = self.module.flat_param
        if self.zero:
            self._all_gather_params()
        elif self.master.data_ptr() != flat.data_ptr():
            with torch.no_grad():
                flat.copy_(self.master)
        self.step_count += 1

        out = self._finish_stats(sums, total_w)
        out.update(grad_norm=grad_norm, lr=lr)
        if self.scaler is not None:
            out.update(loss_scale=self.scaler.scale, skipped_step=0.0)
            self.scaler.update(False)
        return out

    def _found_inf(self, grads: torch.Tensor) -> bool:
        """Whether any rank of the model holds a non-finite gradient."""
        flag = torch.tensor([0.0 if bool(torch.isfinite(grads).all()) else 1.0], device=grads.device)
        for group in (self.par.tp_group, self.par.pp_group, self.group):
            self.par.all_reduce(flag, group, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # ---------------------------------------------------------------- states
    def state_dict(self) -> Dict[str, Any]:
        state = {"optim": self.optim.state_dict(), "master": self.master, "step": self.step_count}
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optim.load_state_dict(state["optim"])
        with torch.no_grad():
            self.master.copy_(state["master"])
        self.step_count = int(state["step"])
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


def _state_file(module: TrainModule) -> str:
    """One file per stage, tp shard and (with ZeRO) dp shard; plain dp replicas share dp0's."""
    par = module.par
    dp = module.dp_rank if module.zero else 0
    return f"engine_state_pp{par.stage_id}_tp{par.tp_rank}_dp{dp}.pt"


def _layout_meta(module: TrainModule) -> Dict[str, Any]:
    par = module.par
    return {"pp": par.pp_size, "tp": par.tp_size, "dp": module.dp_size if module.zero else 1,
            "zero": module.zero, "numel": module.numel}


@dataclasses.dataclass
class TrainEngine(ModelBackend):
    """Backend that makes a model trainable with AdamW over 3D parallelism.

    :param optimizer: optimizer and LR schedule settings.
    :param use_zero_optimization: shard Adam states and master weights over dp
        (ZeRO-1); each rank updates 1/dp of the buffer, then all-gathers.
    :param gradient_clipping: max global grad norm (<= 0 disables clipping).
    :param gradient_checkpointing: recompute block activations in backward
        (also switched on by the mesh topology's option).
    :param bucket_size: elements per gradient all-reduce.
    :param initial_loss_scale: starting loss scale for fp16 parameters
        (dynamic: halves on overflow, doubles after ``loss_scale_window``
        clean steps, never below ``min_loss_scale``); unused otherwise.
    :param group: dp process group; defaults to the current model's.
    """

    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(type="adam"))
    use_zero_optimization: bool = False
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = False
    bucket_size: int = 4 * 1024 * 1024
    initial_loss_scale: float = 4096.0
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    group: Any = None

    def __post_init__(self):
        if isinstance(self.optimizer, dict):
            self.optimizer = OptimizerConfig(**self.optimizer)
        if self.bucket_size < 1:
            raise ValueError(f"TrainEngine.bucket_size must be >= 1, got {self.bucket_size}.")
        if self.initial_loss_scale <= 0:
            raise ValueError(f"TrainEngine.initial_loss_scale must be positive, got {self.initial_loss_scale}.")
        if self.loss_scale_window < 1:
            raise ValueError(f"TrainEngine.loss_scale_window must be >= 1, got {self.loss_scale_window}.")

    def _initialize(self, model: Model, spec: FinetuneSpec) -> Model:
        if model.module is None:
            raise ValueError(f"Model {model.name} has no module to train.")
        if self.gradient_checkpointing and hasattr(model.module, "gradient_checkpointing"):
            model.module.gradient_checkpointing = True
        scaler = DynamicLossScaler(scale=self.initial_loss_scale, growth_interval=self.loss_scale_window,
                                   min_scale=self.min_loss_scale)
        model.module = TrainModule(
            model.module,
            self.optimizer,
            total_steps=spec.total_train_steps,
            group=self.group,
            use_zero_optimization=self.use_zero_optimization,
            gradient_clipping=self.gradient_clipping,
            bucket_size=self.bucket_size,
            loss_scaler=scaler,
        )
        return model

    def save(self, model: Model, save_dir: str) -> None:
        """Write this rank's optimizer state atomically (tmp file, then rename)."""
        module: TrainModule = model.module
        if not module.zero and module.dp_rank != 0:
            return
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, _state_file(module))
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save({"layout": _layout_meta(module), **module.state_dict()}, tmp)
        os.replace(tmp, path)

    def load(self, model: Model, load_dir: str) -> None:
        module: TrainModule = model.module
        path = os.path.join(load_dir, _state_file(module))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No optimizer state {path}; was it saved with the same parallel layout?")
        state = torch.load(path, map_location=module.flat_grad.device)
        saved, now = state.pop("layout", None), _layout_meta(module)
        if saved is not None and saved != now:
            raise ValueError(f"Optimizer state in {load_dir} was saved with layout {saved}, this engine has {now}.")
        module.load_state_dict(state)


register_backend("train", TrainEngine)
