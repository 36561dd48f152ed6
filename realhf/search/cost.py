"""Cost model of one model function call: time on a 3D layout and memory per device.

Units: seconds, bytes, FLOPs. Formulas (docstrings of each helper say why):

* forward FLOPs per token and block = 2 x matmul weights + 4 x context x hidden
  (scores and weighted values); training = 3x forward (+1x with gradient
  checkpointing, which recomputes the forward);
* tensor parallelism: 2 all-reduces of the block's activations per block and
  forward (4 with the backward), ring cost 2(n-1)/n x bytes / bw + 2(n-1) x lat;
* pipeline: ``(m + pp - 1)`` stage slots for ``m`` micro-batches (bubble
  fraction (pp-1)/(m+pp-1)); decoding needs ``max(m, pp)`` slots per token;
* data parallelism: one gradient all-reduce of the stage's weights per
  optimizer step, the optimizer updates 1/dp of them (16 bytes per weight,
  read and written) and all-gathers the result, plus a few small
  synchronizing all-reduces (loss weights, statistics);
* decoding is bounded by reading the stage's weights and KV cache from memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict

from realhf.search.hardware import DeviceProfile
from realhf.search.workload import GENERATE, INFERENCE, TRAIN, Assignment, CallSpec, Layout, ModelShape

ADAM_STATE_BYTES = 8  # two fp32 moments per weight
MASTER_BYTES_BF16 = 4  # fp32 master copy when weights are bf16
DP_SYNC_COLLECTIVES = 6  # small all-reduces per optimizer step (loss weights, stats, advantage norms)
ACT_BYTES_PER_TOKEN_HIDDEN = 34  # stored activations per token x hidden x block in bf16 (Korthikanti et al.)


def allreduce_time(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def layer_forward_flops(m: ModelShape, tokens: float, ctx: float) -> float:
    """FLOPs of one block's forward over ``tokens`` tokens attending to ``ctx`` positions on average."""
    return 2.0 * tokens * m.layer_matmul_params + 4.0 * tokens * ctx * m.hidden


def train_state_bytes(m: ModelShape, lay: Layout, param_bytes: int) -> float:
    """Weights, gradients, fp32 master copy (bf16 only) and Adam moments of one device's shard."""
    shard = m.n_params / (lay.tp * lay.pp)
    master = MASTER_BYTES_BF16 if param_bytes == 2 else 0
    return shard * (2 * param_bytes + master + ADAM_STATE_BYTES)


def weight_bytes(m: ModelShape, lay: Layout, param_bytes: int) -> float:
    return m.n_params / (lay.tp * lay.pp) * param_bytes


