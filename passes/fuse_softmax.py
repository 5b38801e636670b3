"""fuse_softmax: a softmax whose output a per-tensor forward quantizer rounds becomes one call
of ``fqt::softmax_quantize``, and softmax's backward whose result stochastic gradient
quantizers round becomes one call of ``fqt::softmax_backward_sr_quantize``
(``fqt_compile/softmax_quant.py``).

Attention's probabilities ``P = softmax(S)`` feed the quantized product ``P @ V``; the
quantizer's per-tensor range needs all of ``P`` before any code, and inductor compiled the
softmax plus the quantizer into six passes over the (B, H, L, L) tensors. The fused op takes
two (docs/performance.md has the step-time effect).

Matched on the aten graphs of the backend's inner compiler (after ``lower_int_gemm``):

* ``fqt::quantize(P, bits, scheme, "tensor", axis)`` where ``P`` is
* ``aten._softmax(x, dim, False)`` over the last dimension (graphs without inductor's
  decompositions), or the decomposition inductor's tracing leaves,
  ``div(e, sum(e, [d], True))`` with ``e = exp(sub(x, amax(x, [d], True)))`` and ``d`` the
  last dimension,
* ``x`` float32 on the CPU.

``P``'s other users (the softmax backward, a saved activation) read the fused op's ``P``.

Backward: ``sr_quantize(view(ds, [N, D]), seed, bits, gran)`` nodes (1 to 4, granularity
tensor/row/column) on ``ds = softmax_backward(g, p) [* c]``, softmax's backward written as
``aten._softmax_backward_data(g, p, d, float32)`` or as inductor's decomposition
``prims.fma(neg(p), sum(g * p, [d], True), g * p)``, ``c`` a constant (the scores' scale).
Other users of the (N, D) view (a BHQ transform) read the fused op's ``ds``. The seed draws
after the view move up to the fused call with every seed draw in between, so the graph draws
its seeds in the same order as before and each quantizer keeps its seed (and its draws).
Runs only where the lowering does (``lower_int_gemm=True``: the simulated graph stays the
reference) and the kernel is available; the result says how many were fused and, if none
could be, why.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from torch._guards import detect_fake_mode

from ..config import FQTConfig
from .. import softmax_quant
from .epilogue import EpilogueMatch, emit_terms, match_epilogue

__all__ = ["fuse_softmax"]

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _last_dim(dims: Any, ndim: int) -> bool:
    if isinstance(dims, int):
        dims = [dims]
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % ndim == ndim - 1


def _softmax_input(p: fx.Node) -> fx.Node | None:
    """``x`` if ``p`` is ``softmax(x)`` over the last dimension (either form), else None."""
    val = p.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    ndim = val.dim()
    if _call(p, aten._softmax.default):
        x, dim, half_to_float = p.args
        return x if _last_dim(dim, ndim) and not half_to_float else None
    if not _call(p, aten.div.Tensor):
        return None
    e, s = p.args
    if not (_call(e, aten.exp.default) and _call(s, aten.sum.dim_IntList)):
        return None
    if s.args[0] is not e or not _last_dim(s.args[1], ndim) or not (len(s.args) > 2 and s.args[2]) or s.kwargs:
        return None
    d = e.args[0]
    if not _call(d, aten.sub.Tensor):
        return None
    x, m = d.args
    if not (_call(m, aten.amax.default) and m.args[0] is x and _last_dim(m.args[1], ndim)
            and len(m.args) > 2 and m.args[2]):
        return None
    return x


def _erase_dead(node: fx.Node, stop: fx.Node) -> None:
    """Erase ``node`` and then its inputs that it left without users (the softmax's own nodes),
    never ``stop`` (the softmax input)."""
    todo, erased = [node], set()
    while todo:
        n = todo.pop()
        if n is stop or n in erased or n.users or n.op != "call_function":
            continue
        todo.extend(n.all_input_nodes)
        n.graph.erase_node(n)
        erased.add(n)


def _softmax_backward_args(sb: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(g, p)`` if ``sb`` is softmax's backward over the last dimension for output ``p`` and
    incoming gradient ``g`` (``_softmax_backward_data`` or its decomposition
    ``fma(neg(p), sum(g * p, [d], True), g * p)``), else None."""
    val = sb.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    ndim = val.dim()
    if _call(sb, aten._softmax_backward_data.default):
        g, p, dim, dtype = sb.args
        return (g, p) if _last_dim(dim, ndim) and dtype == torch.float32 else None
    fma = getattr(torch.ops.prims, "fma", None)  # registered by inductor's decompositions
    if fma is None or not _call(sb, fma.default):
        return None
    neg, s, gp = sb.args
    if not (_call(neg, aten.neg.default) and _call(s, aten.sum.dim_IntList) and _call(gp, aten.mul.Tensor)):
        return None
    p = neg.args[0]
    if s.args[0] is not gp or not _last_dim(s.args[1], ndim) or not (len(s.args) > 2 and s.args[2]) or s.kwargs:
        return None
    a, b = gp.args
    g = b if a is p else a if b is p else None
    return (g, p) if isinstance(g, fx.Node) else None


_SR_GRANS = ("tensor", "row", "column")


def _fuse_backward(graph: fx.Graph, x2: fx.Node) -> bool:
    """Fuse the stochastic quantizers of ``x2`` = view(softmax_backward * c, [N, D]) with the
    softmax backward, if that is what ``x2`` is. True if fused."""
    qs = [u for u in x2.users if _call(u, torch.ops.fqt.sr_quantize.default)]
    if not qs or len(qs) > softmax_quant.MAX_QUANTIZERS or any(q.args[3] not in _SR_GRANS for q in qs):
        return False
    if any(u.target is not operator.getitem for q in qs for u in q.users):
        return False
    m = x2.args[0]
    scale = 1.0
    if _call(m, aten.mul.Tensor) and isinstance(m.args[1], (int, float)) and not isinstance(m.args[1], bool):
        sb, scale = m.args[0], float(m.args[1])
        if len(m.users) != 1:
            return False
    else:
        sb = m
    if not isinstance(sb, fx.Node) or len(sb.users) != 1:
        return False
    gp = _softmax_backward_args(sb)
    if gp is None:
        return False
    g, p = gp
    vals = [n.meta.get("val") for n in (g, p, sb)]
    if not all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device.type == "cpu" for v in vals):
        return False
    if vals[0].shape != vals[1].shape or vals[0].numel() >= 2**31:
        return False
    ep = _gemm_epilogue(g)
    xv = x2.meta.get("val")
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 2 and xv.shape[-1] == vals[0].shape[-1]):
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    qs.sort(key=order.__getitem__)
    seeds = [q.args[1] for q in qs]
    if any(order[sd] > order[x2] and not _call(sd, torch.ops.fqt.new_seed.default) for sd in seeds):
        return False
    # The fused call goes right after x2, before any of x2's users. Seeds drawn after x2 move up
    # to it, and with them every other seed draw in between, so that the graph draws its seeds in
    # the same order as before: each quantizer gets the seed it had in the unfused graph.
    last = max(order[sd] for sd in seeds)
    pos = x2
    for n in [n for n in graph.nodes if order[x2] < order[n] <= last and _call(n, torch.ops.fqt.new_seed.default)]:
        pos.append(n)
        pos = n
    with graph.inserting_before(pos.next):
        rows: list[fx.Node] = []
        cols: list[fx.Node] = []
        if ep is not None:
            rows, cols = emit_terms(graph, ep, detect_fake_mode([n.meta.get("val") for n in (g, p)]))
        node = graph.call_function(
            torch.ops.fqt.softmax_backward_sr_quantize.default,
            (ep.acc if ep is not None else g, p, scale, seeds, [q.args[2] for q in qs], ",".join(q.args[3] for q in qs),
             rows, cols),
        )
        outs = [graph.call_function(operator.getitem, (node, 0))]
        vals_out = [xv]
        for q in qs:
            for i in range(3):
                outs.append(graph.call_function(operator.getitem, (node, len(outs))))
                vals_out.append(q.meta["val"][i])
    node.meta["val"] = vals_out
    for o, v in zip(outs, vals_out):
        o.meta["val"] = v
    for k, q in enumerate(qs):
        for u in list(q.users):
            u.replace_all_uses_with(outs[1 + 3 * k + u.args[1]])
            graph.erase_node(u)
        graph.erase_node(q)
    x2.replace_all_uses_with(outs[0])
    if not outs[0].users:
        graph.erase_node(outs[0])
    _erase_dead(x2, stop=g)
    if ep is not None:
        _erase_dead(g, stop=ep.acc)
    return True


