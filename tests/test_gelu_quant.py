"""fqt_compile/gelu_quant.py: the fused GELU backward + stochastic quantizers kernel.

What is exact and what is not (the module docstring's claims):
* given the kernel's own gradient ds, the codes, scales and offsets equal ``stochastic_quantize``
  bit for bit (same formulas, same counter-based draws);
* ds equals torch's ``gelu_backward`` to float rounding (our erf/exp: gelu' within 2.1e-7
  absolute), the bias gradient equals ``ds.sum(0)`` to float rounding (another summation order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqt_compile import gelu_quant as GQ
from fqt_compile import quantizers as Q
from fqt_compile import sr_fused as SF

needs_kernel = pytest.mark.skipif(not GQ.available(), reason=f"fused GELU kernel {GQ.status()}")

OP = torch.ops.fqt.gelu_backward_sr_quantize
QUANTIZER_SETS = [([8, 8], "row,column"), ([4], "tensor"), ([8, 5, 4, 2], "column,row,tensor,row")]


def _inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    bias = torch.randn(shape[-1], generator=gen) * 0.5
    g = torch.randn(shape, generator=gen) * 1e-3
    return g, x, bias


def _seeds(n):
    return [torch.tensor(s, dtype=torch.int64) for s in (123456789012345, 42, 2**40 + 7, 99)[:n]]


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 3, 37), (64, 64), (6, 1)])
@pytest.mark.parametrize("bits,grans", QUANTIZER_SETS)
def test_rounds_its_gradient_exactly_like_stochastic_quantize(shape, bits, grans):
    g, x, bias = _inputs(shape)
    seeds = _seeds(len(bits))
    out = OP(g, x, bias, seeds, bits, grans, [], [])
    ds = out[0]
    n, d = g.numel() // shape[-1], shape[-1]
    assert ds.shape == (n, d) and out[1].shape == (d,) and len(out) == 2 + 3 * len(bits)
    for k, (b, gran) in enumerate(zip(bits, grans.split(","))):
        ref = Q.stochastic_quantize(ds, b, gran, seeds[k])
        codes, scale, offset = out[2 + 3 * k: 5 + 3 * k]
        assert torch.equal(codes, ref.codes), (k, gran)
        assert torch.equal(scale, ref.scale.expand_as(scale)) and torch.equal(offset, ref.offset.expand_as(offset))
        assert scale.shape == {"tensor": (), "row": (n, 1), "column": (1, d)}[gran]


def test_derivative_polynomial_is_within_its_stated_error():
    """The docstring's claim, checked in float32 arithmetic (numpy) on the module's own
    coefficients: |gelu'(h) - exact| <= 2.5e-7 for h in [-12, 12] (measured 2.1e-7; torch's
    float32 gelu_backward is 2.8e-7 off the same float64 reference)."""
    h = np.linspace(-12, 12, 400001, dtype=np.float32)
    t = np.float32(1) / (np.float32(1) + np.float32(0.5) * (np.abs(h) * np.float32(0.70710678118654752)))
    F = np.full_like(h, np.float32(GQ._ERFCX_COEFFS[-1]))
    for c in reversed(GQ._ERFCX_COEFFS[:-1]):
        F = (F * t + np.float32(c)).astype(np.float32)
    e = np.exp(h * h * np.float32(-0.5)).astype(np.float32)
    half = (np.float32(0.5) * e * F).astype(np.float32)
    d = np.where(h < 0, half, np.float32(1) - half) + h * (np.float32(0.3989422804014327) * e)
    h64 = torch.from_numpy(h).double()
    exact = torch.ops.aten.gelu_backward(torch.ones_like(h64), h64).numpy()
    assert np.abs(d - exact).max() <= 2.5e-7


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradient_and_bias_gradient_equal_torch_to_float_rounding(with_bias):
    """ds: gelu' within 2.1e-7 absolute (|gelu'| <= 1.13) times g, so 5e-7 of max |g| bounds it
    (measured 1.2e-9 absolute for |g| ~ 1e-3 on (4096, 4096)). dbias: D-long column sums in
    another order: 1e-5 relative to the largest |column sum| plus the ds error times rows."""
    g, x, bias = _inputs((3, 50, 40))
    b = bias if with_bias else None
    out = OP(g, x, b, _seeds(1), [8], "row", [], [])
    ref = torch.ops.aten.gelu_backward(g, x + bias if with_bias else x).reshape(-1, 40)
    torch.testing.assert_close(out[0], ref, rtol=0, atol=5e-7 * g.abs().max().item())
    torch.testing.assert_close(out[1], ref.sum(0), rtol=1e-5, atol=150 * 5e-7 * g.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("two_d", [True, False])
def test_from_int32_product_equals_float_input(two_d):
    """g as fc2's int32 product + epilogue (the fused graph's form): same ds as the float g to
    float rounding (the epilogue is evaluated with fused multiply-adds), codes the reference's on
    the kernel's own ds."""
    gen = torch.Generator().manual_seed(3)
    b, m, n = (1, 48, 40) if two_d else (2, 24, 40)
    acc = torch.randint(-2**20, 2**20, (b, m, n), generator=gen, dtype=torch.int32)
    rows = [torch.rand(b, m, 1, generator=gen) * 1e-9, torch.rand(b, m, 1, generator=gen) * 1e-4]
    cols = [torch.rand((), generator=gen), torch.randn(1, 1, n, generator=gen) * 1e-4]
    if two_d:
        acc, rows, cols = acc[0], [r[0] for r in rows], [c if c.dim() == 0 else c[0] for c in cols]
    _, x, bias = _inputs((48, 40))
    seeds = _seeds(2)
    g = SF.epilogue_reference(acc, rows, cols).reshape(48, 40)
    out = OP(acc, x, bias, seeds, [8, 8], "row,column", rows, cols)
    ref = OP(g, x, bias, seeds, [8, 8], "row,column", [], [])
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5 * ref[0].abs().max().item())
    for k, gran in enumerate(["row", "column"]):
        assert torch.equal(out[2 + 3 * k], Q.stochastic_quantize(out[0], 8, gran, seeds[k]).codes)


