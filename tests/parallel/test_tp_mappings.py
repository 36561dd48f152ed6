"""Forward values and gradients of the tensor/sequence-parallel mappings."""

import pytest
import torch

from realhf.base import constants
from realhf.base.testing import run_distributed
from realhf.impl.model.parallelism.tensor_parallel import mappings as M

from ._tp_utils import MODEL, check, chunk, setup_tp_mesh

T, H = 8, 12


def _per_rank(seed, tp, *shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(tp)]


def _worker(rank, world_size, tp):
    setup_tp_mesh(world_size, tp)
    with constants.model_scope(MODEL):
        r = constants.tensor_parallel_rank()
        assert M.group_size() == tp and M.group_rank() == r

        # copy: identity forward, gradients summed over ranks.
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(0)).requires_grad_()
        ws = _per_rank(1, tp, T, H)
        y = M.copy_to_tp_region(x)
        check("copy fwd", y, x)
        (y * ws[r]).sum().backward()
        check("copy bwd", x.grad, sum(ws))

        # reduce: sum forward, identity backward.
        xs = _per_rank(2, tp, T, H)
        xr = xs[r].clone().requires_grad_()
        y = M.reduce_from_tp_region(xr)
        check("reduce fwd", y, sum(xs))
        (y * ws[0]).sum().backward()
        check("reduce bwd", xr.grad, ws[0])

        # scatter / gather along the hidden dimension.
        xf = x.detach().clone().requires_grad_()
        s = M.scatter_to_tp_region(xf)
        check("scatter fwd", s, chunk(xf, -1, r, tp))
        (s * chunk(ws[r], -1, r, tp)).sum().backward()
        expected = torch.cat([chunk(ws[k], -1, k, tp) for k in range(tp)], -1)
        check("scatter bwd", xf.grad, expected)

        xs_ = chunk(x.detach(), -1, r, tp).clone().requires_grad_()
        gth = M.gather_from_tp_region(xs_)
        check("gather fwd", gth, x)
        (gth * ws[0]).sum().backward()
        check("gather bwd", xs_.grad, chunk(ws[0], -1, r, tp))

        # Sequence parallel: token (first) dimension.
        xf = x.detach().clone().requires_grad_()
        s = M.scatter_to_sequence_parallel_region(xf)
        check("sp scatter fwd", s, chunk(xf, 0, r, tp))
        (s * chunk(ws[r], 0, r, tp)).sum().backward()
        expected = torch.cat([chunk(ws[k], 0, k, tp) for k in range(tp)], 0)
        check("sp scatter bwd", xf.grad, expected)

        xc = chunk(x.detach(), 0, r, tp).clone().requires_grad_()
        gth = M.gather_from_sequence_parallel_region(xc)
        check("sp gather fwd", gth, x)
        (gth * ws[r]).sum().backward()  # partial grads -> reduce-scatter
        check("sp gather bwd", xc.grad, chunk(sum(ws), 0, r, tp))

        xc2 = xc.detach().clone().requires_grad_()
        gth = M.gather_from_sequence_parallel_region(xc2, tensor_parallel_output_grad=False)
        (gth * ws[0]).sum().backward()  # replicated grads -> split
        check("sp gather bwd (split)", xc2.grad, chunk(ws[0], 0, r, tp))

        xr = xs[r].clone().requires_grad_()
        rs = M.reduce_scatter_to_sequence_parallel_region(xr)
        check("sp reduce-scatter fwd", rs, chunk(sum(xs), 0, r, tp))
        (rs * chunk(ws[r], 0, r, tp)).sum().backward()
        check("sp reduce-scatter bwd", xr.grad, expected)

        # Token counts that do not divide tp are padded.
        odd = torch.randn(T + 1, H)
        padded, pad = M.pad_to_multiple(odd, tp)
        assert padded.shape[0] % tp == 0 and pad == M.padded_length(T + 1, tp) - (T + 1)
        back = M.unpad(M.gather_from_sequence_parallel_region(
            M.scatter_to_sequence_parallel_region(padded)), pad)
        check("pad roundtrip", back, odd)
        if tp > 1:
            with pytest.raises(ValueError, match="pad"):
                M.scatter_to_sequence_parallel_region(odd)
    return True


@pytest.mark.parametrize("world_size,tp", [(2, 2), (4, 2), (4, 4)])
def test_mappings(world_size, tp):
    assert all(run_distributed(_worker, world_size, timeout=60, args=(tp,)))


def test_single_rank_is_identity():
    x = torch.randn(5, 4, requires_grad=True)
    for fn in (
        M.copy_to_tp_region,
        M.reduce_from_tp_region,
        M.scatter_to_tp_region,
        M.gather_from_tp_region,
        M.scatter_to_sequence_parallel_region,
        M.gather_from_sequence_parallel_region,
        M.reduce_scatter_to_sequence_parallel_region,
    ):
        y = fn(x)
        check(fn.__name__, y, x)
        (g,) = torch.autograd.grad(y.sum(), x)
        check(fn.__name__ + " grad", g, torch.ones_like(x))


def test_pad_helpers():
    x = torch.arange(10).view(5, 2)
    p, n = M.pad_to_multiple(x, 4, value=-1)
    assert p.shape == (8, 2) and n == 3 and (p[5:] == -1).all()
    assert torch.equal(M.unpad(p, n), x)
    p, n = M.pad_to_multiple(x, 3, dim=1)
    assert p.shape == (5, 3) and n == 1
    assert M.pad_to_multiple(x, 5)[1] == 0
