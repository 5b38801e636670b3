"""Quantized products with the paper's backward: what ``passes.insert_qdq`` puts in graphs.

Layer ``H = F(Q_f(X), Q_w(W))`` with ``G = dL/dH``::

    output      : H      = F(X~, W~)                    X~ = Q_f(X), W~ = Q_w(W)  (round to nearest)
    grad_input  : dL/dX  = J_X^T Q_b1(G)                 e.g. linear: Q_b1(G) @ W~
    grad_weight : dL/dW  = J_W^T Q_b2(G)                 e.g. linear: Q_b2(G)^T @ X~

Q_b1 and Q_b2 are independent unbiased stochastic quantizers of the same G, so the expected
FQT gradient equals the QAT gradient (straight-through Q_f, Q_w). With both set to ``"none"``
this is QAT.

Each product is a ``torch.autograd.Function`` whose forward and backward are written with the
``fqt::`` ops: traced by AOTAutograd, the forward quantizers land in the forward graph and the
gradient quantizers (``fqt::sr_quantize`` and friends) in the backward graph, where passes and
tests can see them. The backward keeps int8 codes (plus scales) of the operands, not float
copies. Every option is a plain value (:class:`QSpec` is a tuple of ints and strings) so that
FX graphs holding these calls print, pickle and hash.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor
import torch.fx.traceback as fx_traceback
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from .config import FQTConfig, Mode
from . import gemm as _gemm  # noqa: F401  (registers fqt::qmm, fqt::int_mm)
from . import quantizers as Q
from .ops import estimate_grad, grad_codes
from .rng import DROPOUT_STREAM, new_seed

__all__ = ["QSpec", "qspec_from_config", "fqt_linear", "fqt_conv", "fqt_matmul", "fqt_sdpa", "fqt_dropout",
           "fqt_multi_head_attention", "activations_spec", "mha_with"]


class QSpec(NamedTuple):
    """Plain-value quantizer settings of one product (see :class:`fqt_compile.FQTConfig`).

    ``a_*``: the first operand (``input``); ``b_*``: the second (``weight`` for linear and
    conv; for a product of two activations the ``input`` quantizer again). ``gi_*``: Q_b1,
    reaching the first operand's gradient; ``gw_*``: Q_b2, reaching the second operand's.
    ``*_gran``: ``"tensor"`` or ``"channel"``; ``*_kind``: a gradient quantizer or ``"none"``.
    """

    a_bits: int = 8
    a_scheme: str = "affine_zero"
    a_gran: str = "tensor"
    b_bits: int = 8
    b_scheme: str = "affine_zero"
    b_gran: str = "tensor"
    gi_kind: str = "psq"
    gi_bits: int = 8
    gi_block: int = 16
    gw_kind: str = "column"
    gw_bits: int = 8
    gw_block: int = 16
    name: str = ""  # module path, for GEMM tags ("<name>:output" ...)

    def describe(self) -> str:
        s = f"a={self.a_bits}b/{self.a_gran} b={self.b_bits}b/{self.b_gran}"
        if self.gi_kind == "none" and self.gw_kind == "none":
            return s + " (qat: exact gradients)"
        return s + f" Q_b1={self.gi_kind}{self.gi_bits} Q_b2={self.gw_kind}{self.gw_bits}"


def qspec_from_config(cfg: FQTConfig, *, second_is_weight: bool = True, name: str = "") -> QSpec:
    """The :class:`QSpec` of a product under a resolved config (``mode`` fqt or qat)."""
    if cfg.mode is Mode.OFF:
        raise ValueError("qspec_from_config: mode 'off' has no quantizers")
    a = cfg.input
    b = cfg.weight if second_is_weight else cfg.input
    fqt = cfg.mode is Mode.FQT
    gi, gw = cfg.grad_input, cfg.grad_weight
    return QSpec(
        a.bits, a.scheme, a.granularity.value,
        b.bits, b.scheme, b.granularity.value,
        gi.kind.value if fqt else "none", gi.bits, gi.hadamard_block,
        gw.kind.value if fqt else "none", gw.bits, gw.hadamard_block, name,
    )  # fmt: skip


def _quantize(x: Tensor, bits: int, scheme: str, gran: str, axis: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fqt.quantize(x, bits, scheme, gran, axis)


def _dequantize(codes: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.ops.fqt.dequantize(codes, scale, offset, dtype)


def _fake_operand(x: Tensor, bits: int, scheme: str, gran: str, axis: int) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``(X~, saved)``: the dequantized operand and the int8 codes + scales kept for backward."""
    codes, scale, offset = _quantize(x, bits, scheme, gran, axis)
    return _dequantize(codes, scale, offset, x.dtype), (codes, scale, offset)


def _qmm(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor], a_bits: int, b_bits: int, tag: str) -> Tensor:
    return torch.ops.fqt.qmm(*a, *b, a_bits, b_bits, tag)


def _scale_2d(t: Tensor) -> Tensor:
    """A forward-quantizer scale/offset as a 2-D broadcastable tensor: () stays (); a
    per-channel one (ones but one axis) becomes a row (1, C)."""
    return t if t.dim() == 0 else t.reshape(1, -1)


def _grad_operand_t(g2d: Tensor, kind: str, bits: int, block: int) -> tuple[tuple[Tensor, Tensor, Tensor], int]:
    """Q(G)^T as the left operand of a grad_weight GEMM (contraction over G's rows), and the
    operand's bit-width (0 when it is a float estimate, not codes). A transform that mixes
    G's rows (BHQ, Hadamard) acts on the contracted axis, so its estimate is formed in float:
    such a GEMM stays simulated."""
    (codes, scale, offset), post = grad_codes(g2d, kind, bits, block)
    if post is None and codes.dtype == torch.int8:
        return (codes.t(), scale.t() if scale.dim() else scale, offset.t() if offset.dim() else offset), bits
    est, one, zero = _float_operand((codes, scale, offset), post)
    return (est.t(), one, zero), 0


