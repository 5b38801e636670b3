"""GEMM ops of the ``fqt`` library: the simulated quantized product and the integer kernel.

``fqt::qmm`` is the form in which every GEMM of a covered product appears in the aten
forward and backward graphs::

    qmm(a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, a_bits, b_bits, tag)
        = (a_codes * a_scale + a_offset) @ (b_codes * b_scale + b_offset)      (float32)

with ``a`` of shape (M, K) or (B, M, K), ``b`` (K, N) or (B, K, N), scales and offsets
broadcastable to their codes. Its implementation is the *simulated* product (dequantize, float
matmul). ``tag`` is ``"<module path>:<gemm>"`` with gemm ``output``, ``grad_input`` or
``grad_weight``, so passes and the inspection report know which GEMM a node is.
``a_codes`` may also be a float tensor (scale 1, offset 0): an operand that is not integer
codes, e.g. a BHQ estimate whose inverse transform mixes the contracted axis. Such a node can
never be lowered, and the lowering pass says why.

``fqt::qconv``, ``fqt::qconv_grad_input`` and ``fqt::qconv_grad_weight`` are the three GEMMs
of a convolution in the same form (codes, scales, offsets, bits, conv geometry, tag); their
implementations are the float convolution on dequantized operands, and the lowering pass
turns them into im2col + ``fqt::qmm`` where that is exact and faster, or, for the ``output``
GEMM and a stride-1 ``grad_input`` on CPUs with VNNI or AMX, into ``fqt::conv_int8``
(oneDNN's direct int8 convolution of the codes).

``fqt::int_mm`` is the integer kernel the lowering pass uses where ``aten._int_mm`` alone does
not fit: batched operands, or a contraction long enough to overflow int32 accumulation
(split into chunks whose int32 sums are exact), or CUDA shapes cuBLASLt rejects (padded).
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence  # not list[int]: torch 2.5's custom_op schema inference knows only typing.Sequence/List

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["qmm", "int_mm", "mm_int8", "bmm_int8", "conv_int8", "conv_int8_available", "shift_codes", "int32_safe_k", "qconv",
           "qconv_grad_input", "qconv_grad_weight"]


def _contiguous_input_tags() -> dict[str, tuple[torch.Tag, ...]]:
    """``custom_op`` keyword arguments asking inductor to hand an op its inputs in the strides
    they had when traced (contiguous where the lowering pass wrote a row-major copy). Without
    one, inductor may keep such a copy in its input's layout when the input is a transposed
    view (P^T of attention's backward: the copy became an in-place no-op), and the op then
    makes the row-major copy itself, eagerly: a (128, 512, 512) int8 transpose in 15-18 ms in a
    one-block GPT step (docs/performance.md). ``needs_contiguous_strides`` where torch has it,
    else ``needs_fixed_stride_order``; none on a torch whose ``custom_op`` takes no tags."""
    import inspect

    if "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return {}
    for name in ("needs_contiguous_strides", "needs_fixed_stride_order"):
        tag = getattr(torch.Tag, name, None)
        if tag is not None:
            return {"tags": (tag,)}
    return {}


def int32_safe_k(a_bits: int, b_bits: int) -> int:
    """Largest K with K * max|a| * max|b| <= 2^31 - 1 for codes of these bit-widths
    (|code| <= 2^(bits-1))."""
    return (2**31 - 1) // (2 ** (a_bits - 1) * 2 ** (b_bits - 1))


def _check_gemm(a: Tensor, b: Tensor, what: str) -> None:
    torch._check(a.dim() in (2, 3) and b.dim() == a.dim(), lambda: f"{what}: operands must both be 2-D or 3-D")
    torch._check(a.shape[-1] == b.shape[-2], lambda: f"{what}: contraction sizes differ: {a.shape} @ {b.shape}")


@torch.library.custom_op("fqt::qmm", mutates_args=())
def qmm(
    a_codes: Tensor,
    a_scale: Tensor,
    a_offset: Tensor,
    b_codes: Tensor,
    b_scale: Tensor,
    b_offset: Tensor,
    a_bits: int,
    b_bits: int,
    tag: str,
) -> Tensor:
    """Simulated quantized GEMM (see module docstring)."""
    _check_gemm(a_codes, b_codes, f"fqt::qmm[{tag}]")
    a = a_codes.to(torch.float32) * a_scale + a_offset
    b = b_codes.to(torch.float32) * b_scale + b_offset
    return torch.matmul(a, b)


@qmm.register_fake
def _(a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, a_bits, b_bits, tag):
    _check_gemm(a_codes, b_codes, f"fqt::qmm[{tag}]")
    shape = (*a_codes.shape[:-1], b_codes.shape[-1])
    return a_codes.new_empty(shape, dtype=torch.float32)


def _pad_to(x: Tensor, dim: int, multiple: int) -> Tensor:
    pad = (-x.shape[dim]) % multiple
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _int_mm_2d(a: Tensor, b: Tensor) -> Tensor:
    if a.is_cuda:
        # cuBLASLt int8 GEMM: M > 16, K and N multiples of 8. Zero padding is exact.
        m, n = a.shape[0], b.shape[1]
        a = _pad_to(_pad_to(a, 1, 8), 0, 8)
        if a.shape[0] <= 16:
            a = torch.cat([a, a.new_zeros(24 - a.shape[0], a.shape[1])])
        b = _pad_to(_pad_to(b, 0, 8), 1, 8)
        return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]
    return torch._int_mm(a.contiguous(), b.contiguous())


def _bmm_int32(a: Tensor, b: Tensor) -> Tensor:
    """(B, M, K) @ (B, K, N) int8 -> int32, K within the int32-safe bound. On CPU: one
    row-major copy of each operand (a no-op when the graph laid them out so) and the int32
    results written in place (per-entry copies and a final stack cost about as much as the
    GEMMs themselves); on CUDA per entry, padded for cuBLASLt."""
    a, b = a.contiguous(), b.contiguous()
    if a.is_cuda:
        return torch.stack([_int_mm_2d(x, y) for x, y in zip(a.unbind(0), b.unbind(0))])
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)
    for i in range(a.shape[0]):
        torch._int_mm(a[i], b[i], out=out[i])
    return out


@torch.library.custom_op("fqt::int_mm", mutates_args=())
def int_mm(a_codes: Tensor, b_codes: Tensor, max_k: int) -> Tensor:
    """Exact integer GEMM of int8 codes, returned as float32: ``a @ b`` with int32
    accumulation over chunks of at most ``max_k`` (see :func:`int32_safe_k`), each chunk's
    exact int32 sum converted to float32 and added. (M, K) @ (K, N) or batched (B, M, K) @
    (B, K, N)."""
    _check_gemm(a_codes, b_codes, "fqt::int_mm")
    if max_k < 1:
        raise ValueError(f"fqt::int_mm: max_k must be >= 1, got {max_k}")
    k = a_codes.shape[-1]

    def one(a: Tensor, b: Tensor) -> Tensor:
        if k <= max_k:
            return _int_mm_2d(a, b).to(torch.float32)
        out = None
        for start in range(0, k, max_k):
            part = _int_mm_2d(a[:, start:start + max_k], b[start:start + max_k]).to(torch.float32)
            out = part if out is None else out + part
        return out

    if a_codes.dim() == 2:
        return one(a_codes, b_codes)
    if k <= max_k:
        return _bmm_int32(a_codes, b_codes).to(torch.float32)
    return torch.stack([one(a, b) for a, b in zip(a_codes.unbind(0), b_codes.unbind(0))])


@int_mm.register_fake
def _(a_codes, b_codes, max_k):
    _check_gemm(a_codes, b_codes, "fqt::int_mm")
    return a_codes.new_empty((*a_codes.shape[:-1], b_codes.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("fqt::mm_int8", mutates_args=(), **_contiguous_input_tags())
def mm_int8(a_codes: Tensor, b_codes: Tensor, k: int) -> Tensor:
    """``torch._int_mm`` on row-major operands given before their flattening: ``a_codes`` of any
    shape stands for its row-major flattening ``(M, K) = a.reshape(-1, k)``, ``b_codes`` for
    ``(K, N) = b.reshape(k, -1)``; the result is the (M, N) int32 product. K stays within
    :func:`int32_safe_k` (the caller's guarantee, as for ``fqt::bmm_int8``).

    The lowering pass uses it for the GEMMs of lowered convolutions, handing it the im2col
    columns as the (B, Ho, Wo, kh, kw, C) copy of the codes. ``aten._int_mm`` asks inductor
    for no strides, and inductor laid the (B*L, K) columns of an NCHW input out column-major,
    built by a scalar gather with an integer division per index (26 ms of a 2 ms im2col +
    GEMM for a 32 -> 64-channel stride-2 convolution of 128 x 28 x 28); asked for a row-major
    (B*L, K) matrix, it writes the copy as a 2-D loop, still with a division per index (7 ms).
    With this op's layout tag on the 6-D copy inductor writes it row-major in a 6-D loop
    (docs/performance.md, Training step: CNN)."""
    a, b = _flat_operands(a_codes, b_codes, k)
    return _int_mm_2d(a, b)


def _flat_operands(a: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    for t, name in ((a, "a"), (b, "b")):
        torch._check(t.dim() >= 2 and k > 0 and t.numel() % k == 0,
                     lambda: f"fqt::mm_int8: {name} of shape {tuple(t.shape)} does not flatten to a matrix with K = {k}")
    return a.reshape(-1, k), b.reshape(k, -1)


@mm_int8.register_fake
def _(a_codes, b_codes, k):
    a, b = _flat_operands(a_codes, b_codes, k)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


@torch.library.custom_op("fqt::bmm_int8", mutates_args=(), **_contiguous_input_tags())
def bmm_int8(a_codes: Tensor, b_codes: Tensor) -> Tensor:
    """Batched int8 GEMM with its exact int32 result: (B, M, K) @ (B, K, N) -> (B, M, N)
    int32. The caller guarantees K <= :func:`int32_safe_k` of the codes' bit-widths (the
    lowering pass uses it only for a static such K; longer ones go to ``fqt::int_mm``).
    Returning int32 lets the float epilogue that follows fuse the conversion, and operands
    the graph already laid out row-major are used without a copy."""
    torch._check(a_codes.dim() == 3 and b_codes.dim() == 3, lambda: "fqt::bmm_int8: operands must be 3-D")
    _check_gemm(a_codes, b_codes, "fqt::bmm_int8")
    return _bmm_int32(a_codes, b_codes)


@bmm_int8.register_fake
def _(a_codes, b_codes):
    _check_gemm(a_codes, b_codes, "fqt::bmm_int8")
    return a_codes.new_empty((a_codes.shape[0], a_codes.shape[1], b_codes.shape[2]), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# direct integer convolution (oneDNN)
# ---------------------------------------------------------------------------------------------


@functools.cache  # looked up once, not on every conv_int8 call
def _onednn_qconv() -> object | None:
    ops = getattr(torch.ops, "onednn", None)
    for name in ("qconv_pointwise", "qconv2d_pointwise"):  # torch 2.5 has only the 2-D name
        try:
            return getattr(ops, name).default
        except (AttributeError, RuntimeError):
            continue
    return None


def conv_int8_available() -> bool:
    """Whether :func:`conv_int8` runs here and gives the exact integer sums: oneDNN's quantized
    convolution in this torch build, a CPU whose int8 dot products accumulate exactly (VNNI or
    AMX: without them oneDNN's AVX2 path adds pairs of uint8 x int8 products in saturating
    16-bit lanes), and a self-test that passes: one small convolution of extreme and random
    codes, padding included, against the exact sums (run once per process; where any of this
    fails, the reason is logged and the lowering keeps im2col)."""
    return _conv_int8_status()[0]


@functools.cache
def _conv_int8_status() -> tuple[bool, str]:
    from .cbuild import cpu_flags

    why = ""
    if _onednn_qconv() is None or not torch.backends.mkldnn.is_available():
        why = "no oneDNN quantized convolution (onednn::qconv_pointwise) in this torch build"
    else:
        try:
            torch.ops.onednn.qconv_prepack.default  # noqa: B018
        except (AttributeError, RuntimeError):
            why = "no onednn::qconv_prepack in this torch build"
    if not why and not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        why = "the CPU has no VNNI or AMX-INT8 (oneDNN's int8 sums would saturate)"
    if not why:
        why = _conv_int8_self_test()
    if why:
        log.info("fqt::conv_int8 not used (convolutions lower through im2col): %s", why)
    return not why, why


def _conv_int8_self_test() -> str:
    """"" if :func:`conv_int8` equals a float64 convolution of the same codes (sums up to
    64*9*128*128, code 0 in the padding), else what went wrong. Runs with no fake or proxy
    mode active (the lowering pass asks while compiling)."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with _disable_current_modes(), torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = torch.randint(-128, 128, (2, 64, 5, 5), generator=g, dtype=torch.int8)
            w = torch.randint(-128, 128, (16, 64, 3, 3), generator=g, dtype=torch.int8)
            x[0], w[0], w[1] = -128, -128, 127
            got = conv_int8(shift_codes(x), w, [1, 1], [1, 1], [1, 1])
            ref = F.conv2d(x.double(), w.double(), None, 1, 1).float().permute(0, 2, 3, 1)
            if not torch.equal(got, ref):
                return f"self-test: oneDNN's sums differ from the exact ones (max |diff| {(got - ref).abs().max():g})"
    except Exception as e:  # an op signature this torch does not have, a oneDNN refusal
        return f"self-test failed: {type(e).__name__}: {e}"
    return ""


#: |x code| is at most 2^(bits-1), but oneDNN adds the unsigned codes (x + 128, up to 255)
#: times the weight codes before it subtracts the zero point's share: both stay within int32
#: up to this K for 8-bit weight codes (the lowering checks it)
CONV_INT8_MAX_K = (2**31 - 1) // (255 * 128)


def _check_conv_int8(x: Tensor, w: Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> tuple[int, int]:
    torch._check(x.dim() == 4 and w.dim() == 4 and x.shape[3] == w.shape[1],
                 lambda: f"fqt::conv_int8: (B, H, W, C) and (O, C, kh, kw) operands, got {tuple(x.shape)} and {tuple(w.shape)}")
    torch._check(len(stride) == len(padding) == len(dilation) == 2, lambda: "fqt::conv_int8: 2-D geometry")
    torch._check(min(padding) >= 0 and min(stride) >= 1 and min(dilation) >= 1,
                 lambda: f"fqt::conv_int8: stride {stride}, padding {padding}, dilation {dilation}")
    ho = (x.shape[1] + 2 * padding[0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
    wo = (x.shape[2] + 2 * padding[1] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
    return ho, wo


@torch.library.custom_op("fqt::conv_int8", mutates_args=(), **_contiguous_input_tags())
def conv_int8(x_shifted: Tensor, w_codes: Tensor, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]) -> Tensor:
    """Direct integer convolution of int8 codes, channels last: ``x_shifted`` (B, H, W, C)
    uint8 holds the input codes plus 128, ``w_codes`` (O, C, kh, kw) int8; returns (B, Ho, Wo, O)
    float32 with ``out[b, i, j, o] = sum_{c, p, q} x[b, i*sh + p*dh - ph, j*sw + q*dw - pw, c] *
    w[o, c, p, q]`` over the codes x (code 0 in the zero padding), each exact int32 sum as
    float32 (the conversion the other integer GEMMs' epilogues make): the same numbers, in the
    same memory order, as the im2col GEMM ``cols(x) (B*Ho*Wo, K) @ w^T (K, O)``. ``groups`` is 1.

    oneDNN's int8 convolution (``onednn::qconv_pointwise``) takes uint8 activations with a zero
    point: the codes come in shifted by 128 (the lowering pass fuses the shift and the
    channels-last copy into the kernel that makes the codes) with zero point 128, so that a
    padded entry, which oneDNN fills with the zero point, is code 0; weights as int8, every
    scale 1.0. The caller guarantees K = C*kh*kw <= :data:`CONV_INT8_MAX_K` and a CPU where
    :func:`conv_int8_available` (else oneDNN's sums are not exact). Measured against the
    float convolution and im2col + integer GEMM in ``benchmarks/bench_conv.py``
    (docs/performance.md, Convolutions)."""
    _check_conv_int8(x_shifted, w_codes, stride, padding, dilation)
    torch._check(x_shifted.dtype == torch.uint8 and w_codes.dtype == torch.int8,
                 lambda: f"fqt::conv_int8: uint8 shifted codes and int8 weight codes, got {x_shifted.dtype} and {w_codes.dtype}")
    u = x_shifted.contiguous().permute(0, 3, 1, 2)  # (B, C, H, W) in channels-last memory
    o = w_codes.shape[0]
    ones = torch.ones(o, dtype=torch.float32)
    zeros = torch.zeros(o, dtype=torch.int64)
    st, pad, dil = list(stride), list(padding), list(dilation)
    packed = torch.ops.onednn.qconv_prepack(w_codes.contiguous(), ones, 1.0, 128, st, pad, dil, 1, list(u.shape))
    out = _onednn_qconv()(u, 1.0, 128, packed, ones, zeros, None, st, pad, dil, 1, 1.0, 0,
                          torch.float32, "none", [], "")
    return out.permute(0, 2, 3, 1).contiguous()  # a view: oneDNN writes channels last


@conv_int8.register_fake
def _(x_shifted, w_codes, stride, padding, dilation):
    ho, wo = _check_conv_int8(x_shifted, w_codes, stride, padding, dilation)
    return x_shifted.new_empty((x_shifted.shape[0], ho, wo, w_codes.shape[0]), dtype=torch.float32)


def shift_codes(x_codes: Tensor) -> Tensor:
    """What :func:`conv_int8` takes: (B, C, H, W) int8 codes as (B, H, W, C) uint8 codes + 128."""
    return (x_codes.to(torch.int16) + 128).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# convolutions: the three conv GEMMs as ops on int8 codes
# ---------------------------------------------------------------------------------------------
#
# A convolution's three GEMMs reach the aten graphs as these ops (simulated: a float
# convolution on the dequantized operands), so that the partitioner saves int8 codes and the
# lowering pass sees each GEMM with its quantizers, shapes and tag. ``passes.lower_int_gemm``
# rewrites them into im2col + ``fqt::qmm`` (then the integer GEMM) where that is exact and
# measured faster (see that module), and records why not elsewhere.


def _deq(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    return codes.to(torch.float32) * scale + offset


def _conv_backward(g: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int, which: int) -> Tensor:
    """One output of aten.convolution_backward: 0 = grad_input, 1 = grad_weight (the other
    operand of that GEMM is only a shape there)."""
    mask = [which == 0, which == 1, False]
    out_pad = [0] * (w.dim() - 2)
    return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, out_pad, groups, mask)[which]


def _check_conv(a: Tensor, b: Tensor, what: str) -> None:
    torch._check(a.dim() == b.dim() and a.dim() in (3, 4, 5), lambda: f"{what}: operands must be 3-D, 4-D or 5-D")


@torch.library.custom_op("fqt::qconv", mutates_args=())
def qconv(
    x_codes: Tensor, x_scale: Tensor, x_offset: Tensor,
    w_codes: Tensor, w_scale: Tensor, w_offset: Tensor,
    x_bits: int, w_bits: int,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, tag: str,
) -> Tensor:  # fmt: skip
    """Output GEMM of a convolution: ``conv(X~, W~)`` (no bias), float32."""
    _check_conv(x_codes, w_codes, f"fqt::qconv[{tag}]")
    out_pad = [0] * (w_codes.dim() - 2)
    x, w = _deq(x_codes, x_scale, x_offset), _deq(w_codes, w_scale, w_offset)
    return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, out_pad, groups)


@qconv.register_fake
def _(x_codes, x_scale, x_offset, w_codes, w_scale, w_offset, x_bits, w_bits, stride, padding, dilation, groups, tag):
    _check_conv(x_codes, w_codes, f"fqt::qconv[{tag}]")
    x = x_codes.new_empty(x_codes.shape, dtype=torch.float32)
    w = w_codes.new_empty(w_codes.shape, dtype=torch.float32)
    out_pad = [0] * (w_codes.dim() - 2)
    return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, out_pad, groups)


@torch.library.custom_op("fqt::qconv_grad_input", mutates_args=())
def qconv_grad_input(
    g_codes: Tensor, g_scale: Tensor, g_offset: Tensor,
    w_codes: Tensor, w_scale: Tensor, w_offset: Tensor,
    g_bits: int, w_bits: int, input_shape: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, tag: str,
) -> Tensor:  # fmt: skip
    """grad_input GEMM of a convolution: ``conv_transpose(G^, W~)`` of shape ``input_shape``,
    float32 (``G^`` = the dequantized gradient codes, or a float estimate with scale 1)."""
    _check_conv(g_codes, w_codes, f"fqt::qconv_grad_input[{tag}]")
    g, w = _deq(g_codes, g_scale, g_offset), _deq(w_codes, w_scale, w_offset)
    return _conv_backward(g, g.new_empty(input_shape), w, stride, padding, dilation, groups, 0)


@qconv_grad_input.register_fake
def _(g_codes, g_scale, g_offset, w_codes, w_scale, w_offset, g_bits, w_bits, input_shape, stride, padding, dilation, groups, tag):
    _check_conv(g_codes, w_codes, f"fqt::qconv_grad_input[{tag}]")
    return g_codes.new_empty(input_shape, dtype=torch.float32)


@torch.library.custom_op("fqt::qconv_grad_weight", mutates_args=())
def qconv_grad_weight(
    g_codes: Tensor, g_scale: Tensor, g_offset: Tensor,
    x_codes: Tensor, x_scale: Tensor, x_offset: Tensor,
    g_bits: int, x_bits: int, weight_shape: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, tag: str,
) -> Tensor:  # fmt: skip
    """grad_weight GEMM of a convolution: the correlation of ``X~`` with ``G^`` (shape
    ``weight_shape``), float32; contraction over batch x output positions."""
    _check_conv(g_codes, x_codes, f"fqt::qconv_grad_weight[{tag}]")
    g, x = _deq(g_codes, g_scale, g_offset), _deq(x_codes, x_scale, x_offset)
    return _conv_backward(g, x, g.new_empty(weight_shape), stride, padding, dilation, groups, 1)


@qconv_grad_weight.register_fake
def _(g_codes, g_scale, g_offset, x_codes, x_scale, x_offset, g_bits, x_bits, weight_shape, stride, padding, dilation, groups, tag):
    _check_conv(g_codes, x_codes, f"fqt::qconv_grad_weight[{tag}]")
    return g_codes.new_empty(weight_shape, dtype=torch.float32)
