"""An independent reference for the paper's layer, for tests.

Written directly from DESIGN.md section 3 with the pure functions of ``fqt_compile.quantizers``
(no ``fqt::`` ops, no graph pass): explicit ``autograd.Function``s for linear and conv that
compute ``grad_input`` from ``Q_b1(G)`` and ``grad_weight`` from ``Q_b2(G)``. Seeds are drawn
with ``torch.randint`` in the same order as the library's backward (Q_b1, then Q_b2, per
layer), so after the same ``torch.manual_seed`` both use the same random draws.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fqt_compile import quantizers as Q
from fqt_compile.rng import new_seed


def fq(x, bits=8, scheme="affine_zero", gran="tensor", axis=0):
    return Q.fake_quantize_forward(x, bits, scheme, gran, axis)


def qg(g, kind, bits, row_dims=-1):
    if kind == "none":
        return g
    return Q.fake_quantize_grad(g, kind, bits, seed=new_seed(), row_dims=row_dims)


class RefLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, gi, gw):
        xq, wq = fq(x), fq(w)
        ctx.save_for_backward(xq, wq)
        ctx.q = (gi, gw)
        return F.linear(xq, wq, b)

    @staticmethod
    def backward(ctx, g):
        xq, wq = ctx.saved_tensors
        (gi_kind, gi_bits), (gw_kind, gw_bits) = ctx.q
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw_ = None
        if ctx.needs_input_grad[0]:
            gx = (qg(g2, gi_kind, gi_bits) @ wq).reshape(*g.shape[:-1], wq.shape[1])
        if ctx.needs_input_grad[1]:
            gw_ = qg(g2, gw_kind, gw_bits).t() @ xq.reshape(-1, xq.shape[-1])
        return gx, gw_, g2.sum(0), None, None


class RefConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, stride, padding, gi, gw):
        xq, wq = fq(x), fq(w)
        ctx.save_for_backward(xq, wq)
        ctx.conf = (stride, padding, gi, gw)
        return F.conv2d(xq, wq, None, stride, padding)

    @staticmethod
    def backward(ctx, g):
        xq, wq = ctx.saved_tensors
        stride, padding, (gi_kind, gi_bits), (gw_kind, gw_bits) = ctx.conf
        gx = gw_ = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(xq.shape, wq, qg(g, gi_kind, gi_bits, row_dims=1), stride, padding)
        if ctx.needs_input_grad[1]:
            gw_ = torch.nn.grad.conv2d_weight(xq, wq.shape, qg(g, gw_kind, gw_bits, row_dims=1), stride, padding)
        return gx, gw_, None, None, None, None


class RefNet(nn.Module):
    """conv -> relu -> conv(stride 2) -> relu -> pool -> linear -> relu -> linear, reference
    numerics. Parameters are shared (by ``load_state_dict``) with :class:`PlainNet`."""

    def __init__(self, gi=("psq", 4), gw=("column", 8)):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.f1 = nn.Linear(8 * 4 * 4, 32)
        self.f2 = nn.Linear(32, 10)
        self.q = (gi, gw)

    def forward(self, x):
        gi, gw = self.q
        x = F.relu(RefConv2d.apply(x, self.c1.weight, 1, 1, gi, gw))
        x = F.relu(RefConv2d.apply(x, self.c2.weight, 2, 1, gi, gw))
        x = x.flatten(1)
        x = F.relu(RefLinear.apply(x, self.f1.weight, self.f1.bias, gi, gw))
        return RefLinear.apply(x, self.f2.weight, self.f2.bias, gi, gw)


class PlainNet(RefNet):
    """The same network written with plain modules, for the compiler to quantize."""

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.f1(x.flatten(1)))
        return self.f2(x)


class FakeQuantQAT(nn.Module):
    """Hand-written QAT of :class:`PlainNet`: forward fake-quant with a straight-through
    gradient, exact gradients."""

    def __init__(self, net: PlainNet):
        super().__init__()
        self.net = net

    @staticmethod
    def ste(x):
        return x + (fq(x) - x).detach()

    def forward(self, x):
        n, s = self.net, self.ste
        x = F.relu(F.conv2d(s(x), s(n.c1.weight), None, 1, 1))
        x = F.relu(F.conv2d(s(x), s(n.c2.weight), None, 2, 1))
        x = F.relu(F.linear(s(x.flatten(1)), s(n.f1.weight), n.f1.bias))
        return F.linear(s(x), s(n.f2.weight), n.f2.bias)