def _float_operand(q: tuple[Tensor, Tensor, Tensor], post: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """A gradient estimate formed in float (dequantized, ``post`` applied) as a GEMM operand
    with scale 1 and offset 0: a product that contracts over the axis ``post`` mixes, or
    anything else that cannot take the codes directly (its GEMM stays simulated)."""
    est = torch.ops.fqt.dequantize(*q, torch.float32)
    if post is not None:
        est = post(est)
    one = est.new_ones(())
    return est, one, one * 0


def folds_weight_scale(p: QSpec) -> bool:
    """True if ``grad_input`` folds the weight's per-output-channel scales into the gradient
    before Q_b1 (DESIGN.md section 4): with per-channel *symmetric* weights W~ = diag(s) C
    exactly, so ``G @ W~ = (G diag(s)) @ C`` and the product ``Q_b1(G diag(s)) @ C`` is an
    unbiased estimate with no scale on the contracted axis (an integer GEMM). Q_b1 then sees
    G with its columns scaled by s. Per-channel affine weights (a per-channel offset on the
    contracted axis) are not folded: their grad_input stays simulated, with the reason."""
    return p.b_gran == "channel" and p.b_scheme == "symmetric" and p.gi_kind != "none"


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------


class _FQTLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, spec: QSpec) -> Tensor:  # type: ignore[override]
        p = spec
        # per-channel input ranges are per input feature (last dim); weight: per output row
        xc, xs, xo = _quantize(x, p.a_bits, p.a_scheme, p.a_gran, -1)
        wc, ws, wo = _quantize(weight, p.b_bits, p.b_scheme, p.b_gran, 0)
        in_f = weight.shape[1]
        # output = X~ @ W~^T (+ b)        (N, in) @ (in, out), contraction over in_features
        out = _qmm(
            (xc.reshape(-1, in_f), _scale_2d(xs), _scale_2d(xo)),
            (wc.t(), _scale_2d(ws), _scale_2d(wo)),
            p.a_bits, p.b_bits, f"{p.name}:output",
        )
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(xc, xs, xo, wc, ws, wo)
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        p: QSpec = ctx.spec
        xc, xs, xo, wc, ws, wo = ctx.saved_tensors
        out_f, in_f = wc.shape
        grad_x = grad_w = grad_b = None
        g2d = grad_output.reshape(-1, out_f)  # (N, out), a row per token
        if ctx.needs_input_grad[0]:
            if folds_weight_scale(p):
                # grad_input = Q_b1(G diag(s_w)) @ C_w   (per-channel symmetric weights, folded)
                g1, post = grad_codes(g2d * ws.reshape(1, -1), p.gi_kind, p.gi_bits, p.gi_block)
                one = ws.new_ones(())
                w_op = (wc, one, one * 0)
            else:
                g1, post = grad_codes(g2d, p.gi_kind, p.gi_bits, p.gi_block)  # Q_b1(G)
                w_op = (wc, ws.reshape(-1, 1) if ws.dim() else ws, wo.reshape(-1, 1) if wo.dim() else wo)
            g_bits = p.gi_bits if g1[0].dtype == torch.int8 else 0
            # grad_input = Q_b1(G) @ W~        (N, out) @ (out, in), contraction over out_features
            gx = _qmm(g1, w_op, g_bits, p.b_bits, f"{p.name}:grad_input")
            if post is not None:
                gx = post(gx)
            grad_x = gx.reshape(*grad_output.shape[:-1], in_f).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2t, g_bits = _grad_operand_t(g2d, p.gw_kind, p.gw_bits, p.gw_block)  # Q_b2(G)^T
            # grad_weight = Q_b2(G)^T @ X~     (out, N) @ (N, in), contraction over tokens
            grad_w = _qmm(g2t, (xc.reshape(-1, in_f), _scale_2d(xs), _scale_2d(xo)),
                          g_bits, p.a_bits, f"{p.name}:grad_weight").to(grad_output.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)  # not a GEMM: exact
        return grad_x, grad_w, grad_b, None


def fqt_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, spec: QSpec = QSpec()) -> Tensor:
    """``F.linear`` with FQT numerics (see module docstring)."""
    return _FQTLinear.apply(x, weight, bias, spec)


# ---------------------------------------------------------------------------------------------
# convolution (1d/2d/3d, zero padding, groups, stride, dilation)
# ---------------------------------------------------------------------------------------------


def _shaped_like(t: Tensor, shape: torch.Size) -> Tensor:
    """A scale/offset of an (N, D) row view of a tensor of ``shape``, made broadcastable to
    ``shape``: () stays (); per row (N, 1) -> (N, 1, ...); per column (1, D) -> (1, *shape[1:])."""
    if t.dim() == 0:
        return t
    if t.numel() == 1:
        return t.reshape([1] * len(shape))
    if t.shape[0] == 1:
        return t.reshape(1, *shape[1:])
    return t.reshape(shape[0], *([1] * (len(shape) - 1)))


