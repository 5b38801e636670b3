"""fuse_gelu: a GELU whose output a per-tensor forward quantizer rounds (fc2's input) becomes
one call of ``fqt::gelu_quantize``, and GELU's backward whose result stochastic gradient
quantizers round becomes one call of ``fqt::gelu_backward_sr_quantize``
(``fqt_compile/gelu_quant.py``), together with the bias gradient (the column sum of the
result) and, where the incoming gradient is a lowered GEMM's result, that GEMM's scale
epilogue (the kernel reads the int32 product).

Forward: ``fqt::quantize(y, bits, scheme, "tensor", axis)`` where ``y`` (read by nothing else)
is ``aten.gelu(h)`` (approximate "none") or inductor's decomposition
``mul(mul(h, 0.5), add(erf(mul(h, 1/sqrt 2)), 1))``, and ``h`` as below.

Backward, on the aten graphs of the backend's inner compiler (after ``lower_int_gemm``):

* ``sr_quantize(x2, seed, bits, gran)`` nodes (1 to 4, granularity tensor/row/column) on
  ``x2 = ds`` (2-D) or ``x2 = view(ds, [N, D])``, where
* ``ds = aten.gelu_backward(g, h)`` with ``approximate="none"`` (graphs without inductor's
  decompositions) or the decomposition inductor's tracing leaves,
  ``mul(g, add(cdf, mul(h, pdf)))`` with ``cdf = mul(add(erf(mul(h, 1/sqrt 2)), 1), 0.5)`` and
  ``pdf = mul(exp(mul(mul(h, h), -0.5)), 1/sqrt(2 pi))`` (multiplications in either order),
* ``h = [view](add(x, bias))`` with a 1-D bias of D elements (else ``h`` itself, no bias),
  everything float32 on the CPU, below 2^31 elements.

``sum(x2, [0])`` (the bias gradient) reads the op's column sums; other readers of ``x2`` (a BHQ
transform) read its ``ds``. Seeds keep their draw order (``passes/fused_sr.py``). Runs only where
the lowering does and the kernel is available; the result says how many were fused and, if
none could be, why. The tanh-approximated GELU is not matched (it stays in inductor's kernel).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from .. import gelu_quant
from ..config import FQTConfig
from .epilogue import emit_terms
from .fused_sr import (bias_sums, call, cpu_float32, epilogue_through_views, erase_dead, replace_with_fused,
                       sr_readers, view_outputs, view_shape)

__all__ = ["fuse_gelu"]

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_K_ALPHA = 0.70710678118654752440  # 1/sqrt(2), torch._decomp's gelu_backward
_K_BETA = 1.12837916709551257390 * 0.70710678118654752440 * 0.5  # 1/sqrt(2 pi)


def _is_const(x: Any, value: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x - value) <= 1e-12 * max(1.0, abs(value))


def _scaled(node: Any, c: float) -> fx.Node | None:
    """``x`` if ``node`` is ``mul(x, c)`` or ``mul(c, x)`` for the constant ``c``."""
    if not call(node, aten.mul.Tensor):
        return None
    a, b = node.args
    if _is_const(b, c) and isinstance(a, fx.Node):
        return a
    if _is_const(a, c) and isinstance(b, fx.Node):
        return b
    return None


def _cdf_of(node: Any) -> fx.Node | None:
    """``h`` if ``node`` is ``0.5 * (1 + erf(h / sqrt 2))`` as the decomposition writes it."""
    s = _scaled(node, 0.5)
    if not call(s, aten.add.Tensor):
        return None
    a, b = s.args
    e = a if _is_const(b, 1) else b if _is_const(a, 1) else None
    if not call(e, aten.erf.default):
        return None
    return _scaled(e.args[0], _K_ALPHA)


def _pdf_of(node: Any) -> fx.Node | None:
    """``h`` if ``node`` is ``exp(h * h * -0.5) / sqrt(2 pi)`` as the decomposition writes it."""
    e = _scaled(node, _K_BETA)
    if not call(e, aten.exp.default):
        return None
    sq = _scaled(e.args[0], -0.5)
    if not call(sq, aten.mul.Tensor) or sq.args[0] is not sq.args[1]:
        return None
    return sq.args[0]


def _gelu_grad_of(node: Any) -> fx.Node | None:
    """``h`` if ``node`` is ``cdf(h) + h * pdf(h)``."""
    if not call(node, aten.add.Tensor):
        return None
    for c, m in (node.args, node.args[::-1]):
        h = _cdf_of(c)
        if h is None or not call(m, aten.mul.Tensor):
            continue
        a, b = m.args
        if (a is h and _pdf_of(b) is h) or (b is h and _pdf_of(a) is h):
            return h
    return None


def _gelu_backward_args(ds: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(g, h)`` if ``ds`` is GELU's (exact) backward for input ``h`` and incoming gradient ``g``."""
    if call(ds, aten.gelu_backward.default):
        approximate = ds.kwargs.get("approximate", ds.args[2] if len(ds.args) > 2 else "none")
        g, h = ds.args[:2]
        return (g, h) if approximate == "none" and isinstance(g, fx.Node) and isinstance(h, fx.Node) else None
    if not call(ds, aten.mul.Tensor):
        return None
    for g, d in (ds.args, ds.args[::-1]):
        h = _gelu_grad_of(d)
        if h is not None and isinstance(g, fx.Node):
            return g, h
    return None