@needs_kernel
@pytest.mark.parametrize("where", ["g", "x"])
def test_non_finite_input_raises(where):
    g, x, bias = _inputs((2, 8, 8))
    (g if where == "g" else x)[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        OP(g, x, bias, _seeds(2), [8, 8], "row,column", [], [])


def test_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(GQ, "_load", lambda: (None, "off (test)"))
    g, x, bias = _inputs((2, 4, 9))
    seeds = _seeds(2)
    out = OP(g, x, bias, seeds, [8, 6], "row,column", [], [])
    ds = torch.ops.aten.gelu_backward(g, x + bias).reshape(-1, 9)
    assert torch.equal(out[0], ds) and torch.equal(out[1], ds.sum(0))
    for k, (b, gran) in enumerate([(8, "row"), (6, "column")]):
        assert torch.equal(out[2 + 3 * k], Q.stochastic_quantize(ds, b, gran, seeds[k]).codes)


def test_rejects_bad_arguments():
    g, x, bias = _inputs((2, 4, 4))
    with pytest.raises(RuntimeError, match="granularity"):
        OP(g, x, bias, _seeds(1), [8], "channel", [], [])
    with pytest.raises(RuntimeError, match="one bits/granularity/seed each"):
        OP(g, x, bias, _seeds(2), [8], "row", [], [])
    with pytest.raises(RuntimeError, match="shapes differ"):
        OP(g[..., :2], x, bias, _seeds(1), [8], "row", [], [])
    OP(g.reshape(-1, 4), x, bias, _seeds(1), [8], "row", [], [])  # x's elements, any leading shape
    with pytest.raises(RuntimeError, match="bias must be float32 of shape"):
        OP(g, x, bias[:2], _seeds(1), [8], "row", [], [])
    with pytest.raises(RuntimeError, match="needs 1 to 4 epilogue terms"):
        OP(g.int(), x, bias, _seeds(1), [8], "row", [], [])


def test_op_passes_opcheck():
    """Schema, fake (meta) implementation and dispatch are consistent (torch.library.opcheck)."""
    g, x, bias = _inputs((2, 4, 19))
    torch.library.opcheck(OP.default, (g, x, bias, _seeds(2), [8, 8], "row,column", [], []))
    torch.library.opcheck(OP.default, (g, x, None, _seeds(1), [4], "tensor", [], []))


# --- forward: fqt::gelu_quantize -----------------------------------------------------------------

FWD = torch.ops.fqt.gelu_quantize


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 3, 37), (64, 64), (6, 1)])
@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("bits", [8, 4])
def test_forward_codes_equal_quantize_forward_of_gelu(shape, scheme, bits):
    """The codes are quantize_forward's of the kernel's GELU output; that output is torch's GELU
    to float rounding (|error| <= 2.5e-7 |h|, the cdf bound above), so a code can differ only
    where y / scale lies within that error of a rounding boundary: at most one level, rarely."""
    _, x, bias = _inputs(shape)
    codes, scale, offset = FWD(x, bias, bits, scheme)
    ref = Q.quantize_forward(torch.nn.functional.gelu(x + bias), bits, scheme, "tensor")
    torch.testing.assert_close(scale, ref.scale.reshape(()), rtol=1e-5, atol=0)
    torch.testing.assert_close(offset, ref.offset.reshape(()), rtol=1e-5, atol=1e-6)
    diff = (codes.int() - ref.codes.int()).abs()
    assert codes.shape == x.shape and diff.max() <= 1 and diff.float().mean() < 1e-2


