"""Tests of the ``fqt`` op library (:mod:`fqt_compile.ops`).

Every op passes ``torch.library.opcheck`` (schema, autograd registration, fake implementation
against the real one, AOT dispatch) on representative arguments; the op chain of
:func:`~fqt_compile.ops.estimate_grad` equals its reference in :mod:`fqt_compile.quantizers`
given the same seed; ``fake_quant`` is straight-through; ``grad_quant`` is the identity forward
and an unbiased, freshly drawn gradient estimate backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from fqt_compile import quantizers as Q
from fqt_compile.ops import estimate_grad, fqt_ops
from fqt_compile.rng import new_seed

KINDS = Q.GRAD_KINDS
fqt = torch.ops.fqt


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _x(n: int = 12, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.logspace(-2, 1, n)[:, None]


def _opcheck_cases() -> list[tuple[str, tuple]]:
    x = _x()
    x3 = torch.randn(2, 3, 4)
    seed = torch.tensor(17)
    group, v, s = fqt.bhq_plan(x)
    codes, scale, offset = fqt.quantize(x, 8, "affine_zero", "channel", 0)
    grad_x = lambda: _x().requires_grad_()  # noqa: E731
    return [
        ("quantize", (x, 8, "affine_zero", "tensor", 0)),
        ("quantize", (x, 4, "symmetric", "channel", 0)),
        ("quantize", (x3, 2, "affine", "channel", -1)),
        ("dequantize", (codes, scale, offset, torch.float32)),
        ("dequantize", (codes, scale, offset, torch.bfloat16)),
        ("fake_quant", (grad_x(), 8, "affine_zero", "tensor", 0)),
        ("fake_quant", (grad_x(), 4, "symmetric", "channel", 0)),
        ("sr_quantize", (x, seed, 4, "tensor")),
        ("sr_quantize", (x, seed, 8, "row")),
        ("sr_quantize", (x, seed, 2, "column")),
        ("bhq_plan", (x,)),
        ("bhq_transform", (x, group, v, s)),
        ("bhq_inverse", (x, group, v, s)),
        ("hadamard", (torch.randn(20, 5), 16)),
        ("hadamard", (torch.randn(3, 5), 16)),
        ("hadamard_inverse", (torch.randn(32, 5), 20, 16)),
        *[("grad_quant", (grad_x(), kind, 4, -1, 16)) for kind in (*KINDS, "none")],
        ("dropout", (grad_x(), seed, 0.3)),
        ("dropout", (torch.randn(2, 3, 5, requires_grad=True), seed, 1.0)),
    ]


def test_every_op_has_opcheck_cases():
    names = {op._name for op in fqt_ops}
    assert names == {name for name, _ in _opcheck_cases()}
    assert all(op._namespace == "fqt" for op in fqt_ops)


_CASE_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(_opcheck_cases())]


@pytest.mark.parametrize("case", range(len(_CASE_IDS)), ids=_CASE_IDS)
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    op = next(op for op in fqt_ops if op._name == name)
    opcheck(op, args)


# --- forward ----------------------------------------------------------------------------------


def test_quantize_dequantize_match_reference():
    x = _x()
    codes, scale, offset = fqt.quantize(x, 4, "affine", "channel", 1)
    ref = Q.quantize_forward(x, 4, "affine", "channel", 1)
    assert torch.equal(codes, ref.codes) and scale.shape == (1, 6)
    assert torch.equal(fqt.dequantize(codes, scale, offset, torch.float32), ref.dequantize())
    assert torch.equal(fqt.fake_quant(x, 4, "affine", "channel", 1), ref.dequantize())


def test_fake_quant_gradient_is_straight_through():
    x = _x().requires_grad_()
    g = torch.randn_like(x)
    y = fqt.fake_quant(x, 2, "affine_zero", "tensor", 0)
    assert not torch.equal(y, x)  # 2 bits: it does quantize
    y.backward(g)
    assert torch.equal(x.grad, g)


# --- gradient quantizers ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(33, 19), (7, 1000), (64, 64), (1, 5), (5, 1)])
def test_sr_quantize_c_kernel_equals_the_reference(shape, monkeypatch):
    """``fqt::sr_quantize`` on CPU float32 runs the C kernel (gelu_quant.sr_quantize_kernel):
    codes, scales and offsets bit-equal to ``quantizers.stochastic_quantize`` for every
    granularity and bit width, rows with a tail (19, 1000), a transposed (non-contiguous) input;
    other dtypes, and a build without the kernel, run the reference."""
    from fqt_compile import gelu_quant

    x = _x(*shape)
    x[0] = 0.5  # a constant row: scale 0
    seed = torch.tensor(2**40 + 17)
    ran = []
    kernel = gelu_quant.sr_quantize_kernel
    monkeypatch.setattr(gelu_quant, "sr_quantize_kernel", lambda *a: ran.append(1) or kernel(*a))
    for t in (x, x.t().contiguous().t()):
        for gran in ("tensor", "row", "column"):
            for bits in (2, 4, 8):
                codes, scale, offset = fqt.sr_quantize(t, seed, bits, gran)
                q = Q.stochastic_quantize(t, bits, gran, seed)
                assert torch.equal(codes, q.codes), (gran, bits)
                assert torch.equal(scale, q.scale.expand(scale.shape)) and torch.equal(offset, q.offset.expand(offset.shape))
    assert len(ran) == 18 and (gelu_quant.available() or kernel(x, seed, 8, "row") is None)
    assert kernel(x.to(torch.bfloat16), seed, 8, "row") is None
    with pytest.raises(ValueError, match="NaN or Inf"):
        fqt.sr_quantize(torch.full(shape, float("inf")), seed, 8, "row")


@pytest.mark.parametrize("kind", KINDS)
def test_estimate_grad_equals_reference_with_same_seed(kind):
    g = torch.randn(2, 5, 7) * torch.logspace(-2, 1, 5)[:, None]
    seed = torch.tensor(99)
    est = estimate_grad(g, kind, 4, seed=seed)
    ref = Q.fake_quantize_grad(g, kind, 4, seed=seed)
    assert torch.equal(est, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_estimate_grad_shape_and_dtype(kind, dtype):
    for shape in [(4, 9), (2, 3, 5), (7,), (0, 4)]:
        g = torch.randn(shape).to(dtype)
        est = estimate_grad(g, kind, 6)
        assert est.shape == g.shape and est.dtype == dtype, shape


def test_estimate_grad_none_and_bad_kind():
    g = torch.randn(3, 3)
    assert estimate_grad(g, "none", 4) is g
    with pytest.raises(ValueError, match=r"kind must be one of \(.*'hadamard', 'none'\), got 'bhq2'"):
        estimate_grad(g, "bhq2", 4)


def test_grad_quant_forward_is_a_copy():
    x = _x()
    y = fqt.grad_quant(x, "psq", 4, -1, 16)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_grad_quant_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"kind must be one of .*, got 'psq8'"):
        fqt.grad_quant(_x(), "psq8", 4, -1, 16)
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\], got 9"):
        fqt.grad_quant(_x(), "psq", 9, -1, 16)


def _grad_through(x: torch.Tensor, g: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    x = x.clone().requires_grad_()
    fqt.grad_quant(x, kind, bits, -1, 16).backward(g)
    return x.grad


def test_grad_quant_backward_draws_its_seed_from_the_global_generator():
    x, g = _x(), _x(seed=1)
    torch.manual_seed(5)
    a = _grad_through(x, g, "bhq", 4)
    b = _grad_through(x, g, "bhq", 4)
    assert not torch.equal(a, b)  # a fresh draw every backward
    torch.manual_seed(5)
    assert torch.equal(_grad_through(x, g, "bhq", 4), a)  # reproducible under manual_seed
    torch.manual_seed(5)
    assert torch.equal(estimate_grad(g, "bhq", 4, seed=new_seed()), a)
    assert torch.equal(_grad_through(x, g, "none", 4), g)


@pytest.mark.parametrize("kind", ["psq", "ptq"])
def test_grad_quant_backward_is_unbiased(kind):
    """The mean of K backward passes is within a Bernstein bound of the exact gradient.

    Each element of a PSQ/PTQ estimate deviates from its mean by less than ``scale`` and has
    variance at most ``scale^2 / 4`` (p(1-p) <= 1/4). Bernstein with that bound gives
    ``t = sqrt(2 (scale^2/4) L / K) + 2 scale L / (3K)``, ``L = ln(2 n / 1e-6)``: a false
    failure anywhere has probability below 1e-6. BHQ and the other kinds are checked through
    the same op chain in tests/test_quantizers.py (estimate_grad equals the reference above)."""
    g = _x(seed=3)
    x = torch.zeros_like(g)
    bits, k = 4, 1000
    torch.manual_seed(0)
    total = torch.zeros_like(g, dtype=torch.float64)
    for _ in range(k):
        total += _grad_through(x, g, kind, bits)
    mean = (total / k).float()
    dims = (1,) if kind == "psq" else (0, 1)
    scale = (g.amax(dim=dims, keepdim=True) - g.amin(dim=dims, keepdim=True)) / (2**bits - 1)
    log_term = math.log(2 * g.numel() / 1e-6)
    tol = torch.sqrt(2 * scale**2 / 4 * log_term / k) + 2 * scale * log_term / (3 * k)
    tol = tol + 16 * torch.finfo(torch.float32).eps * g.abs().amax(dim=dims, keepdim=True)
    assert bool(((mean - g).abs() <= tol).all()), float(((mean - g).abs() / tol).max())


def test_grad_quant_in_a_model_step():
    # y = grad_quant(x) @ w: d loss / d x = Q(grad of x) and differs between steps.
    torch.manual_seed(1)
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(4, 3)
    grads = []
    for _ in range(2):
        x.grad = None
        (fqt.grad_quant(x, "psq", 4, -1, 16) @ w).square().sum().backward()
        grads.append(x.grad.clone())
    exact = torch.autograd.grad((x @ w).square().sum(), x)[0]
    assert not torch.equal(grads[0], grads[1])
    # 4-bit PSQ: each element within one level of the exact gradient's row range.
    level = (exact.amax(1, keepdim=True) - exact.amin(1, keepdim=True)) / 15
    assert bool(((grads[0] - exact).abs() <= level * 1.0001).all())


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_keeps_a_fraction_of_one_minus_p_and_scales_like_f_dropout():
    """Kept elements are x / (1 - p), the others 0, as F.dropout; the mask is the counter-based
    draws of the row-major index >= p (ops.dropout_keep). Kept count of n = 2**18 elements at
    p = 0.3: mean n * 0.7, standard deviation sqrt(n * 0.7 * 0.3) = 235; the tolerance is 5
    standard deviations (a fixed seed; the generator's uniformity is tested in test_rng.py)."""
    from fqt_compile.ops import dropout_keep

    x = torch.randn(512, 512)
    seed = torch.tensor(2024)
    y = fqt.dropout(x, seed, 0.3)
    keep = dropout_keep(seed, x.shape, 0.3, torch.bool)
    assert torch.equal(y, torch.where(keep, x * (1 / 0.7), torch.zeros(())))
    n = x.numel()
    assert abs(int(keep.sum()) - 0.7 * n) < 5 * math.sqrt(n * 0.7 * 0.3)
    # the mask is a function of (seed, index): a 4-D tensor of the same elements gets the same
    assert torch.equal(fqt.dropout(x.reshape(8, 2, 128, 128), seed, 0.3).reshape(512, 512), y)
    assert not torch.equal(fqt.dropout(x, torch.tensor(2025), 0.3), y)
    assert torch.equal(fqt.dropout(x, seed, 0.0), x)
    # NaN and Inf propagate through a dropped element as in F.dropout (x * mask * scale)
    z = torch.tensor([float("nan"), float("inf")]).repeat(64)
    out = fqt.dropout(z, seed, 0.5)
    torch.testing.assert_close(out, z * dropout_keep(seed, z.shape, 0.5, z.dtype) * 2.0, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out).all() == False and torch.isnan(out[1::2]).any()  # noqa: E712 - dropped Inf: NaN


def test_dropout_backward_recomputes_the_mask_from_the_seed():
    x = torch.randn(64, 48, requires_grad=True)
    seed = new_seed()
    y = fqt.dropout(x, seed, 0.25)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, fqt.dropout(g, seed, 0.25))
    assert torch.equal(x.grad == 0, y == 0) or bool(torch.any(x == 0))


@pytest.mark.parametrize("p", [0.1, 0.2, 1 / 3, 0.5, 0.9, 2.0**-24, 1 - 2.0**-24, 0.3000000001])
def test_keep_threshold_is_the_least_kept_draw(p):
    """ops.keep_threshold(p), the integer the C kernels compare a draw's 24 bits with, keeps
    exactly the draws dropout_keep keeps: checked over all 2**24 draw values."""
    from fqt_compile.ops import keep_threshold

    u = torch.arange(2**24, dtype=torch.int32).to(torch.float32) * (1.0 / 16777216.0)  # rng's draws, exact
    kept = u >= p
    k = keep_threshold(p)
    assert not kept[:k].any() and kept[k:].all()


def test_dropout_rejects_p_outside_0_1():
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
            fqt.dropout(torch.ones(3), torch.tensor(1), p)