def kv_cache_bytes(call: CallSpec, lay: Layout, param_bytes: int) -> float:
    """Keys and values of every row of the device's data-parallel share, for the full sequence."""
    m = call.model
    rows = math.ceil(call.n_seqs / lay.dp)
    kv_heads = max(1, m.n_kv_heads // lay.tp)  # heads tp does not divide are replicated
    layers = math.ceil(m.n_layers / lay.pp)
    return 2.0 * layers * kv_heads * m.head_dim * rows * call.seq_len * param_bytes


def activation_bytes(call: CallSpec, lay: Layout, param_bytes: int) -> float:
    """Peak transient memory of the call beyond its weights/train state."""
    m = call.model
    layers = math.ceil(m.n_layers / lay.pp)
    scale = param_bytes / 2
    if call.kind == GENERATE:
        rows = math.ceil(call.n_seqs / lay.dp)
        return kv_cache_bytes(call, lay, param_bytes) + rows / lay.n_mbs * m.vocab / lay.tp * 4
    if call.kind == INFERENCE:
        t = call.n_seqs * call.seq_len / (lay.dp * lay.n_mbs)
        return t * m.hidden * param_bytes * 4 + t * m.head_params / m.hidden / lay.tp * 4
    t = call.n_seqs * call.seq_len / (lay.dp * call.n_minibatches * lay.n_mbs)
    in_flight = min(lay.n_mbs, lay.pp)
    per_layer_full = t * m.hidden * ACT_BYTES_PER_TOKEN_HIDDEN * scale / lay.tp
    if call.grad_ckpt:
        acts = in_flight * (layers * t * m.hidden * param_bytes) + per_layer_full
    else:
        acts = in_flight * layers * per_layer_full
    logits = 2 * t * m.head_params / m.hidden / lay.tp * 4
    return acts + logits


def call_memory(call: CallSpec, lay: Layout, param_bytes: int) -> Dict[str, float]:
    """Per-device bytes: ``state`` stays resident (train calls), ``transient`` lives during the call."""
    if call.kind == TRAIN:
        return {"state": train_state_bytes(call.model, lay, param_bytes),
                "transient": activation_bytes(call, lay, param_bytes)}
    return {"state": 0.0,
            "transient": weight_bytes(call.model, lay, param_bytes) + activation_bytes(call, lay, param_bytes)}


def _stage_forward(call: CallSpec, lay: Layout, prof: DeviceProfile, tokens_mb: float, ctx: float,
                   spans: bool, backward: float = 0.0) -> float:
    """One micro-batch through one pipeline stage; ``backward`` = extra forward-equivalents of work."""
    m = call.model
    layers = math.ceil(m.n_layers / lay.pp)
    work = 1.0 + backward
    flops = layers * layer_forward_flops(m, tokens_mb, ctx) + 2.0 * tokens_mb * m.head_params
    rate = prof.matmul_flops * (prof.train_efficiency if backward else 1.0)
    compute = work * flops / lay.tp / rate
    tp_bw, tp_lat = prof.link(lay.tp > prof.devices_per_node)
    comm = work * 2 * (layers + 1) * (
        allreduce_time(tokens_mb * m.hidden * prof.param_bytes, lay.tp, tp_bw, tp_lat)
        + (prof.collective_overhead_s if lay.tp > 1 else 0.0))
    return compute + comm + work * (layers + 2) * prof.op_overhead_s + prof.mb_overhead_s


def _p2p(call: CallSpec, lay: Layout, prof: DeviceProfile, tokens_mb: float, spans: bool) -> float:
    if lay.pp == 1:
        return 0.0
    bw, lat = prof.link(spans)
    return tokens_mb * call.model.hidden * prof.param_bytes / lay.tp / bw + lat + prof.collective_overhead_s \
        + prof.pp_slot_overhead_s


def forward_time(call: CallSpec, lay: Layout, prof: DeviceProfile, spans: bool, *, tokens: float, ctx: float,
                 backward: float = 0.0) -> float:
    """Pipelined pass of ``tokens`` (per data-parallel rank) in ``lay.n_mbs`` micro-batches."""
    t = tokens / lay.n_mbs
    slot = _stage_forward(call, lay, prof, t, ctx, spans, backward) + _p2p(call, lay, prof, t, spans) * (
        1 + (backward > 0))
    return slot * (lay.n_mbs + lay.pp - 1)


def decode_time(call: CallSpec, lay: Layout, prof: DeviceProfile, spans: bool) -> float:
    """``gen_len`` decoding steps; each reads the stage's weights and KV cache once per micro-batch."""
    m = call.model
    rows = math.ceil(call.n_seqs / lay.dp) / lay.n_mbs
    layers = math.ceil(m.n_layers / lay.pp)
    ctx = call.prompt_len + call.gen_len / 2
    w_bytes = (layers * m.layer_matmul_params + m.head_params) / lay.tp * prof.param_bytes
    kv_heads = max(1, m.n_kv_heads // lay.tp)
    kv_bytes = 2.0 * layers * kv_heads * m.head_dim * rows * ctx * prof.param_bytes
    flops = (layers * layer_forward_flops(m, rows, ctx) + 2.0 * rows * m.head_params) / lay.tp
    tp_bw, tp_lat = prof.link(lay.tp > prof.devices_per_node)
    comm = 2 * (layers + 1) * (allreduce_time(rows * m.hidden * prof.param_bytes, lay.tp, tp_bw, tp_lat)
                               + (prof.collective_overhead_s if lay.tp > 1 else 0.0))
    slot = max((w_bytes + kv_bytes) / prof.mem_bytes_per_s, flops / prof.matmul_flops) + comm \
        + (layers + 2) * prof.op_overhead_s + _p2p(call, lay, prof, rows, spans)
    return call.gen_len * max(lay.n_mbs, lay.pp) * slot + (lay.pp - 1) * slot


@dataclasses.dataclass(frozen=True)
class CallCost:
    seconds: float
    state_bytes: float
    transient_bytes: float
    oom: bool


def call_cost(call: CallSpec, a: Assignment, prof: DeviceProfile) -> CallCost:
    """Time and memory of ``call`` on assignment ``a`` (time excludes reallocation)."""
    lay = a.layout
    spans = a.mesh.spans_nodes(prof.devices_per_node)
    tokens = call.n_seqs * call.seq_len / lay.dp
    if call.kind == GENERATE:
        prefill = forward_time(call, lay, prof, spans, tokens=call.n_seqs * call.prompt_len / lay.dp,
                               ctx=call.prompt_len / 2)
        seconds = prefill + decode_time(call, lay, prof, spans)
    elif call.kind == INFERENCE:
        seconds = forward_time(call, lay, prof, spans, tokens=tokens, ctx=call.seq_len / 2)
    else:
        back = 2.0 + (1.0 if call.grad_ckpt else 0.0)
        per_mb = forward_time(call, lay, prof, spans, tokens=tokens / call.n_minibatches, ctx=call.seq_len / 2,
                              backward=back)
        dp_bw, dp_lat = prof.link(spans)
        shard = call.model.n_params / (lay.tp * lay.pp)
        # gradient all-reduce, then each dp rank updates 1/dp of the weights (ZeRO-1) and all-gathers them
        grad_sync = allreduce_time(shard * prof.param_bytes, lay.dp, dp_bw, dp_lat)
        gather = (lay.dp - 1) / lay.dp * shard * prof.param_bytes / dp_bw if lay.dp > 1 else 0.0
        sync = DP_SYNC_COLLECTIVES * (2 * dp_lat + prof.collective_overhead_s) if lay.dp > 1 else 0.0
        optim = 2 * shard / lay.dp * 16 / prof.mem_bytes_per_s  # read + write weights, grads, master, moments
        seconds = call.n_minibatches * (per_mb + grad_sync + gather + sync + optim)
    mem = call_memory(call, lay, prof.param_bytes)
    oom = mem["state"] + mem["transient"] > prof.usable_memory_fraction * prof.memory_bytes
    return CallCost(prof.compute_scale * seconds + prof.call_overhead_s, mem["state"], mem["transient"], oom)


def realloc_time(model: ModelShape, src: Assignment, dst: Assignment, prof: DeviceProfile) -> float:
    """Moving a trained model's weights from its train layout to another call's layout.

    Every destination device receives its shard (weights / (tp x pp)) at once;
    the link is across nodes when the two meshes together span nodes.
    """
    if src == dst:
        return 0.0
    lo = min(src.mesh.start, dst.mesh.start)
    hi = max(src.mesh.start + src.mesh.size, dst.mesh.start + dst.mesh.size) - 1
    spans = lo // prof.devices_per_node != hi // prof.devices_per_node
    bw, lat = prof.link(spans)
    shard = weight_bytes(model, dst.layout, prof.param_bytes)
    return shard / bw + lat * max(src.layout.pp, dst.layout.pp)


__all__ = ["CallCost", "call_cost", "realloc_time", "allreduce_time", "layer_forward_flops", "train_state_bytes",
           "kv_cache_bytes", "call_memory", "forward_time", "decode_time"]