def _conv_grad_operand(grad: Tensor, kind: str, bits: int, block: int, *, allow_post: bool):
    """Q(G) of a conv gradient (rows = samples) as a conv-GEMM operand, shaped like ``G``:
    ``((codes, scale, offset), post, bits)``. ``post`` (BHQ/Hadamard's inverse, mixing
    samples) is returned when ``allow_post`` (grad_input: conv_transpose acts on each sample
    with the same weights, so the inverse commutes with it); otherwise the estimate is formed
    in float here (grad_weight contracts over samples) and ``bits`` is 0."""
    (codes, scale, offset), post = grad_codes(Q.as_rows(grad, 1), kind, bits, block)
    if codes.dtype == torch.int8 and (post is None or allow_post):
        shape = grad.shape
        return (codes.reshape(shape), _shaped_like(scale, shape), _shaped_like(offset, shape)), post, bits
    est, one, zero = _float_operand((codes, scale, offset), post)
    return (est.reshape(grad.shape), one, zero), None, 0


def _conv_forward_end(ctx: Any, out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                      saved: tuple[Tensor, ...], conf: tuple[Any, ...]) -> Tensor:
    """The end of a convolution function's forward (plain or transposed): the bias, what the
    backward keeps (codes, scales and offsets of both operands; the geometry and spec), and
    the output in the input's dtype."""
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * (out.dim() - 2)))
    ctx.save_for_backward(*saved)
    ctx.conf = conf
    ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
    ctx.has_bias = bias is not None
    return out.to(x.dtype)


def _fold_weight_scale(grad_output: Tensor, w_op: tuple[Tensor, Tensor, Tensor], p: QSpec,
                       groups: int = 1) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """A convolution's ``grad_input`` operands: (G, the weight's codes, scale, offset), or,
    where :func:`folds_weight_scale`, G with its channels scaled by the weight's per-channel
    scales (repeated ``groups`` times) and the weight's codes with scale 1 and offset 0."""
    if not folds_weight_scale(p):
        return grad_output, w_op
    wc, ws, _ = w_op
    s_c = ws.reshape(-1).repeat(groups)
    one = ws.new_ones(())
    return grad_output * s_c.reshape(1, -1, *([1] * (grad_output.dim() - 2))), (wc, one, one * 0)


def _channel_sum(grad_output: Tensor) -> Tensor:
    """A convolution's bias gradient: the output gradient summed over all but the channels."""
    return grad_output.sum(dim=[d for d in range(grad_output.dim()) if d != 1])


class _FQTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, spec: QSpec):  # type: ignore[override]
        p = spec
        xc, xs, xo = _quantize(x, p.a_bits, p.a_scheme, p.a_gran, 1)
        wc, ws, wo = _quantize(weight, p.b_bits, p.b_scheme, p.b_gran, 0)
        # output = conv(X~, W~) + b        contraction over in_channels x kernel window
        out = torch.ops.fqt.qconv(xc, xs, xo, wc, ws, wo, p.a_bits, p.b_bits, stride, padding, dilation,
                                  groups, f"{p.name}:output")
        return _conv_forward_end(ctx, out, x, weight, bias, (xc, xs, xo, wc, ws, wo),
                                 (stride, padding, dilation, groups, spec))

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        stride, padding, dilation, groups, p = ctx.conf
        xc, xs, xo, wc, ws, wo = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        # Gradient rows are samples: G viewed as (batch, C_out * spatial).
        if ctx.needs_input_grad[0]:
            # conv_transpose(Q_b1(G * s_w[channel]), C_w) where the scales fold
            g, w_op = _fold_weight_scale(grad_output, (wc, ws, wo), p)
            g1, post, g_bits = _conv_grad_operand(g, p.gi_kind, p.gi_bits, p.gi_block, allow_post=True)
            # grad_input = conv_transpose(Q_b1(G), W~)
            gx = torch.ops.fqt.qconv_grad_input(*g1, *w_op, g_bits, p.b_bits, list(xc.shape), stride,
                                                padding, dilation, groups, f"{p.name}:grad_input")
            if post is not None:
                gx = post(gx.reshape(gx.shape[0], -1)).reshape(gx.shape)
            grad_x = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2, _, g_bits = _conv_grad_operand(grad_output, p.gw_kind, p.gw_bits, p.gw_block, allow_post=False)
            # grad_weight = correlate(X~, Q_b2(G))   contraction over batch x output positions
            grad_w = torch.ops.fqt.qconv_grad_weight(*g2, xc, xs, xo, g_bits, p.a_bits, list(wc.shape), stride,
                                                     padding, dilation, groups, f"{p.name}:grad_weight")
            grad_w = grad_w.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _channel_sum(grad_output)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _tuple(v: int | Sequence[int], n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(i) for i in v]


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[int] | None:
    """Symmetric padding equal to ``padding='same'`` for stride 1, or None if it would need
    asymmetric padding (even effective kernel)."""
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return pads


def fqt_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    spec: QSpec = QSpec(),
) -> Tensor:
    """``F.conv{1,2,3}d`` (zero padding) with FQT numerics."""
    n = weight.dim() - 2
    stride_l, dilation_l = _tuple(stride, n), _tuple(dilation, n)
    if isinstance(padding, str):
        if padding == "valid":
            padding_l = [0] * n
        elif padding == "same":
            pads = same_padding(weight.shape[2:], dilation_l)
            if pads is None:
                raise NotImplementedError("fqt_conv: padding='same' with an even kernel needs asymmetric padding")
            padding_l = pads
        else:
            raise ValueError(f"fqt_conv: padding must be 'same', 'valid' or ints, got {padding!r}")
    else:
        padding_l = _tuple(padding, n)
    return _FQTConv.apply(x, weight, bias, stride_l, padding_l, dilation_l, int(groups), spec)


