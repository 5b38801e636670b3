"""fqt_compile/softmax_quant.py: the fused softmax + quantizer kernels.

What is exact and what is not (the module docstring's claims):
* given the kernel's own softmax output P (forward) or softmax gradient ds (backward), the codes,
  scales and offsets equal ``quantize_forward`` / ``stochastic_quantize`` bit for bit (same
  formulas, same counter-based draws): so the fused backward quantizers are the unbiased
  quantizers of ``tests/test_quantizers.py``, with the same random numbers;
* P and ds themselves equal torch's to float rounding (another exp and summation order).
"""

from __future__ import annotations

import pytest
import torch

from fqt_compile import quantizers as Q
from fqt_compile import softmax_quant as SQ
from fqt_compile import sr_fused as SF

needs_kernel = pytest.mark.skipif(not SQ.available(), reason=f"fused softmax kernel {SQ.status()}")

SHAPES = [(2, 3, 37), (4, 64, 64), (5, 1), (3, 16)]  # row tails (37 % 16), whole vectors, 1-wide rows


def _scores(shape, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if causal and shape[-1] == shape[-2]:
        x = x.masked_fill(~torch.ones(shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return x


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
@pytest.mark.parametrize("bits", [8, 4])
def test_forward_rounds_its_softmax_exactly_like_quantize_forward(shape, scheme, bits):
    x = _scores(shape, causal=True)
    p, codes, scale, offset = torch.ops.fqt.softmax_quantize(x, bits, scheme, 1.0, None, [], [])
    ref = Q.quantize_forward(p, bits, scheme, "tensor")
    assert torch.equal(codes, ref.codes)
    assert torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)
    assert scale.shape == offset.shape == ()


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_softmax_equals_torch_to_float_rounding(shape):
    """Tolerance: our exp is within 2 ulp and the row sum is taken in another order (at most
    L ulp of the sum, L <= 64 here); rtol 1e-5 is ~80 ulp. Measured on (128, 512, 512) causal
    scores: 4.2e-7 relative at most, no code differing from torch's softmax + quantize_forward."""
    x = _scores(shape, causal=True)
    p, codes, scale, _ = torch.ops.fqt.softmax_quantize(x, 8, "affine_zero", 1.0, None, [], [])
    ref_p = torch.softmax(x, -1)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-30)
    ref = Q.quantize_forward(ref_p, 8, "affine_zero", "tensor")
    torch.testing.assert_close(scale, ref.scale, rtol=1e-5, atol=0)
    # a code can differ only where P / scale lies within P's float error of a rounding boundary
    diff = (codes.int() - ref.codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3


@needs_kernel
@pytest.mark.parametrize("bad", ["nan", "inf", "masked_row"])
def test_forward_non_finite_input_raises(bad):
    x = _scores((2, 8, 8))
    if bad == "nan":
        x[1, 3, 5] = float("nan")
    elif bad == "inf":
        x[0, 0, 0] = float("inf")
    else:  # a row masked entirely: torch's softmax gives NaN there too
        x[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.fqt.softmax_quantize(x, 8, "affine_zero", 1.0, None, [], [])


def test_forward_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(SQ, "_load", lambda: (None, "off (test)"))
    x = _scores((2, 5, 9))
    p, codes, scale, offset = torch.ops.fqt.softmax_quantize(x, 8, "affine", 1.0, None, [], [])
    ref_p = torch.softmax(x, -1)
    ref = Q.quantize_forward(ref_p, 8, "affine", "tensor")
    assert torch.equal(p, ref_p) and torch.equal(codes, ref.codes)
    assert torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)


def test_forward_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        torch.ops.fqt.softmax_quantize(torch.randn(2, 4), 1, "affine_zero", 1.0, None, [], [])
    with pytest.raises(RuntimeError, match="scheme"):
        torch.ops.fqt.softmax_quantize(torch.randn(2, 4), 8, "log", 1.0, None, [], [])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fqt.softmax_quantize(torch.randn(2, 4, dtype=torch.float64), 8, "affine_zero", 1.0, None, [], [])


# --- backward ---------------------------------------------------------------------------------

QUANTIZER_SETS = [  # (bits, granularities): the default Q_b1 + Q_b2 pair, and others
    ([8, 8], "row,column"), ([4], "tensor"), ([8, 5, 4, 2], "column,row,tensor,row"),
]


def _bwd_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(_scores(shape, causal=True, seed=seed), -1)
    return torch.randn(shape, generator=g) * 1e-3, p


def _seeds(n):
    return [torch.tensor(s, dtype=torch.int64) for s in (123456789012345, 42, 2**40 + 7, 99)[:n]]


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 3, 37), (4, 64, 64), (6, 1)])
@pytest.mark.parametrize("bits,grans", QUANTIZER_SETS)
def test_backward_rounds_its_gradient_exactly_like_stochastic_quantize(shape, bits, grans):
    g, p = _bwd_inputs(shape)
    seeds = _seeds(len(bits))
    out = torch.ops.fqt.softmax_backward_sr_quantize(g, p, 0.125, seeds, bits, grans, [], [])
    ds = out[0]
    assert ds.shape == (g.numel() // shape[-1], shape[-1]) and len(out) == 1 + 3 * len(bits)
    for k, (b, gran) in enumerate(zip(bits, grans.split(","))):
        ref = Q.stochastic_quantize(ds, b, gran, seeds[k])
        codes, scale, offset = out[1 + 3 * k: 4 + 3 * k]
        assert torch.equal(codes, ref.codes), (k, gran)
        assert torch.equal(scale, ref.scale.expand_as(scale)) and torch.equal(offset, ref.offset.expand_as(offset))
        assert scale.shape == {"tensor": (), "row": (ds.shape[0], 1), "column": (1, ds.shape[1])}[gran]


@needs_kernel
def test_backward_gradient_equals_softmax_backward_to_float_rounding():
    """ds = (g*p - p*sum(g*p)) * c with one fused multiply-add; torch's decomposition rounds
    twice and sums in another order. Tolerance 1e-5 of the largest |ds| (measured 3.4e-7 on
    (128, 512, 512))."""
    g, p = _bwd_inputs((4, 64, 64))
    ds = torch.ops.fqt.softmax_backward_sr_quantize(g, p, 0.125, _seeds(1), [8], "row", [], [])[0]
    ref = torch.ops.aten._softmax_backward_data(g, p, -1, torch.float32) * 0.125
    torch.testing.assert_close(ds, ref.reshape(ds.shape), rtol=0, atol=1e-5 * ref.abs().max().item())


@needs_kernel
def test_backward_non_finite_gradient_raises():
    g, p = _bwd_inputs((2, 8, 8))
    g[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.fqt.softmax_backward_sr_quantize(g, p, 1.0, _seeds(2), [8, 8], "row,column", [], [])


def test_backward_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(SQ, "_load", lambda: (None, "off (test)"))
    g, p = _bwd_inputs((2, 4, 9))
    seeds = _seeds(2)
    out = torch.ops.fqt.softmax_backward_sr_quantize(g, p, 0.5, seeds, [8, 6], "row,column", [], [])
    gp = g * p
    ds = ((gp - p * gp.sum(-1, keepdim=True)) * 0.5).reshape(-1, 9)
    assert torch.equal(out[0], ds)
    for k, (b, gran) in enumerate([(8, "row"), (6, "column")]):
        ref = Q.stochastic_quantize(ds, b, gran, seeds[k])
        assert torch.equal(out[1 + 3 * k], ref.codes)


def test_backward_rejects_bad_arguments():
    g, p = _bwd_inputs((2, 4, 4))
    with pytest.raises(RuntimeError, match="granularity"):
        torch.ops.fqt.softmax_backward_sr_quantize(g, p, 1.0, _seeds(1), [8], "channel", [], [])
    with pytest.raises(RuntimeError, match="one bits/granularity/seed each"):
        torch.ops.fqt.softmax_backward_sr_quantize(g, p, 1.0, _seeds(2), [8], "row", [], [])
    with pytest.raises(RuntimeError, match="shapes differ"):
        torch.ops.fqt.softmax_backward_sr_quantize(g, p[..., :2], 1.0, _seeds(1), [8], "row", [], [])


# --- the incoming gradient as a lowered GEMM's int32 product + epilogue ---------------------------


def _epilogue(b, m, n, seed=0):
    """An int32 product with the three terms lower_int_gemm's epilogue has for affine operands
    (acc * sA * sB + rowsum * sA * oB + oA * colsum), in the broadcast shapes the graphs have."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2**20, 2**20, (b, m, n), generator=gen, dtype=torch.int32)
    rows = [torch.rand(b, m, 1, generator=gen) * 1e-6, torch.rand(b, m, 1, generator=gen) * 1e-3,
            torch.rand((), generator=gen)]
    cols = [torch.rand(1, 1, n, generator=gen), torch.rand((), generator=gen), torch.randn(b, 1, n, generator=gen) * 1e-3]
    return acc, rows, cols


@needs_kernel
@pytest.mark.parametrize("bmn,p_shape", [((6, 37, 37), (2, 3, 37, 37)), ((1, 64, 16), (64, 16))])
@pytest.mark.parametrize("bits,grans", QUANTIZER_SETS[:2])
def test_backward_from_int32_product_equals_float_input(bmn, p_shape, bits, grans):
    """The kernel computes each row of g from acc and the epilogue in cache (one multiply and
    fused multiply-adds; the reference rounds after each operation), so ds matches the op on
    the float g to float rounding (tolerance 1e-5 of max |ds|, the tolerance of the softmax
    backward test above), and its codes are the reference quantizers' on its own ds."""
    acc, rows, cols = _epilogue(*bmn)
    if len(p_shape) == 2:
        acc, rows, cols = acc[0], [r[0] if r.dim() else r for r in rows], [c[0] if c.dim() else c for c in cols]
    p = torch.softmax(torch.randn(p_shape), -1)
    seeds = _seeds(len(bits))
    g = SF.epilogue_reference(acc, rows, cols).reshape(p_shape)
    out = torch.ops.fqt.softmax_backward_sr_quantize(acc, p, 0.125, seeds, bits, grans, rows, cols)
    ref = torch.ops.fqt.softmax_backward_sr_quantize(g, p, 0.125, seeds, bits, grans, [], [])
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5 * ref[0].abs().max().item())
    for k, (b, gran) in enumerate(zip(bits, grans.split(","))):
        q = Q.stochastic_quantize(out[0], b, gran, seeds[k])
        assert torch.equal(out[1 + 3 * k], q.codes)


@needs_kernel
@pytest.mark.parametrize("masked", [True, False])
def test_forward_from_int32_product_scale_and_mask_equals_float_input(masked):
    """The attention scores as the fused graph passes them: the QK^T int32 product + epilogue,
    the scale, the causal mask (-inf above the diagonal). The kernel builds each row of the
    scores in cache in the order the graph does (epilogue, * scale, + mask) -- the epilogue with
    fused multiply-adds -- so P matches the op on the float scores to float rounding (rtol 1e-5,
    the softmax test's tolerance above) and the codes are quantize_forward's of its own P."""
    acc, rows, cols = _epilogue(6, 37, 37)
    rows[0] = rows[0] * 1e-2  # scores of a few units, as attention's
    mask = torch.zeros(37, 37).masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf")) if masked else None
    shape = [2, 3, 37, 37]
    s = SF.epilogue_reference(acc, rows, cols).reshape(shape) * 0.125
    if masked:
        s = s + mask
    p, codes, scale, offset = torch.ops.fqt.softmax_quantize(acc, 8, "affine_zero", 0.125, mask, rows, cols)
    ref_p = torch.ops.fqt.softmax_quantize(s, 8, "affine_zero", 1.0, None, [], [])[0].reshape(6, 37, 37)
    assert p.shape == codes.shape == acc.shape  # the product's shape; the graph views it
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-30)
    ref = Q.quantize_forward(p, 8, "affine_zero", "tensor")
    assert torch.equal(codes, ref.codes) and torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)


