"""Parallel layers and vocab-parallel losses against single-process references."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.impl.model.parallelism.tensor_parallel import cross_entropy as CE
from realhf.impl.model.parallelism.tensor_parallel import layers as L
from realhf.impl.model.parallelism.tensor_parallel import mappings as M
from realhf.impl.model.utils.functional import gather_packed_shifted_log_probs

from ._tp_utils import MODEL, check, chunk, setup_tp_mesh

T, H, O, FF, V = 7, 8, 12, 16, 16  # T deliberately not divisible by tp


def _sp_input(x, tp, r):
    """This rank's token chunk of ``x`` padded to a multiple of tp, as a leaf."""
    xp, pad = M.pad_to_multiple(x.detach(), tp)
    return chunk(xp, 0, r, tp).clone().requires_grad_(), pad


def _column(tp, r):
    for gather_output in (False, True):
        for sp in (False, True):
            torch.manual_seed(10)
            ref = nn.Linear(H, O)
            x = torch.randn(T, H, requires_grad=True)
            c = torch.randn(T, O)
            (ref(x) * c).sum().backward()
            par = L.ColumnParallelLinear(H, O, gather_output=gather_output, sequence_parallel=sp)
            par.load_full(ref.weight, ref.bias)
            tag = f"column(gather={gather_output}, sp={sp})"
            if sp:
                xin, pad = _sp_input(x, tp, r)
                out = M.unpad(par(xin), pad)
            else:
                xin = x.detach().clone().requires_grad_()
                out = par(xin)
            full_out = ref(x).detach()
            c_loc = c if gather_output else chunk(c, -1, r, tp)
            check(tag + " fwd", out, full_out if gather_output else chunk(full_out, -1, r, tp))
            (out * c_loc).sum().backward()
            if sp:
                check(tag + " dx", xin.grad, chunk(M.pad_to_multiple(x.grad, tp)[0], 0, r, tp))
            else:
                check(tag + " dx", xin.grad, x.grad)
            check(tag + " dW", par.weight.grad, L.shard_weight(ref.weight.grad, 0, r, tp))
            check(tag + " db", par.bias.grad, L.shard_weight(ref.bias.grad, 0, r, tp))


def _row(tp, r):
    for input_is_parallel in (True, False):
        for sp in (False, True):
            torch.manual_seed(11)
            ref = nn.Linear(H, O)
            x = torch.randn(T, H, requires_grad=True)
            c = torch.randn(T, O)
            (ref(x) * c).sum().backward()
            par = L.RowParallelLinear(
                H, O, input_is_parallel=input_is_parallel, sequence_parallel=sp
            )
            par.load_full(ref.weight, ref.bias)
            tag = f"row(input_parallel={input_is_parallel}, sp={sp})"
            xfull, pad = M.pad_to_multiple(x.detach(), tp) if sp else (x.detach(), 0)
            xin = (chunk(xfull, -1, r, tp) if input_is_parallel else xfull).clone()
            xin.requires_grad_()
            out = par(xin)
            if sp:
                cp = M.pad_to_multiple(c, tp)[0]
                # Zero padding rows give just the bias, as in the reference.
                check(tag + " fwd", out, chunk(ref(xfull), 0, r, tp))
                (out * chunk(cp, 0, r, tp)).sum().backward()
                L.allreduce_sequence_parallel_grads(par)
                gx = M.pad_to_multiple(x.grad, tp)[0]
            else:
                check(tag + " fwd", out, ref(x))
                (out * c).sum().backward()
                gx = x.grad
            check(tag + " dx", xin.grad, chunk(gx, -1, r, tp) if input_is_parallel else gx)
            check(tag + " dW", par.weight.grad, L.shard_weight(ref.weight.grad, 1, r, tp))
            check(tag + " db", par.bias.grad, ref.bias.grad)


def _embedding(tp, r):
    for sp in (False, True):
        torch.manual_seed(12)
        ref = nn.Embedding(V, H)
        ids = torch.randint(0, V, (T,))
        c = torch.randn(T, H)
        (ref(ids) * c).sum().backward()
        par = L.VocabParallelEmbedding(V, H, sequence_parallel=sp)
        par.load_full(ref.weight)
        tag = f"embedding(sp={sp})"
        if sp:
            idp, pad = M.pad_to_multiple(ids, tp)
            out = par(idp)
            check(tag + " fwd", out, chunk(ref(idp), 0, r, tp))
            (out * chunk(M.pad_to_multiple(c, tp)[0], 0, r, tp)).sum().backward()
        else:
            out = par(ids)
            check(tag + " fwd", out, ref(ids))
            (out * c).sum().backward()
        check(tag + " dW", par.weight.grad, L.shard_weight(ref.weight.grad, 0, r, tp))