class _FQTConvTranspose(torch.autograd.Function):
    """The transposed convolution ``Y = conv_transpose(X~, W~)`` is the grad_input GEMM of the
    convolution whose weight ``W`` is (input channels = Y's, output channels = X's), so its three
    GEMMs are that convolution's with the roles exchanged: the output runs as
    ``fqt::qconv_grad_input``, ``grad_input = conv(Q_b1(G), W~)`` as ``fqt::qconv`` and
    ``grad_weight = correlate(Q_b2(G), X~)`` as ``fqt::qconv_grad_weight`` with X~ in the
    gradient's place. Per-channel weights are ranged per output channel of the transposed
    convolution (dim 1 of W); symmetric ones fold their scales into ``grad_input``'s gradient
    before Q_b1, as a convolution's do (:func:`folds_weight_scale`). GEMM tags are
    ``<module>[transposed]:<gemm>``, ``<gemm>`` the product's own GEMM (the lowering names the
    operands' roles from it; the inspection report drops the bracket)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation,  # type: ignore[override]
                spec: QSpec):
        p = spec
        xc, xs, xo = _quantize(x, p.a_bits, p.a_scheme, p.a_gran, 1)
        wc, ws, wo = _quantize(weight, p.b_bits, p.b_scheme, p.b_gran, 1)
        geometry = zip(x.shape[2:], stride, padding, dilation, weight.shape[2:], output_padding)
        spatial = [(n - 1) * s - 2 * pd + d * (k - 1) + op + 1 for n, s, pd, d, k, op in geometry]
        out_shape = [x.shape[0], weight.shape[1] * groups, *spatial]
        out = torch.ops.fqt.qconv_grad_input(xc, xs, xo, wc, ws, wo, p.a_bits, p.b_bits, out_shape, stride, padding,
                                             dilation, groups, f"{p.name}[transposed]:output")
        return _conv_forward_end(ctx, out, x, weight, bias, (xc, xs, xo, wc, ws, wo),
                                 (stride, padding, dilation, groups, spec))

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        stride, padding, dilation, groups, p = ctx.conf
        xc, xs, xo, wc, ws, wo = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # conv(Q_b1(G * s_w[channel]), C_w) where the scales fold; W's dim 1 is G's channel
            # within its group, so each group's channels take the scales
            g, w_op = _fold_weight_scale(grad_output, (wc, ws, wo), p, groups)
            g1, post, g_bits = _conv_grad_operand(g, p.gi_kind, p.gi_bits, p.gi_block, allow_post=True)
            # grad_input = conv(Q_b1(G), W~): a convolution acts on each sample with the same
            # weights, so a BHQ/Hadamard inverse commutes with it
            gx = torch.ops.fqt.qconv(*g1, *w_op, g_bits, p.b_bits, stride, padding, dilation, groups,
                                     f"{p.name}[transposed]:grad_input")
            if post is not None:
                gx = post(gx.reshape(gx.shape[0], -1)).reshape(gx.shape)
            grad_x = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2, _, g_bits = _conv_grad_operand(grad_output, p.gw_kind, p.gw_bits, p.gw_block, allow_post=False)
            # grad_weight = correlate(Q_b2(G), X~): contraction over batch x X's positions
            grad_w = torch.ops.fqt.qconv_grad_weight(xc, xs, xo, *g2, p.a_bits, g_bits, list(wc.shape), stride,
                                                     padding, dilation, groups, f"{p.name}[transposed]:grad_weight")
            grad_w = grad_w.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _channel_sum(grad_output)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def fqt_conv_transpose(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
    *,
    spec: QSpec = QSpec(),
) -> Tensor:
    """``F.conv_transpose{1,2,3}d`` with FQT numerics (arguments in their order; see
    :class:`_FQTConvTranspose`)."""
    n = weight.dim() - 2
    return _FQTConvTranspose.apply(x, weight, bias, _tuple(stride, n), _tuple(padding, n), _tuple(output_padding, n),
                                   int(groups), _tuple(dilation, n), spec)


# ---------------------------------------------------------------------------------------------
# matmul between activations (or activation x parameter without a Linear module)
# ---------------------------------------------------------------------------------------------


def _scale_nd(t: Tensor, nd: int) -> Tensor:
    return t if t.dim() == 0 else t.reshape(*([1] * (nd - 1)), -1)


def _rows_to(t: Tensor, batch: int) -> Tensor:
    """A per-row scale/offset of a 2-D (batch*M, N) view as (batch, M, 1) (or () / (1, 1, N))."""
    if t.dim() == 0:
        return t
    if t.shape[0] == 1:  # per column: (1, N)
        return t.reshape(1, 1, -1)
    return t.reshape(batch, -1, 1)


class _FQTMatmul(torch.autograd.Function):
    """``A @ B`` with both operands quantized. Two layouts reach the GEMM op:
    ``B`` 2-D (``A`` flattened to rows, as in a linear layer) or batched 3-D after
    broadcasting the batch dims (attention: scores Q @ K^T and values P @ V)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, spec: QSpec) -> Tensor:  # type: ignore[override]
        p = spec
        ac, as_, ao = _quantize(a, p.a_bits, p.a_scheme, p.a_gran, -1)
        bc, bs, bo = _quantize(b, p.b_bits, p.b_scheme, p.b_gran, -1)
        k, n = b.shape[-2], b.shape[-1]
        if b.dim() == 2:
            lead = a.shape[:-1]
            a_op = (ac.reshape(-1, k), _scale_nd(as_, 2), _scale_nd(ao, 2))
            b_op = (bc, _scale_nd(bs, 2), _scale_nd(bo, 2))
            out_shape = (*lead, n)
            batch = None
        else:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            ac3 = ac.expand(*batch, *a.shape[-2:]).reshape(-1, a.shape[-2], k)
            bc3 = bc.expand(*batch, k, n).reshape(-1, k, n)
            a_op = (ac3, _scale_nd(as_, 3), _scale_nd(ao, 3))
            b_op = (bc3, _scale_nd(bs, 3), _scale_nd(bo, 3))
            out_shape = (*batch, a.shape[-2], n)
        # output = A~ @ B~     contraction over K
        out = _qmm(a_op, b_op, p.a_bits, p.b_bits, f"{p.name}:output")
        ctx.save_for_backward(*a_op, *b_op)
        ctx.spec = spec
        ctx.meta = (a.shape, b.shape, a.dtype, b.dtype, batch)
        return out.reshape(out_shape).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        p: QSpec = ctx.spec
        a_shape, b_shape, a_dtype, b_dtype, batch = ctx.meta
        ac, as_, ao, bc, bs, bo = ctx.saved_tensors
        n = b_shape[-1]
        g2d = grad_output.reshape(-1, n)  # a row per output row of every batch
        grad_a = grad_b = None
        nb = ac.shape[0] if batch is not None else 1
        if ctx.needs_input_grad[0]:
            if batch is not None and p.gi_kind in ("bhq", "hadamard"):
                # The transform mixes rows of different batch entries, which meet different
                # right operands: T^-1 does not commute with the batched product. Form the
                # float estimate first (this GEMM stays simulated).
                g = estimate_grad(g2d, p.gi_kind, p.gi_bits, block=p.gi_block)
                g1, post = (g, g.new_ones(()), g.new_zeros(())), None
            else:
                g1, post = grad_codes(g2d, p.gi_kind, p.gi_bits, p.gi_block)  # Q_b1(G)
            g_bits = p.gi_bits if g1[0].dtype == torch.int8 else 0
            if batch is None:
                b_t = (bc.t(), bs.t() if bs.dim() else bs, bo.t() if bo.dim() else bo)
            else:
                g1 = (g1[0].reshape(nb, -1, n), _rows_to(g1[1], nb), _rows_to(g1[2], nb))
                b_t = (bc.transpose(1, 2), bs.transpose(1, 2) if bs.dim() else bs, bo.transpose(1, 2) if bo.dim() else bo)
            # grad_a = Q_b1(G) @ B~^T      contraction over N
            ga = _qmm(g1, b_t, g_bits, p.b_bits, f"{p.name}:grad_input")
            if post is not None:
                ga = post(ga.reshape(-1, ga.shape[-1]))
            grad_a = ga.reshape(*(a_shape[:-2] if batch is None else batch), a_shape[-2], a_shape[-1])
            grad_a = grad_a.sum_to_size(a_shape).to(a_dtype)
        if ctx.needs_input_grad[1]:
            if batch is None:
                g2, g_bits = _grad_operand_t(g2d, p.gw_kind, p.gw_bits, p.gw_block)
                # grad_b = A~^T @ Q_b2(G)  computed as (Q_b2(G)^T @ A~)^T, contraction over rows
                gb = _qmm(g2, (ac, as_, ao), g_bits, p.a_bits, f"{p.name}:grad_weight").t()
            else:
                (codes, scale, offset), post = grad_codes(g2d, p.gw_kind, p.gw_bits, p.gw_block)
                g_bits = p.gw_bits
                if post is not None or codes.dtype != torch.int8 or codes.shape[0] != g2d.shape[0]:
                    (codes, scale, offset), g_bits = _float_operand((codes, scale, offset), post), 0
                g2 = (codes.reshape(nb, -1, n), _rows_to(scale, nb), _rows_to(offset, nb))
                a_t = (ac.transpose(1, 2), as_.transpose(1, 2) if as_.dim() else as_, ao.transpose(1, 2) if ao.dim() else ao)
                # grad_b = A~^T @ Q_b2(G)      contraction over M
                gb = _qmm(a_t, g2, p.a_bits, g_bits, f"{p.name}:grad_weight")
                gb = gb.reshape(*batch, b_shape[-2], n)
            grad_b = gb.sum_to_size(b_shape).to(b_dtype)
        return grad_a, grad_b, None