def test_forward_from_int32_product_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(SQ, "_load", lambda: (None, "off (test)"))
    acc, rows, cols = _epilogue(4, 8, 8)
    mask = torch.randn(8, 8)
    p, codes, _, _ = torch.ops.fqt.softmax_quantize(acc, 8, "affine", 0.5, mask, rows, cols)
    s = (acc.float() * rows[0] * cols[0] + rows[1] * cols[1] + rows[2] * cols[2]) * 0.5 + mask
    assert torch.equal(p, torch.softmax(s, -1))
    assert torch.equal(codes, Q.quantize_forward(torch.softmax(s, -1), 8, "affine", "tensor").codes)


def test_forward_rejects_bad_scores_arguments():
    acc, rows, cols = _epilogue(2, 4, 4)
    x = torch.randn(2, 4, 4)
    with pytest.raises(RuntimeError, match="a scale or mask goes with an int32 product only"):
        torch.ops.fqt.softmax_quantize(x, 8, "affine_zero", 0.5, None, [], [])
    with pytest.raises(RuntimeError, match="must broadcast to the last two dimensions"):
        torch.ops.fqt.softmax_quantize(acc, 8, "affine_zero", 0.5, torch.zeros(3, 4), rows, cols)


def test_backward_from_int32_product_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(SQ, "_load", lambda: (None, "off (test)"))
    acc, rows, cols = _epilogue(4, 8, 8)
    p = torch.softmax(torch.randn(2, 2, 8, 8), -1)
    out = torch.ops.fqt.softmax_backward_sr_quantize(acc, p, 0.5, _seeds(1), [8], "row", rows, cols)
    g = (acc.float() * rows[0] * cols[0] + rows[1] * cols[1] + rows[2] * cols[2]).reshape(p.shape)
    ref = torch.ops.fqt.softmax_backward_sr_quantize(g, p, 0.5, _seeds(1), [8], "row", [], [])
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_backward_rejects_bad_epilogues():
    acc, rows, cols = _epilogue(2, 4, 4)
    p = torch.softmax(torch.randn(2, 4, 4), -1)
    with pytest.raises(RuntimeError, match="needs 1 to 4 epilogue terms"):
        torch.ops.fqt.softmax_backward_sr_quantize(acc, p, 1.0, _seeds(1), [8], "row", [], [])
    with pytest.raises(RuntimeError, match="epilogue terms given with a float gradient"):
        torch.ops.fqt.softmax_backward_sr_quantize(acc.float(), p, 1.0, _seeds(1), [8], "row", rows, cols)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        torch.ops.fqt.softmax_backward_sr_quantize(acc, p, 1.0, _seeds(1), [8], "row", [cols[0]] * 3, cols)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.fqt.softmax_backward_sr_quantize(acc[:, :2], p, 1.0, _seeds(1), [8], "row", rows, cols)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_ops_pass_opcheck(which):
    """Schema, fake (meta) implementation and dispatch are consistent (torch.library.opcheck)."""
    if which == "forward":
        torch.library.opcheck(torch.ops.fqt.softmax_quantize.default,
                              (_scores((2, 4, 19)), 8, "affine_zero", 1.0, None, [], []))
        acc, rows, cols = _epilogue(2, 4, 19)
        torch.library.opcheck(torch.ops.fqt.softmax_quantize.default,
                              (acc, 8, "affine_zero", 0.5, torch.randn(4, 19), rows, cols))
    else:
        g, p = _bwd_inputs((2, 4, 19))
        torch.library.opcheck(torch.ops.fqt.softmax_backward_sr_quantize.default,
                              (g, p, 0.25, _seeds(2), [8, 8], "row,column", [], []))
        acc, rows, cols = _epilogue(2, 4, 19)
        torch.library.opcheck(torch.ops.fqt.softmax_backward_sr_quantize.default,
                              (acc, p.reshape(2, 4, 19), 0.25, _seeds(2), [8, 8], "row,column", rows, cols))