def _split_bias(h: fx.Node, d: int) -> tuple[fx.Node, fx.Node | None]:
    """``(x, bias)`` if ``h`` is ``[view](add(x, bias))`` with a (d,) bias and x of h's elements,
    else ``(h, None)``."""
    base = h
    while any(call(base, op) for op in _VIEWS):
        base = base.args[0]
    if call(base, aten.add.Tensor):
        hv = h.meta["val"]
        for x, b in (base.args, base.args[::-1]):
            xv = x.meta.get("val") if isinstance(x, fx.Node) else None
            bv = b.meta.get("val") if isinstance(b, fx.Node) else None
            if (isinstance(xv, torch.Tensor) and isinstance(bv, torch.Tensor) and tuple(bv.shape) == (d,)
                    and bv.dtype == xv.dtype == torch.float32 and xv.numel() == hv.numel() and xv.dim() >= 1
                    and xv.shape[-1] == d):
                return x, b
    return h, None


def _gelu_input(y: fx.Node) -> fx.Node | None:
    """``h`` if ``y`` is the exact GELU of ``h``: ``aten.gelu(h)`` or the decomposition
    ``mul(mul(h, 0.5), add(erf(mul(h, 1/sqrt 2)), 1))`` (multiplications in either order)."""
    if call(y, aten.gelu.default):
        approximate = y.kwargs.get("approximate", y.args[1] if len(y.args) > 1 else "none")
        return y.args[0] if approximate == "none" and isinstance(y.args[0], fx.Node) else None
    if not call(y, aten.mul.Tensor):
        return None
    for a, b in (y.args, y.args[::-1]):
        h = _scaled(a, 0.5)
        if h is None or not call(b, aten.add.Tensor):
            continue
        s, one = b.args
        e = s if _is_const(one, 1) else one if _is_const(s, 1) else None
        if call(e, aten.erf.default) and _scaled(e.args[0], _K_ALPHA) is h:
            return h
    return None


