"""FQT products against an independent oracle (tests/oracle.py) and the QAT / float modes.

The compiled model uses the eager inner compiler: the numerics are the same as with inductor
but the seeds are drawn by ``aten.randint`` from the global generator, so the oracle, drawing
its seeds in the same order after the same ``torch.manual_seed``, sees the same random draws.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fqt_compile
from fqt_compile import FQTConfig, GradSpec
from fqt_compile.functional import QSpec, fqt_conv, fqt_linear, fqt_matmul, fqt_sdpa

from oracle import FakeQuantQAT, PlainNet, RefNet

# Stochastic rounding is a step function of its input: float-rounding differences between two
# implementations (e.g. a different summation order upstream) can move an element across a
# rounding boundary with probability ~ ulp/scale per element. Allow that for a tiny fraction.
MISMATCH_FRACTION = 1e-3
ELEM_TOL = dict(rtol=1e-4, atol=1e-5)


def _grads(model, x, seed):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
    torch.manual_seed(seed)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close_mostly(a, b, what):
    close = torch.isclose(a, b, **ELEM_TOL)
    frac = 1.0 - close.float().mean().item()
    assert frac <= MISMATCH_FRACTION, f"{what}: {frac:.2%} of elements differ (max |diff| {(a - b).abs().max():.3g})"


@pytest.fixture(scope="module")
def digits_batch():
    torch.manual_seed(0)
    return torch.randn(16, 1, 8, 8)


@pytest.mark.parametrize(
    "gi, gw",
    [(("psq", 4), ("column", 8)), (("bhq", 4), ("column", 8)), (("ptq", 4), ("ptq", 8)),
     (("hadamard", 5), ("column", 8)), (("psq", 8), ("psq", 6))],
)
def test_compiled_matches_oracle_with_same_draws(gi, gw, digits_batch):
    torch.manual_seed(1)
    ref = RefNet(gi, gw)
    net = PlainNet()
    net.load_state_dict(ref.state_dict())
    cfg = FQTConfig(grad_input=GradSpec(*gi), grad_weight=GradSpec(*gw), compiler="eager")
    fqt_compile.compile(net, cfg)
    g_ref = _grads(ref, digits_batch, seed=7)
    g_fqt = _grads(net, digits_batch, seed=7)
    g_other = _grads(net, digits_batch, seed=8)
    for name in g_ref:
        _assert_close_mostly(g_fqt[name], g_ref[name], name)
    # and the draws matter: another seed gives another gradient
    assert any(not torch.allclose(g_other[n], g_ref[n]) for n in g_ref if "weight" in n)


def test_prepare_matches_oracle(digits_batch):
    torch.manual_seed(1)
    ref = RefNet(("bhq", 4), ("column", 8))
    net = PlainNet()
    net.load_state_dict(ref.state_dict())
    gm = fqt_compile.prepare(net, "bhq4")
    g_ref = _grads(ref, digits_batch, seed=3)
    g_fqt = _grads(gm, digits_batch, seed=3)
    for name in g_ref:
        _assert_close_mostly(g_fqt[name], g_ref[name], name)


def test_qat_mode_matches_hand_written_fake_quant(digits_batch):
    torch.manual_seed(2)
    net = PlainNet()
    ref = FakeQuantQAT(copy.deepcopy(net))
    fqt_compile.compile(net, FQTConfig.recipe("qat8", compiler="eager"))
    g_ref = {k.removeprefix("net."): v for k, v in _grads(ref, digits_batch, 0).items()}
    g = _grads(net, digits_batch, 0)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6)


def test_off_mode_matches_float_exactly(digits_batch):
    torch.manual_seed(3)
    net = PlainNet()
    plain = copy.deepcopy(net)
    fqt_compile.compile(net, FQTConfig.recipe("off", compiler="eager"))
    g_ref, g = _grads(plain, digits_batch, 0), _grads(net, digits_batch, 0)
    for name in g:
        assert torch.equal(g[name], g_ref[name]), name
    assert fqt_compile.records(net)[0].insert.quantized == []


def test_functional_forward_is_deterministic_and_quantized():
    torch.manual_seed(4)
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    y1, y2 = fqt_linear(x, w, spec=QSpec()), fqt_linear(x, w, spec=QSpec())
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, x @ w.t(), rtol=0, atol=1e-6)  # quantized, not float
    torch.testing.assert_close(y1, x @ w.t(), rtol=0.05, atol=0.05)


def test_matmul_broadcast_and_sdpa_shapes():
    torch.manual_seed(5)
    a = torch.randn(2, 3, 4, 8, requires_grad=True)
    b = torch.randn(8, 5, requires_grad=True)  # broadcast over batch dims
    fqt_matmul(a, b).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    out = fqt_sdpa(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.05)  # 8-bit operands
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_conv_grouped_strided_dilated_and_same_padding():
    torch.manual_seed(6)
    for dim in (1, 2, 3):
        conv = getattr(nn, f"Conv{dim}d")(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        x = torch.randn(2, 4, *([9] * dim), requires_grad=True)
        out = fqt_conv(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert out.shape == conv(x).shape
        out.sum().backward()
        assert x.grad.shape == x.shape
    w = torch.randn(4, 4, 3, 3)
    assert fqt_conv(torch.randn(1, 4, 5, 5), w, padding="same").shape == (1, 4, 5, 5)
    with pytest.raises(NotImplementedError, match="asymmetric"):
        fqt_conv(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 2, 2), padding="same")