# --- attention dropout on the way (fqt::dropout's mask drawn in the kernels) --------------------

DROP_SEED = torch.tensor(2**41 + 12345, dtype=torch.int64)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p_drop", [0.1, 0.5, 1 / 3])
@pytest.mark.parametrize("scheme", Q.FORWARD_SCHEMES)
def test_forward_with_dropout_rounds_the_dropped_softmax_exactly(shape, p_drop, scheme):
    """With a dropout seed the codes are quantize_forward's of fqt::dropout(P) bit for bit (the
    same mask, the same x * keep * (1 / (1 - p)) in float32), and P is the softmax itself, the
    kernel's P without dropout."""
    x = _scores(shape, causal=True)
    p, codes, scale, offset = torch.ops.fqt.softmax_quantize(x, 8, scheme, 1.0, None, [], [], DROP_SEED, p_drop)
    assert torch.equal(p, torch.ops.fqt.softmax_quantize(x, 8, scheme, 1.0, None, [], [])[0])
    ref = Q.quantize_forward(torch.ops.fqt.dropout(p, DROP_SEED, p_drop), 8, scheme, "tensor")
    assert torch.equal(codes, ref.codes)
    assert torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)


@needs_kernel
@pytest.mark.parametrize("bits,grans", QUANTIZER_SETS)
def test_backward_with_dropout_is_the_op_on_the_dropped_gradient(bits, grans):
    """With a dropout seed the kernel first drops g out (the gradient of the forward's dropout):
    outputs equal the op's on the float fqt::dropout(g) bit for bit."""
    g, p = _bwd_inputs((2, 3, 37))
    seeds = _seeds(len(bits))
    out = torch.ops.fqt.softmax_backward_sr_quantize(g, p, 0.125, seeds, bits, grans, [], [], DROP_SEED, 0.2)
    ref = torch.ops.fqt.softmax_backward_sr_quantize(torch.ops.fqt.dropout(g, DROP_SEED, 0.2), p, 0.125, seeds, bits,
                                                     grans, [], [])
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@needs_kernel
def test_dropout_from_int32_products_uses_the_flat_index_of_the_output():
    """The int32 forms (the graph's: (B H, L, L) products) draw the mask at the same flat
    indices as the float forms: dropped and undropped outputs agree where the mask keeps, and
    the dropped codes / gradients are 0 / p-scaled where it drops."""
    acc, rows, cols = _epilogue(6, 37, 37)
    rows[0] = rows[0] * 1e-2
    keep = torch.ops.fqt.dropout(torch.ones(6, 37, 37), DROP_SEED, 0.3) > 0
    _, codes, scale, offset = torch.ops.fqt.softmax_quantize(acc, 8, "affine_zero", 0.125, None, rows, cols, DROP_SEED, 0.3)
    p, *_ = torch.ops.fqt.softmax_quantize(acc, 8, "affine_zero", 0.125, None, rows, cols)
    ref = Q.quantize_forward(torch.ops.fqt.dropout(p, DROP_SEED, 0.3), 8, "affine_zero", "tensor")
    assert torch.equal(codes, ref.codes) and torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)
    assert 0.6 < keep.float().mean() < 0.8
    pb = torch.softmax(torch.randn(6, 37, 37), -1)
    out = torch.ops.fqt.softmax_backward_sr_quantize(acc, pb, 0.5, _seeds(1), [8], "row", rows, cols, DROP_SEED, 0.3)
    g = SF.epilogue_reference(acc, rows, cols).reshape(6, 37, 37)
    ref = torch.ops.fqt.softmax_backward_sr_quantize(g * keep / 0.7, pb, 0.5, _seeds(1), [8], "row", [], [])
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5 * ref[0].abs().max().item())