def matvec_with(matmul: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` through ``matmul`` of operands with at least 2 dims: a vector
    operand as a one-row (first) or one-column (second) matrix, that dim removed from the
    result, as ``torch.matmul`` does. Two vectors (a dot product) are not covered."""
    if a.dim() < 2 and b.dim() < 2:
        raise NotImplementedError("fqt: the dot product of two vectors is not covered")
    if b.dim() == 1:
        return matmul(a, b.unsqueeze(-1)).squeeze(-1)
    if a.dim() == 1:
        return matmul(a.unsqueeze(0), b).squeeze(-2)
    return matmul(a, b)


def fqt_matmul(a: Tensor, b: Tensor, *, spec: QSpec = QSpec()) -> Tensor:
    """``torch.matmul`` (and ``torch.mv``) with FQT numerics: a vector operand is a one-row or
    one-column matrix (:func:`matvec_with`), so a vector weight has one scale."""
    return matvec_with(lambda x, y: _FQTMatmul.apply(x, y, spec), a, b)


def addmm_with(matmul: Callable[[Tensor, Tensor], Tensor], bias: Tensor, a: Tensor, b: Tensor,
               beta: float = 1, alpha: float = 1) -> Tensor:
    """``beta * bias + alpha * matmul(a, b)``: the scaled add stays in full precision."""
    out = matmul(a, b)
    if alpha != 1:
        out = out * alpha
    if beta == 0:
        return out
    return out + (bias if beta == 1 else beta * bias)


def fqt_addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: float = 1, alpha: float = 1, spec: QSpec = QSpec()) -> Tensor:
    """``torch.addmm``/``baddbmm``: ``beta * bias + alpha * (a @ b)``; the product is FQT."""
    return addmm_with(lambda x, y: fqt_matmul(x, y, spec=spec), bias, a, b, beta, alpha)


# ---------------------------------------------------------------------------------------------
# torch.einsum of two operands
# ---------------------------------------------------------------------------------------------


class EinsumPlan(NamedTuple):
    """A two-operand einsum as one (batched) product: index letters of the operands and the
    output (ellipses expanded), and the letters' roles: ``batch`` (in both operands and the
    output), ``m`` (first operand and output), ``n`` (second operand and output), ``k``
    (contracted: in both operands, not in the output)."""

    a: str
    b: str
    out: str
    batch: str
    m: str
    n: str
    k: str


def einsum_plan(equation: str, a_dim: int, b_dim: int) -> EinsumPlan | str:
    """The :class:`EinsumPlan` of ``torch.einsum(equation, a, b)`` for operands of ``a_dim`` and
    ``b_dim`` dimensions, or why it is not one product that fqt covers (a string)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return f"einsum of {len(ops)} operand{'s' * (len(ops) != 1)} is not covered (two operands: one product)"
    used = set(eq) - set(".,->")
    if not all(c.isalpha() for c in used):
        return f"einsum equation {equation!r} not understood"
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    ell_dims = []
    for spec, dim in zip(ops, (a_dim, b_dim)):
        named = len(spec.replace("...", ""))
        if spec.count("...") > 1 or ("..." not in spec and named != dim) or named > dim:
            return f"einsum equation {equation!r} does not fit operands of {a_dim} and {b_dim} dimensions"
        ell_dims.append(dim - named if "..." in spec else 0)
    width = max(ell_dims)
    ell = "".join(spare[:width])  # right-aligned, as the ellipses broadcast
    a, b = (spec.replace("...", ell[width - d:]) for spec, d in zip(ops, ell_dims))
    if not arrow:  # implicit output: the ellipsis, then the letters that occur once, sorted
        once = sorted(c for c in used if (a + b).count(c) == 1)
        out = ell + "".join(once)
    else:
        if "..." not in out and width and any(d for d in ell_dims):
            return f"einsum equation {equation!r} sums over its ellipsis dimensions: not covered"
        out = out.replace("...", ell)
    if any(spec.count(c) > 1 for spec in (a, b, out) for c in spec):
        return "einsum with an index repeated in one operand (a diagonal) is not covered"
    if any(c not in a and c not in b for c in out):
        return f"einsum equation {equation!r}: an output index is in no operand"
    if any(c not in b and c not in out for c in a) or any(c not in a and c not in out for c in b):
        return "einsum that sums an index of one operand alone is not covered"
    k = "".join(c for c in a if c in b and c not in out)
    m = "".join(c for c in out if c in a and c not in b)
    n = "".join(c for c in out if c in b and c not in a)
    if not k:
        return "einsum without a contracted index (an elementwise or outer product) is not covered"
    if not m and not n:
        return "einsum that is a vector product (no free index on either side) is not covered"
    batch = "".join(c for c in out if c in a and c in b)
    return EinsumPlan(a, b, out, batch, m, n, k)


def einsum_with(matmul: Callable[[Tensor, Tensor], Tensor], equation: str, a: Tensor, b: Tensor) -> Tensor:
    """``torch.einsum(equation, a, b)`` as one ``matmul``: ``a`` permuted and reshaped to
    (batch..., M, K), ``b`` to (batch..., K, N), the product (batch dims broadcast as in
    ``torch.matmul``) reshaped and permuted to the output's order. The plan must be one
    (:func:`einsum_plan`)."""
    plan = einsum_plan(equation, a.dim(), b.dim())
    if isinstance(plan, str):
        raise NotImplementedError(f"einsum {equation!r}: {plan}")
    size = {c: a.shape[i] for i, c in enumerate(plan.a)}
    for i, c in enumerate(plan.b):
        if c not in size or size[c] == 1:
            size[c] = b.shape[i]

    def numel(letters: str) -> Any:
        out = 1
        for c in letters:
            out = out * size[c]
        return out

    def operand(t: Tensor, spec: str, first: str, second: str) -> Tensor:
        if any(t.shape[spec.index(c)] == 1 != size[c] for c in plan.k):  # a size-1 contracted index broadcasts
            t = t.expand(*[size[c] if c in plan.k else -1 for c in spec])
        t = t.permute([spec.index(c) for c in plan.batch + first + second])
        lead = [t.shape[i] for i in range(len(plan.batch))]  # its own sizes: they may broadcast
        return t.reshape(*lead, numel(first), numel(second))

    prod = matmul(operand(a, plan.a, plan.m, plan.k), operand(b, plan.b, plan.k, plan.n))
    order = plan.batch + plan.m + plan.n
    prod = prod.reshape(*[size[c] for c in order])
    return prod.permute([order.index(c) for c in plan.out])


def fqt_einsum(equation: str, a: Tensor, b: Tensor, *, spec: QSpec = QSpec()) -> Tensor:
    """``torch.einsum`` of two operands as one FQT product (:func:`einsum_with` around
    :func:`fqt_matmul`; ``b`` is the weight where ``spec`` says the second operand is one)."""
    return einsum_with(lambda x, y: fqt_matmul(x, y, spec=spec), equation, a, b)


def fqt_addbmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: float = 1, alpha: float = 1,
               spec: QSpec = QSpec()) -> Tensor:
    """``torch.addbmm``: ``beta * bias + alpha * sum_i a[i] @ b[i]``, the sum over the batch one
    FQT product (the batch joins the contraction: :func:`fqt_einsum` of ``"bnk,bkp->np"``)."""
    return addmm_with(lambda x, y: fqt_einsum("bnk,bkp->np", x, y, spec=spec), bias, a, b, beta, alpha)


def fqt_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout`` through ``fqt::dropout`` (a counter-based mask of a fresh seed, which the
    backward keeps instead of the mask); ``inplace`` is not supported (insert_qdq leaves such
    calls to torch)."""
    if inplace:
        raise NotImplementedError("fqt_dropout: inplace dropout is left to torch")
    if not training or p == 0:
        return input
    return torch.ops.fqt.dropout(input, new_seed(input.device, DROPOUT_STREAM), float(p))


def _mask_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``keep``, -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def sdpa_with(
    matmul: Callable[[Tensor, Tensor, str], Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    mask_as_bias: bool = True,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.scaled_dot_product_attention`` decomposed around a product ``matmul(a, b, which)``
    (``which``: ``"q@k"`` or ``"p@v"``)::

        scores = (Q @ K^T) * scale + mask;  P = softmax(scores);  out = P @ V

    softmax, masking and dropout stay in full precision. ``mask_as_bias``: apply boolean
    masks as an added 0 / -inf bias (the backward reads no mask) rather than with
    ``masked_fill``; the two give the same values and gradients. ``return_weights``: return
    ``(out, P)``, ``P`` the float probabilities after dropout, as the product reads them
    before its quantizer (nn.MultiheadAttention's ``need_weights``).
    """
    L, S = query.shape[-2], key.shape[-2]
    scale_f = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = matmul(query, key.transpose(-2, -1), "q@k") * scale_f
    # Boolean masks are added as a 0 / -inf bias (as PyTorch's own math attention does), not
    # applied with masked_fill: the gradient of an addition needs no mask, so the backward
    # does not read one. The masked positions' gradient is still exactly zero: softmax's
    # backward multiplies by P, which is 0 there. (A masked load per element was the hottest
    # instruction sequence of the compiled softmax backward: inductor's C++ converts a bool
    # vector element by element.) insert_qdq turns this off where the attention is
    # recomputed in the backward (config.sdpa="recompute"): there the bias form led inductor
    # to run the recomputed score GEMM next to the backward's and keep both products and
    # their float forms alive together (peak step memory of a GPT block 577 -> 973 MB).
    def masked(scores: Tensor, keep: Tensor) -> Tensor:
        return scores + _mask_bias(keep, scores.dtype) if mask_as_bias else scores.masked_fill(~keep, float("-inf"))

    if is_causal:
        scores = masked(scores, torch.ones(L, S, dtype=torch.bool, device=query.device).tril())
    if attn_mask is not None:
        scores = masked(scores, attn_mask) if attn_mask.dtype == torch.bool else scores + attn_mask
    attn = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        # the counter-based dropout (fqt::dropout): F.dropout's values with a mask that is a
        # function of a seed, so that the backward keeps the seed and recomputes the mask in
        # its loops; inductor's own dropout on CPU draws each element with a scalar Philox
        # call and saves a bool mask (a one-block GPT step with attention dropout 0.1 took
        # twice as long as without, docs/performance.md)
        attn = fqt_dropout(attn, dropout_p)
    out = matmul(attn, value, "p@v")
    return (out, attn) if return_weights else out


def fqt_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    spec: QSpec = QSpec(),
    mask_as_bias: bool = True,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.scaled_dot_product_attention`` with both products FQT (see :func:`sdpa_with`); the
    GEMM tags name them ``<module>[q@k]`` and ``<module>[p@v]``."""

    def matmul(a: Tensor, b: Tensor, which: str) -> Tensor:
        return fqt_matmul(a, b, spec=spec._replace(name=f"{spec.name}[{which}]"))

    return sdpa_with(matmul, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, mask_as_bias,
                     return_weights)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention (F.multi_head_attention_forward)
# ---------------------------------------------------------------------------------------------


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask of nn.MultiheadAttention (True: *not* attended) as the additive
    float mask it stands for; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_with(
    linear: Callable[[Tensor, Tensor, Tensor | None, str], Tensor],
    attention: Callable[[Tensor, Tensor, Tensor, Tensor | None, float, bool, bool], tuple[Tensor, Tensor | None]],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    is_causal: bool = False,
    need_weights: bool = False,
    average_attn_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` (without ``bias_k``/``bias_v``, ``add_zero_attn``,
    ``static_k``/``static_v``) with its products given: ``linear(x, w, b, which)`` for the
    projections (``which``: ``"in_proj"``, ``"q_proj"``, ...) and ``attention(q, k, v, mask,
    dropout_p, is_causal, need_weights)`` for the attention on (N, H, L, D) heads, which returns
    ``(out, P)``: ``P`` the (N, H, L, S) attention probabilities after dropout where
    ``need_weights``, else None. The input projection is one packed product where query, key
    and value are one tensor (and one for key and value where those two are), as torch
    computes them. Masks follow torch's rules: a boolean mask is True where a position is *not*
    attended, the key padding mask adds to the attention mask, and ``is_causal`` (a hint that
    ``attn_mask`` is causal) takes the causal attention where there is no key padding mask and
    no weights are asked for (torch applies the mask itself then). Inputs are ``(L, N, E)`` or
    unbatched ``(L, E)``; returns ``(output, weights)``, the weights as torch returns them
    (averaged over the heads where ``average_attn_weights``) or None."""
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    if use_separate_proj_weight:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        q = linear(query, q_proj_weight, biases[0], "q_proj")
        k = linear(key, k_proj_weight, biases[1], "k_proj")
        v = linear(value, v_proj_weight, biases[2], "v_proj")
    else:
        assert in_proj_weight is not None
        if query is key and key is value:  # self-attention: one packed product
            q, k, v = linear(query, in_proj_weight, in_proj_bias, "in_proj").chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = in_proj_weight.chunk(3)
            q = linear(query, w_q, biases[0], "q_proj")
            if key is value:
                b_kv = torch.cat(biases[1:]) if in_proj_bias is not None else None
                k, v = linear(key, torch.cat([w_k, w_v]), b_kv, "kv_proj").chunk(2, dim=-1)
            else:
                k, v = linear(key, w_k, biases[1], "k_proj"), linear(value, w_v, biases[2], "v_proj")

    def heads(t: Tensor, length: int) -> Tensor:  # (L, N, E) -> (N, H, L, D)
        return t.reshape(length, bsz, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(q, tgt_len), heads(k, src_len), heads(v, src_len)
    mask = None
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # torch likewise: the hint replaces the mask
    else:
        is_causal = False
    if attn_mask is not None:
        m = _additive_mask(attn_mask, q.dtype)
        mask = m.view(1, 1, tgt_len, src_len) if m.dim() == 2 else m.view(bsz, num_heads, tgt_len, src_len)
    if key_padding_mask is not None:
        kp = _additive_mask(key_padding_mask, q.dtype).view(bsz, 1, 1, src_len)
        mask = kp if mask is None else mask + kp
    out, weights = attention(q, k, v, mask, dropout_p if training else 0.0, is_causal, need_weights)
    out = linear(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim), out_proj_weight, out_proj_bias, "out_proj")
    if weights is not None:
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            weights = weights.squeeze(0)
    return (out.squeeze(1) if unbatched else out), weights


def activations_spec(spec: QSpec) -> QSpec:
    """``spec`` with its second operand under the first one's (``input``) quantizer: the
    attention products of a layer whose projections use ``spec``."""
    return spec._replace(b_bits=spec.a_bits, b_scheme=spec.a_scheme, b_gran=spec.a_gran)


@contextlib.contextmanager
def recomputed(ac_graph_id: int | None) -> Iterator[None]:
    """While tracing a graph node (AOTAutograd copies a node's ``recompute`` and
    ``ac_graph_id`` meta onto every aten node traced from it): the aten nodes traced in this
    block get the tags of the recompute region ``ac_graph_id`` (activation checkpointing's), so
    that the partitioner recomputes them in the backward; the node's own tags apply again after
    it. No effect where ``ac_graph_id`` is None or nothing is being traced."""
    if ac_graph_id is None or not fx_traceback.has_preserved_node_meta():
        yield
        return
    meta = fx_traceback.get_current_meta()  # a copy of the node's meta, for its tracing only
    saved = {k: meta.pop(k) for k in ("recompute", "ac_graph_id") if k in meta}
    meta["recompute"], meta["ac_graph_id"] = CheckpointPolicy.MUST_RECOMPUTE, ac_graph_id
    try:
        yield
    finally:
        del meta["recompute"], meta["ac_graph_id"]
        meta.update(saved)


def fqt_multi_head_attention(*args: Any, spec: QSpec = QSpec(), quantize_attention: bool = True,
                             recompute_id: int | None = None, mask_as_bias: bool = True,
                             **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """:func:`mha_with` with every product FQT (the arguments of
    ``F.multi_head_attention_forward`` that it takes, in its order): the projections as
    :func:`fqt_linear`, the attention as :func:`fqt_sdpa` with both operands under the ``a_*``
    (input) quantizer, or torch's attention where ``quantize_attention`` is False (for
    ``config.sdpa="full_precision"``; its float decomposition where the weights are asked for).
    The attention weights (``need_weights``) are the float probabilities that the quantized
    ``P @ V`` product rounds. ``recompute_id``: the quantized attention is a recompute region
    of that id (:func:`recomputed`; ``config.sdpa="recompute"``, as ``passes.insert_qdq`` tags
    an ``fqt_sdpa`` node), ``mask_as_bias`` as :func:`sdpa_with`'s. ``passes.insert_qdq`` puts it in place of
    ``F.multi_head_attention_forward`` calls it covers; the GEMM tags name the products
    ``<module>[in_proj]``, ``<module>[q@k]``, ... ."""

    def linear(x: Tensor, w: Tensor, b: Tensor | None, which: str) -> Tensor:
        return fqt_linear(x, w, b, spec=spec._replace(name=f"{spec.name}[{which}]"))

    attn_spec = activations_spec(spec)

    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, causal: bool,
                  need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if quantize_attention:
            with recomputed(recompute_id):
                got = fqt_sdpa(q, k, v, mask, p, causal, spec=attn_spec, mask_as_bias=mask_as_bias,
                               return_weights=need_weights)
        elif need_weights:
            got = sdpa_with(lambda a, b, which: torch.matmul(a, b), q, k, v, mask, p, causal, return_weights=True)
        else:
            got = F.scaled_dot_product_attention(q, k, v, mask, p, causal)
        return got if need_weights else (got, None)

    return mha_with(linear, attention, *args, **kwargs)