def _mlp(tp, r):
    """column -> gelu -> row, with SP on and off, against the reference."""
    torch.manual_seed(13)
    fc1, fc2 = nn.Linear(H, FF), nn.Linear(FF, H)
    x = torch.randn(T, H, requires_grad=True)
    c = torch.randn(T, H)
    ref_loss = (fc2(F.gelu(fc1(x))) * c).sum()
    ref_loss.backward()
    results = {}
    for sp in (False, True):
        col = L.ColumnParallelLinear(H, FF, sequence_parallel=sp)
        row = L.RowParallelLinear(FF, H, input_is_parallel=True, sequence_parallel=sp)
        col.load_full(fc1.weight, fc1.bias)
        row.load_full(fc2.weight, fc2.bias)
        xin = x.detach().clone().requires_grad_()
        if sp:
            xp, pad = M.pad_to_multiple(xin, tp)
            h = M.scatter_to_sequence_parallel_region(xp)
            out = row(F.gelu(col(h)))
            out = M.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
            out = M.unpad(out, pad)
        else:
            out = row(F.gelu(col(xin)))
        loss = (out * c).sum()
        loss.backward()
        L.allreduce_sequence_parallel_grads(row)
        tag = f"mlp(sp={sp})"
        check(tag + " loss", loss, ref_loss)
        check(tag + " dx", xin.grad, x.grad)
        check(tag + " dW1", col.weight.grad, L.shard_weight(fc1.weight.grad, 0, r, tp))
        check(tag + " db1", col.bias.grad, L.shard_weight(fc1.bias.grad, 0, r, tp))
        check(tag + " dW2", row.weight.grad, L.shard_weight(fc2.weight.grad, 1, r, tp))
        check(tag + " db2", row.bias.grad, fc2.bias.grad)
        results[sp] = (loss.detach(), xin.grad, row.weight.grad, col.weight.grad)
    for a, b in zip(results[False], results[True]):
        check("mlp sp on/off", a, b)


def _cross_entropy(tp, r):
    torch.manual_seed(14)
    n = 11
    logits = (3 * torch.randn(n, V)).requires_grad_()
    labels = torch.randint(0, V, (n,))
    w = torch.randn(n)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref * w).sum().backward()
    shard = chunk(logits.detach(), -1, r, tp).clone().requires_grad_()
    lp = CE.vocab_parallel_log_probs(shard, labels)
    check("log_probs fwd", lp, ref)
    (lp * w).sum().backward()
    check("log_probs grad", shard.grad, chunk(logits.grad, -1, r, tp))

    shard.grad = None
    nll = CE.vocab_parallel_cross_entropy(shard, labels)
    check("cross_entropy fwd", nll, F.cross_entropy(logits, labels, reduction="none"))
    nll.mean().backward()
    logits.grad = None
    F.cross_entropy(logits, labels).backward()
    check("cross_entropy grad", shard.grad, chunk(logits.grad, -1, r, tp))

    # Packed sequences, including an empty one and a length-1 one.
    cu = torch.tensor([0, 4, 4, 5, n])
    logits.grad = None
    ref = gather_packed_shifted_log_probs(logits, cu, labels)
    w = torch.randn(ref.shape[0])
    (ref * w).sum().backward()
    shard = chunk(logits.detach(), -1, r, tp).clone().requires_grad_()
    lp = CE.vocab_parallel_packed_shifted_log_probs(shard, cu, labels)
    check("packed fwd", lp, ref)
    (lp * w).sum().backward()
    check("packed grad", shard.grad, chunk(logits.grad, -1, r, tp))


def _worker(rank, world_size, tp, parts):
    setup_tp_mesh(world_size, tp)
    with constants.model_scope(MODEL):
        r = constants.tensor_parallel_rank()
        for part in parts:
            globals()[part](tp, r)
    return True


PARTS = ("_column", "_row", "_embedding", "_mlp", "_cross_entropy")


@pytest.mark.parametrize("world_size,tp", [(2, 2), (4, 2), (4, 4)])
def test_tensor_parallel_matches_reference(world_size, tp):
    assert all(run_distributed(_worker, world_size, timeout=90, args=(tp, PARTS)))


def test_single_process_layers_and_losses():
    # Outside any model scope and without torch.distributed: tp = 1.
    for part in PARTS:
        globals()[part](1, 0)


def test_kv_heads_partition():
    assert L.kv_heads_partition(8, 2) == (4, False)
    assert L.kv_heads_partition(8, 8) == (1, False)
    assert L.kv_heads_partition(2, 4) == (2, True)
    assert L.kv_heads_partition(1, 4) == (1, True)
    assert L.kv_heads_partition(3, 2) == (3, True)
    w = torch.arange(24.0).view(4 * 2, 3)  # 4 kv heads x head_dim 2
    assert torch.equal(L.shard_kv_weight(w, 4, 1, 2), w[4:])
    assert torch.equal(L.shard_kv_weight(w, 4, 1, 8), w)
    with pytest.raises(ValueError):
        L.kv_heads_partition(0, 2)


def test_shard_weight():
    w = torch.arange(12.0).view(3, 4)
    assert torch.equal(L.shard_weight(w, 1, 1, 2), w[:, 2:])
    with pytest.raises(ValueError):
        L.shard_weight(w, 0, 0, 2)
