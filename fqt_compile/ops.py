"""The ``fqt`` op library: ``torch.library`` custom ops that quantized graphs contain.

Each op takes its configuration as plain arguments (ints, strings), has a fake (meta)
implementation for tracing, and a reference implementation in :mod:`fqt_compile.quantizers`.

==========================  ======================================================================
op                          meaning
==========================  ======================================================================
fqt::quantize               forward quantizer Q_f / Q_w -> (codes int8, scale, offset)
fqt::dequantize             codes * scale + offset
fqt::fake_quant             dequantize(quantize(x)); straight-through gradient
fqt::sr_quantize            stochastic rounding of an (N, D) view, per tensor/row/column
fqt::bhq_plan               BHQ grouping -> (group, v, s) per row
fqt::bhq_transform          T x = H_n diag(s) x per group;  fqt::bhq_inverse: T^-1 y
fqt::hadamard               block Hadamard mix of rows (padded); fqt::hadamard_inverse
fqt::grad_quant             identity forward; backward returns Q(grad) for a configured Q
fqt::dropout                dropout with a counter-based mask of (seed, index); backward: the same
==========================  ======================================================================

``sr_quantize`` takes its seed as a 0-d int64 tensor, so a compiled graph draws a new one
every call (``fqt_compile.rng.new_seed``) instead of baking a constant in.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import quantizers as Q
from .rng import new_seed, uniform_from_seed

__all__ = ["estimate_grad", "grad_codes", "fqt_ops"]

_LIB = "fqt"


def _forward_range_shape(x: Tensor, granularity: str, axis: int) -> list[int]:
    if granularity == "tensor":
        return []
    if granularity == "channel":
        shape = [1] * x.dim()
        shape[axis % x.dim()] = x.shape[axis % x.dim()]
        return shape
    raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")


# --- forward quantizers -----------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::quantize", mutates_args=())
def quantize(x: Tensor, bits: int, scheme: str, granularity: str, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """Forward quantizer (round to nearest). Returns ``(codes, scale, offset)``."""
    q = Q.quantize_forward(x, bits, scheme, granularity, axis)
    shape = _forward_range_shape(x, granularity, axis)
    # expand, not reshape: for an empty input the quantizer returns 0-d ranges.
    return q.codes, q.scale.expand(shape).contiguous(), q.offset.expand(shape).contiguous()


@quantize.register_fake
def _(x, bits, scheme, granularity, axis):
    Q.check_bits(bits)
    shape = _forward_range_shape(x, granularity, axis)
    return (
        torch.empty_like(x, dtype=torch.int8),
        x.new_empty(shape, dtype=torch.float32),
        x.new_empty(shape, dtype=torch.float32),
    )


@torch.library.custom_op(f"{_LIB}::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    """``codes * scale + offset`` in ``dtype``."""
    return Q.dequantize(codes, scale, offset, dtype)


@dequantize.register_fake
def _(codes, scale, offset, dtype):
    return torch.empty_like(codes, dtype=dtype)


@torch.library.custom_op(f"{_LIB}::fake_quant", mutates_args=())
def fake_quant(x: Tensor, bits: int, scheme: str, granularity: str, axis: int) -> Tensor:
    """``dequantize(quantize(x))`` in ``x.dtype``; the gradient passes straight through."""
    return Q.fake_quantize_forward(x, bits, scheme, granularity, axis)


@fake_quant.register_fake
def _(x, bits, scheme, granularity, axis):
    Q.check_bits(bits)
    return torch.empty_like(x)


def _fake_quant_backward(ctx, grad: Tensor):
    return grad, None, None, None, None


fake_quant.register_autograd(_fake_quant_backward)


# --- gradient quantizers ----------------------------------------------------------------------


def _sr_range_shape(x2d: Tensor, granularity: str) -> list[int]:
    if granularity == "tensor":
        return []
    if granularity == "row":
        return [x2d.shape[0], 1]
    if granularity == "column":
        return [1, x2d.shape[1]]
    raise ValueError(f"granularity must be 'tensor', 'row' or 'column', got {granularity!r}")


@torch.library.custom_op(f"{_LIB}::sr_quantize", mutates_args=())
def sr_quantize(x2d: Tensor, seed: Tensor, bits: int, granularity: str) -> tuple[Tensor, Tensor, Tensor]:
    """Unbiased stochastic rounding of an (N, D) tensor. Returns ``(codes, scale, offset)``.

    A CPU float32 tensor is quantized by the fused C kernel (``gelu_quant.sr_quantize_kernel``,
    codes bit-equal to the reference's) where it is built; anything else by the reference
    ``quantizers.stochastic_quantize``."""
    Q.check_bits(bits)
    if seed.dim() == 0:  # the kernel takes the granularities it knows, else the reference runs
        from .gelu_quant import sr_quantize_kernel  # the kernel module imports the op library's quantizers

        out = sr_quantize_kernel(x2d, seed, bits, granularity)
        if out is not None:
            return out
    q = Q.stochastic_quantize(x2d, bits, granularity, seed)  # type: ignore[arg-type]
    shape = _sr_range_shape(x2d, granularity)
    # expand, not reshape: for an empty input the quantizer returns 0-d ranges.
    return q.codes, q.scale.expand(shape).contiguous(), q.offset.expand(shape).contiguous()


@sr_quantize.register_fake
def _(x2d, seed, bits, granularity):
    Q.check_bits(bits)
    torch._check(x2d.dim() == 2, lambda: "fqt::sr_quantize expects a 2-D tensor")
    shape = _sr_range_shape(x2d, granularity)
    return (
        torch.empty_like(x2d, dtype=torch.int8),
        x2d.new_empty(shape, dtype=torch.float32),
        x2d.new_empty(shape, dtype=torch.float32),
    )


@torch.library.custom_op(f"{_LIB}::bhq_plan", mutates_args=())
def bhq_plan(x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BHQ grouping of the rows of ``x2d``: ``(group, v, s)``, one entry per row."""
    plan = Q.bhq_plan(x2d)
    return plan.group, plan.v, plan.s


@bhq_plan.register_fake
def _(x2d):
    n = x2d.shape[0]
    return (
        x2d.new_empty((n,), dtype=torch.int64),
        x2d.new_empty((n,), dtype=torch.float32),
        x2d.new_empty((n,), dtype=torch.float32),
    )


@torch.library.custom_op(f"{_LIB}::bhq_transform", mutates_args=())
def bhq_transform(x2d: Tensor, group: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """``T x``: per group, ``H_n diag(s) x`` (float32 out)."""
    return Q.bhq_transform(x2d, Q.BHQPlan(group, v, s))[0]


@bhq_transform.register_fake
def _(x2d, group, v, s):
    return torch.empty_like(x2d, dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::bhq_inverse", mutates_args=())
def bhq_inverse(y2d: Tensor, group: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """``T^-1 y = diag(1/s) H_n y`` per group (float32 out)."""
    return Q.bhq_inverse(y2d, Q.BHQPlan(group, v, s))


@bhq_inverse.register_fake
def _(y2d, group, v, s):
    return torch.empty_like(y2d, dtype=torch.float32)


def _padded_rows(n_rows: int, block: int) -> int:
    b = Q._hadamard_block(n_rows, block)
    return n_rows + (-n_rows) % b


@torch.library.custom_op(f"{_LIB}::hadamard", mutates_args=())
def hadamard(x2d: Tensor, block: int) -> Tensor:
    """Normalized block Hadamard mix of rows; rows zero-padded to a multiple of the block."""
    return Q.hadamard_transform(x2d, block)


@hadamard.register_fake
def _(x2d, block):
    return x2d.new_empty((_padded_rows(x2d.shape[0], block), x2d.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::hadamard_inverse", mutates_args=())
def hadamard_inverse(y2d: Tensor, n_rows: int, block: int) -> Tensor:
    """Inverse of ``fqt::hadamard``, cut back to ``n_rows`` rows."""
    return Q.hadamard_inverse(y2d, n_rows, block)


@hadamard_inverse.register_fake
def _(y2d, n_rows, block):
    return y2d.new_empty((n_rows, y2d.shape[1]), dtype=torch.float32)


def grad_codes(g2d: Tensor, kind: str, bits: int, block: int = 16, seed: Tensor | None = None):
    """Q(G) of an (N, D) gradient as a GEMM operand: ``((codes, scale, offset), post)``.

    ``post`` maps rows back (BHQ: T^-1, Hadamard: its inverse) and is applied to the GEMM
    *result* (``T^-1 (Q(T G) @ W~) = (T^-1 Q(T G)) @ W~``), or is None. ``kind`` "none" (QAT)
    gives the float gradient itself as operand (scale 1, offset 0). Every step is an ``fqt``
    op, so traced into a backward graph each is a visible node.
    """
    if kind == "none":
        return (g2d.to(torch.float32), g2d.new_ones((), dtype=torch.float32),
                g2d.new_zeros((), dtype=torch.float32)), None
    if kind not in Q.GRAD_KINDS:
        raise ValueError(f"gradient quantizer kind must be one of {Q.GRAD_KINDS + ('none',)}, got {kind!r}")
    if seed is None:
        seed = new_seed(g2d.device)
    ops = torch.ops.fqt
    if kind in ("ptq", "psq", "column"):
        gran = {"ptq": "tensor", "psq": "row", "column": "column"}[kind]
        return ops.sr_quantize(g2d, seed, bits, gran), None
    if kind == "bhq":
        group, v, s = ops.bhq_plan(g2d)
        codes = ops.sr_quantize(ops.bhq_transform(g2d, group, v, s), seed, bits, "row")
        return codes, lambda y: ops.bhq_inverse(y, group, v, s)
    n_rows = g2d.shape[0]
    codes = ops.sr_quantize(ops.hadamard(g2d, block), seed, bits, "row")
    return codes, lambda y: ops.hadamard_inverse(y, n_rows, block)


def estimate_grad(
    grad: Tensor, kind: str, bits: int, *, row_dims: int = -1, block: int = 16, seed: Tensor | None = None
) -> Tensor:
    """One unbiased quantized estimate of ``grad`` (same shape and dtype):
    :func:`grad_codes`, dequantized, with its row map applied::

    ``psq``:  sr_quantize(rows) -> dequantize
    ``bhq``:  bhq_plan -> bhq_transform -> sr_quantize(rows) -> dequantize -> bhq_inverse
    ``hadamard``: hadamard -> sr_quantize(rows) -> dequantize -> hadamard_inverse
    ``none`` returns ``grad`` itself.
    """
    if kind == "none":
        return grad
    (codes, scale, offset), post = grad_codes(Q.as_rows(grad, row_dims), kind, bits, block, seed)
    est = torch.ops.fqt.dequantize(codes, scale, offset, torch.float32)
    if post is not None:
        est = post(est)
    return est.reshape(grad.shape).to(grad.dtype)


@torch.library.custom_op(f"{_LIB}::grad_quant", mutates_args=())
def grad_quant(x: Tensor, kind: str, bits: int, row_dims: int, block: int) -> Tensor:
    """Identity in forward (a copy); in backward the gradient is replaced by one unbiased
    quantized estimate ``Q(grad)`` with quantizer ``kind`` at ``bits`` bits."""
    if kind not in Q.GRAD_KINDS + ("none",):
        raise ValueError(f"gradient quantizer kind must be one of {Q.GRAD_KINDS + ('none',)}, got {kind!r}")
    Q.check_bits(bits)
    return x.clone()


@grad_quant.register_fake
def _(x, kind, bits, row_dims, block):
    Q.check_bits(bits)
    return torch.empty_like(x)


def _grad_quant_setup(ctx, inputs, output):
    _, ctx.kind, ctx.bits, ctx.row_dims, ctx.block = inputs


def _grad_quant_backward(ctx, grad: Tensor):
    est = estimate_grad(grad, ctx.kind, ctx.bits, row_dims=ctx.row_dims, block=ctx.block)
    return est, None, None, None, None


grad_quant.register_autograd(_grad_quant_backward, setup_context=_grad_quant_setup)


# --- dropout ------------------------------------------------------------------------------------


def _check_dropout_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fqt::dropout: p must be in [0, 1], got {p}")


def dropout_keep(seed: Tensor, shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    """The 0/1 keep mask of :func:`dropout` in ``dtype``: element ``i`` (row-major index) is kept
    where the counter-based draw ``u_i`` (:func:`fqt_compile.rng.uniform_from_seed`) is at
    least ``p``, so with probability ``1 - p`` up to the draws' 2**-24 resolution."""
    return (uniform_from_seed(seed, shape) >= p).to(dtype)


@functools.lru_cache(maxsize=64)
def keep_threshold(p: float) -> int:
    """The least 24-bit integer ``k`` whose draw ``k * 2**-24`` :func:`dropout_keep` keeps
    (``>= p`` as torch compares a float32 tensor with ``p``): the C kernels that drop out on the
    way compare the draw's integer with it. ``2**24`` keeps nothing."""
    lo, hi = 0, 2**24
    while lo < hi:  # the comparison is monotone in k
        mid = (lo + hi) // 2
        if bool((torch.tensor([mid * 2.0**-24], dtype=torch.float32) >= p)[0]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@torch.library.custom_op(f"{_LIB}::dropout", mutates_args=())
def dropout(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """``x * keep / (1 - p)`` with ``keep`` = :func:`dropout_keep` of ``seed`` (a 0-d int64
    tensor from ``fqt::new_seed``), and 0 for ``p == 1``: the values of ``F.dropout`` (which
    computes ``x * mask * scale`` too, so NaN and Inf propagate the same way), with a mask that
    is a pure function of ``(seed, index)``. Its gradient is the same op on the gradient with the
    same seed: the backward keeps an 8-byte seed, not a mask, and recomputes the mask where it
    needs it (``passes/decompose_fqt.py`` inlines both into inductor's loops). Used for the
    attention dropout of quantized SDPA (``functional.sdpa_with``)."""
    _check_dropout_p(p)
    if p == 1.0:
        return x * 0.0
    return x * dropout_keep(seed.to(x.device), x.shape, p, x.dtype) * (1.0 / (1.0 - p))


@dropout.register_fake
def _(x, seed, p):
    _check_dropout_p(p)
    return torch.empty_like(x)


def _dropout_setup(ctx, inputs, output):
    _, seed, ctx.p = inputs
    ctx.save_for_backward(seed)


def _dropout_backward(ctx, grad: Tensor):
    (seed,) = ctx.saved_tensors
    return torch.ops.fqt.dropout(grad, seed, ctx.p), None, None


dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup)


fqt_ops = (
    quantize,
    dequantize,
    fake_quant,
    sr_quantize,
    bhq_plan,
    bhq_transform,
    bhq_inverse,
    hadamard,
    hadamard_inverse,
    grad_quant,
    dropout,
)