def test_dropout_without_the_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(SQ, "_load", lambda: (None, "off (test)"))
    x = _scores((2, 5, 9))
    p, codes, _, _ = torch.ops.fqt.softmax_quantize(x, 8, "affine", 1.0, None, [], [], DROP_SEED, 0.25)
    assert torch.equal(p, torch.softmax(x, -1))
    ref = Q.quantize_forward(torch.ops.fqt.dropout(p, DROP_SEED, 0.25), 8, "affine", "tensor")
    assert torch.equal(codes, ref.codes)
    g, pb = _bwd_inputs((2, 5, 9))
    out = torch.ops.fqt.softmax_backward_sr_quantize(g, pb, 0.5, _seeds(1), [8], "row", [], [], DROP_SEED, 0.25)
    ref = torch.ops.fqt.softmax_backward_sr_quantize(torch.ops.fqt.dropout(g, DROP_SEED, 0.25), pb, 0.5, _seeds(1),
                                                     [8], "row", [], [])
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_dropout_arguments_are_checked():
    x, (g, p) = _scores((2, 4)), _bwd_inputs((2, 4))
    for bad_p in (0.0, 1.0, -0.5):
        with pytest.raises(RuntimeError, match=r"dropout_p must lie in \(0, 1\)"):
            torch.ops.fqt.softmax_quantize(x, 8, "affine_zero", 1.0, None, [], [], DROP_SEED, bad_p)
        with pytest.raises(RuntimeError, match=r"dropout_p must lie in \(0, 1\)"):
            torch.ops.fqt.softmax_backward_sr_quantize(g, p, 1.0, _seeds(1), [8], "row", [], [], DROP_SEED, bad_p)
    with pytest.raises(RuntimeError, match="0-d int64"):
        torch.ops.fqt.softmax_quantize(x, 8, "affine_zero", 1.0, None, [], [], DROP_SEED.float(), 0.5)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_ops_with_dropout_pass_opcheck(which):
    if which == "forward":
        torch.library.opcheck(torch.ops.fqt.softmax_quantize.default,
                              (_scores((2, 4, 19)), 8, "affine_zero", 1.0, None, [], [], DROP_SEED, 0.1))
    else:
        g, p = _bwd_inputs((2, 4, 19))
        torch.library.opcheck(torch.ops.fqt.softmax_backward_sr_quantize.default,
                              (g, p, 0.25, _seeds(2), [8, 8], "row,column", [], [], DROP_SEED, 0.1))
