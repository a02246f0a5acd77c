"""EngramRead: R_l(q, p) = LN(sum_o lambda_o W_V,o a_o) with masking (Eq. 15-16)."""
import math

import torch

from comeir_dist.engram.read import EngramRead


def _mod(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_q=12, d_m=16, n_orders=3, d_out=10)
    args.update(kw)
    return EngramRead(**args)


def test_shapes_and_gates():
    m = _mod()
    q, a = torch.randn(7, 12), torch.randn(7, 3, 16)
    out, g = m(q, a, torch.ones(7, 3, dtype=torch.bool), return_gates=True)
    assert out.shape == (7, 10) and g.shape == (7, 3)
    assert ((g > 0) & (g < 1)).all()
    # matches a direct implementation of Eq. 15/16
    qk = q @ m.w_q.weight.T
    ref_sum = 0
    for o in range(3):
        lam = torch.sigmoid((qk * (a[:, o] @ m.w_k[o])).sum(-1) / math.sqrt(m.d_k))
        assert torch.allclose(lam, g[:, o], atol=1e-6)
        ref_sum = ref_sum + lam[:, None] * (a[:, o] @ m.w_v[o])
    assert torch.allclose(out, m.ln(ref_sum), atol=1e-5)


def test_broadcast_query_over_candidates():
    m = _mod()
    q, a = torch.randn(2, 1, 12), torch.randn(2, 5, 3, 16)
    v = torch.ones(2, 5, 3, dtype=torch.bool)
    out = m(q, a, v)
    assert out.shape == (2, 5, 10)
    assert torch.allclose(out, m(q.expand(2, 5, 12), a, v), atol=1e-6)


def test_invalid_orders_do_not_affect_output_or_grads():
    m = _mod()
    q, a = torch.randn(4, 12), torch.randn(4, 3, 16)
    valid = torch.tensor([[True, True, False], [True, False, False], [False, True, True], [True, True, True]])
    a2 = a.clone()
    a2[~valid] = float("nan")
    a2.requires_grad_(True)
    out1, g1 = m(q, a, valid, return_gates=True)
    out2 = m(q, a2, valid)
    assert torch.allclose(out1, out2) and not torch.isnan(out2).any()
    assert (g1[~valid] == 0).all()
    out2.sum().backward()
    assert (a2.grad[~valid] == 0).all() and torch.isfinite(a2.grad).all()
    # equals a module restricted to the valid orders for row 1 (only order 0 valid)
    only = m(q[1:2], a[1:2, :1].expand(1, 3, 16) * torch.tensor([1.0, 0, 0])[None, :, None], valid[1:2])
    assert torch.allclose(out1[1:2], only, atol=1e-6)


def test_no_valid_order_gives_zero():
    m = _mod()
    with torch.no_grad():
        m.ln.bias.fill_(0.5)
    q, a = torch.randn(3, 12), torch.randn(3, 3, 16)
    valid = torch.tensor([[False] * 3, [True, False, False], [False] * 3])
    out = m(q, a, valid)
    assert (out[0] == 0).all() and (out[2] == 0).all() and (out[1] != 0).any()
    out.sum().backward()
    assert torch.isfinite(m.ln.weight.grad).all()


def test_default_valid_and_d_k():
    m = _mod(d_k=6)
    out = m(torch.randn(2, 12), torch.randn(2, 3, 16))
    assert out.shape == (2, 10) and m.w_k.shape == (3, 16, 6)
