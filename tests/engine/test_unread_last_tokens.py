"""A forward whose read rows exclude each sequence's last token runs without those tokens
(without_unread_last_tokens): the rows read, and every gradient, are those of the whole batch."""

import pytest
import torch

from realhf.impl.model.backend.inference import without_unread_last_tokens
from realhf.impl.model.utils.functional import cu_seqlens_from_lengths
from tests.model.test_fast_decode import LLAMA, _model


def _batch():
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, LLAMA.vocab_size, (5,), generator=g)
    seqs = [torch.cat([prompt, torch.randint(0, LLAMA.vocab_size, (n,), generator=g)]) for n in (3, 6, 1)]
    seqs.append(torch.randint(0, LLAMA.vocab_size, (4,), generator=g))  # no shared prefix
    lens = torch.tensor([len(s) for s in seqs])
    cu = cu_seqlens_from_lengths(lens, dtype=torch.int32)
    # Positions predicting each sequence's tokens after its 5th (or 2nd): never a last position.
    rows = torch.cat([torch.arange(int(cu[i]) + (4 if i < 3 else 1), int(cu[i + 1]) - 1) for i in range(4)])
    return torch.cat(seqs), cu, rows


def _read(model, ids, cu, rows):
    model.zero_grad(set_to_none=True)
    out = model(ids, cu, int((cu[1:] - cu[:-1]).max()), output_rows=rows)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dropping_unread_last_tokens_keeps_outputs_and_gradients():
    model = _model(LLAMA).train()
    ids, cu, rows = _batch()
    t_ids, t_cu, t_max, t_rows = without_unread_last_tokens(model, ids, cu, rows)
    assert t_ids.numel() == ids.numel() - 4 and t_max == int((cu[1:] - cu[:-1]).max()) - 1
    assert torch.equal(t_ids[t_rows], ids[rows])
    out, grads = _read(model, ids, cu, rows)
    t_out, t_grads = _read(model, t_ids, t_cu, t_rows)
    torch.testing.assert_close(t_out, out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == t_grads.keys()
    for k in grads:  # sums over other token counts: equal up to their rounding
        assert float((t_grads[k] - grads[k]).norm()) <= 1e-5 * float(grads[k].norm()), k


@pytest.mark.parametrize("case", ["reads_a_last_row", "one_token_sequence"])
def test_batches_that_need_their_last_tokens_stay_whole(case):
    model = _model(LLAMA)
    ids, cu, rows = _batch()
    if case == "reads_a_last_row":
        rows = torch.cat([rows, cu[2:3].long() - 1])
    else:
        ids, cu = torch.cat([ids, ids[:1]]), torch.cat([cu, cu[-1:] + 1])
    t_ids, t_cu, _, t_rows = without_unread_last_tokens(model, ids, cu, rows)
    assert t_ids is ids and t_cu is cu and t_rows is rows