@needs_kernel
def test_forward_non_finite_input_raises():
    _, x, bias = _inputs((4, 8))
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        FWD(x, bias, 8, "affine_zero")


def test_forward_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(GQ, "_load", lambda: (None, "off (test)"))
    _, x, bias = _inputs((5, 9))
    codes, scale, offset = FWD(x, None, 8, "symmetric")
    ref = Q.quantize_forward(torch.nn.functional.gelu(x), 8, "symmetric", "tensor")
    assert torch.equal(codes, ref.codes) and torch.equal(scale, ref.scale.reshape(()))


def test_forward_rejects_bad_arguments_and_passes_opcheck():
    _, x, bias = _inputs((3, 10))
    with pytest.raises(ValueError, match="bits"):
        FWD(x, bias, 1, "affine_zero")
    with pytest.raises(RuntimeError, match="scheme"):
        FWD(x, bias, 8, "log")
    with pytest.raises(RuntimeError, match="bias must be float32 of shape"):
        FWD(x, bias[:3], 8, "affine_zero")
    torch.library.opcheck(FWD.default, (x, bias, 8, "affine_zero"))


# --- fqt::sr_quantize_multi: the same kernel with gelu' taken as 1 ---------------------------------

MULTI = torch.ops.fqt.sr_quantize_multi


@needs_kernel
@pytest.mark.parametrize("shape", [(96, 37), (64, 64), (6, 1), (1, 300)])
@pytest.mark.parametrize("bits,grans", QUANTIZER_SETS + [([2, 8], "row,column")])
def test_multi_rounds_exactly_like_sr_quantize(shape, bits, grans):
    """Each quantizer's codes, scale and offset equal ``fqt::sr_quantize``'s on the same tensor and
    seed bit for bit (the row ranges come from pass 1, the others from pass 2: both paths). The
    column sums equal ``g.sum(0)`` to float rounding: N-long sums in another order, each rounding
    at most 2^-24 of the running sum, bounded by N * 2^-24 * sum|g| per column; the check allows
    1e-6 relative plus that bound."""
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    g = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 1e-2
    seeds = _seeds(len(bits))
    out = MULTI(g, seeds, bits, grans)
    assert len(out) == 1 + 3 * len(bits)
    bound = shape[0] * 2**-24 * g.abs().sum(0)
    assert out[0].shape == (shape[1],) and bool(((out[0] - g.sum(0)).abs() <= bound + 1e-6 * g.sum(0).abs()).all())
    for k, (b, gran) in enumerate(zip(bits, grans.split(","))):
        ref = torch.ops.fqt.sr_quantize(g, seeds[k], b, gran)
        for got, want in zip(out[1 + 3 * k: 4 + 3 * k], ref):
            assert got.shape == want.shape and torch.equal(got, want), (k, gran)


@needs_kernel
def test_multi_non_finite_input_raises():
    g = torch.randn(8, 16)
    g[3, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        MULTI(g, _seeds(2), [8, 8], "row,column")


def test_multi_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(GQ, "_load", lambda: (None, "off (test)"))
    g = torch.randn(10, 9)
    seeds = _seeds(2)
    out = MULTI(g, seeds, [8, 6], "row,column")
    assert torch.equal(out[0], g.sum(0))
    for k, (b, gran) in enumerate([(8, "row"), (6, "column")]):
        assert all(torch.equal(a, r) for a, r in zip(out[1 + 3 * k: 4 + 3 * k], torch.ops.fqt.sr_quantize(g, seeds[k], b, gran)))


def test_multi_rejects_bad_arguments_and_passes_opcheck():
    g = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="2-D float32"):
        MULTI(g.reshape(2, 2, 6), _seeds(1), [8], "row")
    with pytest.raises(RuntimeError, match="2-D float32"):
        MULTI(g.double(), _seeds(1), [8], "row")
    with pytest.raises(RuntimeError, match="granularity"):
        MULTI(g, _seeds(1), [8], "channel")
    with pytest.raises(RuntimeError, match="one bits/granularity/seed each"):
        MULTI(g, _seeds(2), [8], "row")
    with pytest.raises(ValueError, match="bits"):
        MULTI(g, _seeds(1), [9], "row")
    torch.library.opcheck(MULTI.default, (torch.randn(5, 19), _seeds(2), [8, 8], "row,column"))
    torch.library.opcheck(MULTI.default, (torch.randn(5, 19), _seeds(1), [4], "tensor"))