def _gemm_epilogue(g: fx.Node) -> EpilogueMatch | None:
    """The lowered GEMM epilogue ``g`` is (through views), if ``g`` has no other reader: the
    fused kernel then computes ``g`` from the int32 product, and the float ``g`` is never
    written (``passes/epilogue.py``)."""
    node = g
    while len(node.users) == 1 and any(_call(node, op) for op in _VIEWS):
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    if len(g.users) != 1 or len(node.users) != 1:
        return None
    return match_epilogue(node)


def fuse_softmax(gm: fx.GraphModule, cfg: FQTConfig, kind: str = "") -> dict[str, Any]:
    """Fuse every matched softmax + quantizer pattern of ``gm`` in place.

    Returns ``{"fused": n, "fused_backward": m, "kernel": <kernel status>}`` (forward-style
    softmax + quantizer fusions, softmax-backward + stochastic quantizer fusions) and, where the
    pass did not run, ``"skipped": <why>``."""
    status = softmax_quant.status()
    if not cfg.fuse_softmax:
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": "fuse_softmax=False"}
    if not cfg.lower_int_gemm:
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": "lower_int_gemm=False (simulated graph)"}
    if not softmax_quant.available():
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": f"kernel {status}"}
    graph = gm.graph
    fused = 0
    for q in list(graph.nodes):
        if not _call(q, torch.ops.fqt.quantize.default) or q.args[3] != "tensor":
            continue
        p = q.args[0]
        x = _softmax_input(p) if isinstance(p, fx.Node) else None
        xv = x.meta.get("val") if x is not None else None
        if not (isinstance(xv, torch.Tensor) and xv.dtype == torch.float32 and xv.device.type == "cpu"):
            continue
        if any(u.target is not operator.getitem for u in q.users):
            continue
        bits, scheme = q.args[1], q.args[2]
        with graph.inserting_before(p):
            node = graph.call_function(torch.ops.fqt.softmax_quantize.default, (x, bits, scheme))
            outs = [graph.call_function(operator.getitem, (node, i)) for i in range(4)]
        node.meta["val"] = (p.meta["val"], q.meta["val"][0], q.meta["val"][1], q.meta["val"][2])
        for i, o in enumerate(outs):
            o.meta["val"] = node.meta["val"][i]
        p.replace_all_uses_with(outs[0])
        for u in list(q.users):
            u.replace_all_uses_with(outs[1 + u.args[1]])
            graph.erase_node(u)
        graph.erase_node(q)
        _erase_dead(p, stop=x)
        fused += 1
    fused_bwd = 0
    for x2 in list(graph.nodes):
        if (_call(x2, aten.view.default) or _call(x2, aten.reshape.default)) and _fuse_backward(graph, x2):
            fused_bwd += 1
    if fused or fused_bwd:
        graph.lint()
        gm.recompile()
    return {"fused": fused, "fused_backward": fused_bwd, "kernel": status}