def _fuse_forward(graph: fx.Graph, q: fx.Node) -> bool:
    """Fuse ``fqt::quantize(gelu(h), bits, scheme, "tensor")`` into ``fqt::gelu_quantize``."""
    y = q.args[0]
    if not isinstance(y, fx.Node) or len(y.users) != 1 or q.args[3] != "tensor":
        return False
    if any(u.target is not operator.getitem for u in q.users):
        return False
    h = _gelu_input(y)
    yv = y.meta.get("val")
    hv = h.meta.get("val") if h is not None else None
    if not all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device.type == "cpu" and v.dim() >= 1
               for v in (yv, hv)):
        return False
    x, bias = _split_bias(h, hv.shape[-1])
    codes_val = q.meta["val"][0]  # y's shape
    if tuple(x.meta["val"].shape) != tuple(codes_val.shape) and view_shape(codes_val) is None:
        # the codes come in x's shape, and y's has more than one symbolic size to view them back
        # with: take h itself (x + bias computed apart)
        x, bias = h, None
    xv = x.meta["val"]
    with graph.inserting_before(q):
        node = graph.call_function(torch.ops.fqt.gelu_quantize.default, (x, bias, q.args[1], q.args[2]))
        outs = [graph.call_function(operator.getitem, (node, i)) for i in range(3)]
    node.meta["val"] = (q.meta["val"][0].new_empty(xv.shape), q.meta["val"][1], q.meta["val"][2])
    for o, v in zip(outs, node.meta["val"]):
        o.meta["val"] = v
    for u in list(q.users):
        u.replace_all_uses_with(outs[u.args[1]])
        graph.erase_node(u)
    graph.erase_node(q)
    view_outputs(graph, outs[:1], [codes_val])
    erase_dead(y, stop=x)
    return True


def _fuse(graph: fx.Graph, x2: fx.Node) -> bool:
    qs = sr_readers(x2)
    if qs is None:
        return False
    xv = x2.meta.get("val")
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 2):
        return False
    ds = x2
    if any(call(x2, op) for op in _VIEWS):
        ds = x2.args[0]
        if not isinstance(ds, fx.Node) or len(ds.users) != 1:
            return False
    gh = _gelu_backward_args(ds)
    if gh is None:
        return False
    g, h = gh
    if not cpu_float32((g, h, ds)):
        return False
    vals = [n.meta["val"] for n in (g, h, ds)]
    d = xv.shape[-1]
    if vals[0].shape != vals[1].shape or vals[1].shape[-1] != d or vals[1].numel() >= 2**31:
        return False
    x, bias = _split_bias(h, d)
    ep = epilogue_through_views(g)

    def make_args(qs: list[fx.Node]) -> tuple[Any, ...]:
        rows, cols = emit_terms(graph, ep, detect_fake_mode(vals)) if ep is not None else ([], [])
        return (ep.acc if ep is not None else g, x, bias, [q.args[1] for q in qs], [q.args[2] for q in qs],
                ",".join(q.args[3] for q in qs), rows, cols)

    sums = bias_sums(x2)
    dbias_val = sums[0].meta["val"] if sums else xv.new_empty((d,))
    outs = replace_with_fused(graph, x2, qs, torch.ops.fqt.gelu_backward_sr_quantize.default, make_args, [xv, dbias_val])
    if outs is None:
        return False
    for u in sums:
        u.replace_all_uses_with(outs[1])
        graph.erase_node(u)
    x2.replace_all_uses_with(outs[0])
    for o in outs:
        if not o.users:
            graph.erase_node(o)
    erase_dead(x2, stop=g)
    if ep is not None:
        erase_dead(g, stop=ep.acc)
    return True


def fuse_gelu(gm: fx.GraphModule, cfg: FQTConfig, kind: str = "") -> dict[str, Any]:
    """Fuse every matched GELU backward + stochastic quantizers of ``gm`` in place.

    Returns ``{"fused": n, "fused_backward": m, "kernel": <kernel status>}`` (GELU + its output's
    quantizer; GELU backward + stochastic quantizers) and, where the pass did not run,
    ``"skipped": <why>``."""
    status = gelu_quant.status()
    if not cfg.fuse_gelu:
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": "fuse_gelu=False"}
    if not cfg.lower_int_gemm:
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": "lower_int_gemm=False (simulated graph)"}
    if not gelu_quant.available():
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": f"kernel {status}"}
    graph = gm.graph
    fused = fused_bwd = 0
    for q in list(graph.nodes):
        if call(q, torch.ops.fqt.quantize.default):
            fused += _fuse_forward(graph, q)
    for x2 in list(graph.nodes):
        if x2.op == "call_function" and any(call(u, torch.ops.fqt.sr_quantize.default) for u in x2.users):
            fused_bwd += _fuse(graph, x2)
    if fused or fused_bwd:
        graph.lint()
        gm.recompile()
    return {"fused": fused, "fused_backward": fused_bwd, "kernel": status}
