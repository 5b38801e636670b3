"""decompose_fqt: inline the fqt quantizer ops as aten ops so inductor fuses them.

The op library's custom ops are opaque to inductor: each would run as a separate eager call,
and ``fqt::sr_quantize`` in eager runs ~15 passes over memory (range, hash rounds, floor,
cast). Written as aten ops, inductor fuses the range reduction into one kernel and the
counter-based generator, the rounding and the int8 cast into another, and fuses the forward
quantizer with the op that produced its input. The aten formulas are those of
``fqt_compile.quantizers`` (the reference the tests compare against), node for node.

Runs last, on a *copy* of the graph handed to inductor, so that records and the inspection
report keep the readable ``fqt::`` form. An ``fqt::sr_quantize`` that ``passes/fuse_quantizers.py``
marked (``meta[C_KERNEL]``: its input is in memory anyway) stays a call of its C kernel. Ops inlined: ``quantize`` (tensor granularity),
``sr_quantize``, ``dequantize``, and the conv GEMMs left simulated (``qconv*``: dequantize +
the float convolution), ``dropout`` (the counter-based mask and the scaling). BHQ/Hadamard
transforms and ``int_mm`` stay calls.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..rng import _MULT, _SEED_HI_SALT

__all__ = ["decompose_fqt", "C_KERNEL"]

#: meta key set by ``passes/fuse_quantizers.py`` on an ``fqt::sr_quantize`` node whose input is
#: in memory anyway: it stays a call (the op's C kernel) instead of being inlined
C_KERNEL = "fqt_c_kernel"

log = logging.getLogger(__name__)

aten = torch.ops.aten
prims = torch.ops.prims
fqt = torch.ops.fqt
f32, i64, i32, i8 = torch.float32, torch.int64, torch.int32, torch.int8


COLUMN_BLOCK = 16  # rows per block of the two-stage column range reduction (Emitter.column_minmax)


class Emitter:
    """Creates call_function nodes before a given node, with ``meta["val"]`` computed by
    running the op on the fake values of its arguments."""

    def __init__(self, graph: fx.Graph, fake_mode: Any) -> None:
        self.graph, self.fake_mode = graph, fake_mode

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        if self.fake_mode is not None:
            vargs, vkwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
            with self.fake_mode:
                node.meta["val"] = target(*vargs, **vkwargs)
        return node

    # small helpers in the vocabulary of the reference implementation
    def cast(self, x: fx.Node, dtype: torch.dtype) -> fx.Node:
        return self(prims.convert_element_type.default, x, dtype)

    def minmax(self, x: fx.Node, dims: list[int] | None) -> tuple[fx.Node, fx.Node]:
        if dims is None:
            return self(aten.amin.default, x, []), self(aten.amax.default, x, [])
        if dims == [0] and x.meta["val"].dim() == 2:
            return self.column_minmax(x)
        return self(aten.amin.default, x, dims, True), self(aten.amax.default, x, dims, True)

    def column_minmax(self, x: fx.Node) -> tuple[fx.Node, fx.Node]:
        """Per-column (dim 0) min and max of an (N, D) node, as (1, D). Reduced in two stages,
        over blocks of COLUMN_BLOCK rows and then over the blocks, so that inductor's loops read
        rows contiguously (a one-stage dim-0 reduction walks the tensor column-strip by
        column-strip: 1.5-4x slower here, ``benchmarks/bench_quantizers.py``). min and max
        are exact in any order, so the result is the same."""
        val = x.meta["val"]
        n, d = val.shape
        r = COLUMN_BLOCK
        if not isinstance(n, int) or n % r or n == r or not val.is_contiguous():
            return self(aten.amin.default, x, [0], True), self(aten.amax.default, x, [0], True)
        xb = self(aten.view.default, x, [n // r, r, d])
        lo = self(aten.amin.default, self(aten.amin.default, xb, [1]), [0], True)
        hi = self(aten.amax.default, self(aten.amax.default, xb, [1]), [0], True)
        return lo, hi

    def safe_scale(self, span: fx.Node, levels: int) -> tuple[fx.Node, fx.Node]:
        # quantizers._safe_scale: the stored scale (0 for a zero range) and the divisor (the
        # scale with 0 -> 1), written without ones_like/where (no inductor lowering needed)
        scale = self(aten.div.Tensor, span, levels)
        return scale, self(aten.add.Tensor, scale, self.cast(self(aten.le.Scalar, scale, 0), f32))

    def dequantize(self, codes: fx.Node, scale: Any, offset: Any, dtype: torch.dtype = f32) -> fx.Node:
        out = self(aten.add.Tensor, self(aten.mul.Tensor, self.cast(codes, f32), scale), offset)
        return out if dtype == f32 else self.cast(out, dtype)

    def clamp(self, x: fx.Node, lo: float, hi: float) -> fx.Node:
        return self(aten.clamp_max.default, self(aten.clamp_min.default, x, lo), hi)

    def shr(self, x: fx.Node, n: int) -> fx.Node:
        # rng._shr: logical right shift of int32 bits
        return self(aten.bitwise_and.Scalar, self(aten.bitwise_right_shift.Tensor_Scalar, x, n), (1 << (32 - n)) - 1)

    def hash32(self, x: fx.Node) -> fx.Node:
        # rng.hash32 on int32 nodes
        for _ in range(2):
            x = self(aten.mul.Tensor, self(aten.bitwise_xor.Tensor, self.shr(x, 16), x), _MULT)
        return self(aten.bitwise_xor.Tensor, self.shr(x, 16), x)


def _uniform_2d(e: Emitter, x: fx.Node, seed: fx.Node, shape: tuple[int, int] | None = None) -> fx.Node:
    # rng.uniform_from_seed for an (N, D) tensor, x or one of the static ``shape`` on x's
    # device: index i = row * D + col, 32-bit arithmetic
    val = x.meta["val"]
    if shape is not None:
        n, d = shape
        numel = n * d
    else:
        # static sizes as ints (torch 2.5's inductor has no lowering for sym_size of a static dim)
        n, d = (s if isinstance(s, int) else e(aten.sym_size.int, x, i) for i, s in enumerate(val.shape))
        numel = val.numel()
    s_lo = e.hash32(e.cast(seed, i32))
    s_hi = e.hash32(e(aten.bitwise_xor.Scalar, e.cast(e(aten.bitwise_right_shift.Tensor_Scalar, seed, 32), i32), _SEED_HI_SALT))
    small = isinstance(numel, int) and numel < 2**31
    dt = i32 if small else i64
    # prims.iota, not aten.arange: inductor lowers iota in every supported torch, while it
    # lowers aten.arange.start_step directly only from 2.13 on (2.11 asserts on a decomposable
    # op without a lowering, tests/test_decompose_fqt.py)
    iota = dict(start=0, step=1, dtype=dt, device=val.device, requires_grad=False)
    rows = e(prims.iota.default, n, **iota)
    if small and val.device.type == "cpu":  # a loaded vector, not a built one (rng's fqt::column_index)
        cols = e(fqt.column_index.default, d, val.device)
    else:
        cols = e(prims.iota.default, d, **iota)
    idx = e(aten.add.Tensor, e(aten.mul.Tensor, e(aten.unsqueeze.default, rows, 1), d), e(aten.unsqueeze.default, cols, 0))
    lo = idx if small else e.cast(idx, i32)
    if not small:  # the high index word (0 below 2**32 elements)
        s_hi = e(aten.add.Tensor, s_hi, e.cast(e(aten.bitwise_right_shift.Tensor_Scalar, idx, 32), i32))
    h = e.hash32(e(aten.bitwise_xor.Tensor, lo, s_lo))
    h = e.hash32(e(aten.bitwise_xor.Tensor, h, s_hi))
    return e(aten.mul.Tensor, e.cast(e.shr(h, 8), f32), 1.0 / 16777216.0)


def _dropout(e: Emitter, x: fx.Node, seed: fx.Node, p: float) -> fx.Node | None:
    """``fqt::dropout`` (ops.dropout): ``x * keep * (1 / (1 - p))``, keep = the draws of x's
    row-major index >= p; None (the op stays a call) for symbolic shapes."""
    val = x.meta["val"]
    shape = tuple(val.shape)
    if not all(isinstance(s, int) for s in shape):
        return None
    if p == 1.0:
        return e(aten.mul.Tensor, x, 0.0)
    d = shape[-1] if shape else 1
    n = val.numel() // d if d else 0
    u = _uniform_2d(e, x, seed, (n, d))
    keep = e.cast(e(aten.ge.Scalar, u, p), val.dtype)
    if list(shape) != [n, d]:
        keep = e(aten.view.default, keep, list(shape))
    return e(aten.mul.Tensor, e(aten.mul.Tensor, x, keep), 1.0 / (1.0 - p))


def _sr_quantize(e: Emitter, x, seed, bits, gran):
    half, levels = 2 ** (bits - 1), 2**bits - 1
    xf = e.cast(x, f32)
    dims = {"tensor": None, "row": [1], "column": [0]}[gran]
    lo, hi = e.minmax(xf, dims)
    scale, div = e.safe_scale(e(aten.sub.Tensor, hi, lo), levels)
    y = e(aten.add.Tensor, e(aten.div.Tensor, e(aten.sub.Tensor, xf, lo), div), _uniform_2d(e, x, seed))
    codes = e(aten.sub.Tensor, e.clamp(e(aten.floor.default, y), 0, levels), half)
    offset = e(aten.add.Tensor, lo, e(aten.mul.Tensor, scale, half))
    # through int32: inductor's CPU code converts float -> int8 with saturating packs and
    # clamps (six instructions per vector) but int32 -> int8 with one; codes are integers in
    # range, so the value is the same
    return e.cast(e.cast(codes, i32), i8), scale, offset


def _quantize(e: Emitter, x, bits, scheme, gran, axis):
    half, levels = 2 ** (bits - 1), 2**bits - 1
    xf = e.cast(x, f32)
    lo, hi = e.minmax(xf, None)
    if scheme == "symmetric":
        qmax = half - 1
        scale, div = e.safe_scale(e(aten.maximum.default, e(aten.abs.default, lo), e(aten.abs.default, hi)), qmax)
        codes = e.clamp(e(aten.round.default, e(aten.div.Tensor, xf, div)), -qmax, qmax)
        offset = e(aten.mul.Tensor, scale, 0.0)
    elif scheme == "affine":
        scale, div = e.safe_scale(e(aten.sub.Tensor, hi, lo), levels)
        q = e(aten.round.default, e(aten.div.Tensor, e(aten.sub.Tensor, xf, lo), div))
        codes = e(aten.sub.Tensor, e.clamp(q, 0, levels), half)
        offset = e(aten.add.Tensor, lo, e(aten.mul.Tensor, scale, half))
    else:  # affine_zero
        lo = e(aten.clamp_max.default, lo, 0.0)
        hi = e(aten.clamp_min.default, hi, 0.0)
        scale, div = e.safe_scale(e(aten.sub.Tensor, hi, lo), levels)
        zero = e.clamp(e(aten.round.default, e(aten.div.Tensor, e(aten.neg.default, lo), div)), 0, levels)
        q = e(aten.add.Tensor, e(aten.round.default, e(aten.div.Tensor, xf, div)), zero)
        codes = e(aten.sub.Tensor, e.clamp(q, 0, levels), half)
        offset = e(aten.mul.Tensor, e(aten.neg.default, e(aten.sub.Tensor, zero, half)), scale)
    return e.cast(e.cast(codes, i32), i8), scale, offset  # through int32: see _sr_quantize


_QCONV = (fqt.qconv.default, fqt.qconv_grad_input.default, fqt.qconv_grad_weight.default)


def _qconv(e: Emitter, target, args):
    """A simulated conv GEMM (not lowered) as dequantize + the float convolution, so that
    inductor fuses the dequantization and calls its convolution kernel."""
    a = e.dequantize(*args[0:3])
    b = e.dequantize(*args[3:6])
    if target is fqt.qconv.default:
        stride, padding, dilation, groups = args[8:12]
        out_pad = [0] * (len(stride))
        return e(aten.convolution.default, a, b, None, stride, padding, dilation, False, out_pad, groups)
    shape, stride, padding, dilation, groups = args[8:13]
    out_pad = [0] * (len(stride))
    other = e(aten.empty.memory_format, shape, dtype=f32, device=a.meta["val"].device)
    if target is fqt.qconv_grad_input.default:  # a = G, b = W~
        res = e(aten.convolution_backward.default, a, other, b, None, stride, padding, dilation, False, out_pad,
                groups, [True, False, False])
        return e(operator.getitem, res, 0)
    # grad_weight: a = G, b = X~
    res = e(aten.convolution_backward.default, a, b, other, None, stride, padding, dilation, False, out_pad,
            groups, [False, True, False])
    return e(operator.getitem, res, 1)


def _replace_multi(node: fx.Node, outs: tuple[fx.Node, ...]) -> None:
    for user in list(node.users):
        assert user.target is operator.getitem, user.format_node()
        user.replace_all_uses_with(outs[user.args[1]])
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def decompose_fqt(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``gm`` with the fqt quantizer ops inlined; and counts of what was inlined."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    rv = graph.graph_copy(gm.graph, val_map)
    old_out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    graph.output(rv).meta.update(old_out.meta)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    counts: dict[str, int] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        with graph.inserting_before(node):
            e = Emitter(graph, fake_mode)
            if t is fqt.sr_quantize.default and node.meta.get(C_KERNEL):
                counts["sr_quantize_c_kernel"] = counts.get("sr_quantize_c_kernel", 0) + 1
                continue
            if t is fqt.sr_quantize.default:
                _replace_multi(node, _sr_quantize(e, *node.args))
            elif t is fqt.quantize.default and node.args[3] == "tensor":
                _replace_multi(node, _quantize(e, *node.args))
            elif t is fqt.dequantize.default:
                new = e.dequantize(*node.args)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            elif t is fqt.dropout.default:
                new = _dropout(e, *node.args)
                if new is None:
                    continue
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            elif t in _QCONV:
                node.replace_all_uses_with(_qconv(e, t, node.args))
                graph.erase_node(node)
            else:
                continue
        name = str(t).split(".")[1]
        counts[name] = counts.get(name, 0) + 1
    graph.eliminate_dead_code()
    graph.lint()
    new_gm = fx.GraphModule(gm, graph)
    log.debug("decompose_fqt: %s", counts)
    return new_gm, counts
