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
  last dimension, or inductor's rewrite of a scaled softmax ``softmax(s * scale)`` (attention
  scores without a mask; :func:`_softmax_input`),
* ``x`` float32 on the CPU.

``P``'s other users (the softmax backward, a saved activation) read the fused op's ``P``.
Attention dropout between the softmax and its quantizer, ``fqt::quantize(fqt::dropout(P,
seed, p))``, goes into the op too (its seed and ``p``): the op rounds the dropped ``P`` and
returns ``P`` itself; the seed draw moves up to the op where it came after the softmax.
Other readers of the dropped ``P`` (nn.MultiheadAttention's returned weights) keep the
``fqt::dropout``, on the op's ``P``: the same counter-based mask.
Where ``x`` is ``[add](mul(s, c), mask)`` with ``s`` a lowered GEMM's result (through views)
and ``mask`` broadcasting to the last two dimensions -- the attention scores as SDPA's
decomposition writes them -- the op takes the int32 product, its epilogue terms, ``c`` and the
mask instead (:func:`_absorb_scores`); likewise the backward op takes ``g`` as an int32
product where ``g`` is a lowered GEMM's result read by nothing else.

Backward: ``sr_quantize(view(ds, [N, D]), seed, bits, gran)`` nodes (1 to 4, granularity
tensor/row/column) on ``ds = softmax_backward(g, p) [* c]``, softmax's backward written as
``aten._softmax_backward_data(g, p, d, float32)`` or as inductor's decomposition
``prims.fma(neg(p), sum(g * p, [d], True), g * p)``, ``c`` a constant (the scores' scale), and ``g`` possibly ``fqt::dropout(g', seed, p)`` (the
gradient through the forward's dropout), which the op then applies to ``g'``.
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
from .epilogue import EpilogueMatch, emit_terms
from .fused_sr import (call, cpu_float32, epilogue_through_views, erase_dead, replace_with_fused, sr_readers,
                       view_outputs, view_shape)

__all__ = ["fuse_softmax", "skipped_because"]

aten = torch.ops.aten


def _last_dim(dims: Any, ndim: int) -> bool:
    if isinstance(dims, int):
        dims = [dims]
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % ndim == ndim - 1


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shifted(d: Any, ndim: int) -> fx.Node | None:
    """``x`` if ``d`` is ``sub(x, amax(x, [last], True))``, else None."""
    if not call(d, aten.sub.Tensor):
        return None
    x, m = d.args
    if not (call(m, aten.amax.default) and m.args[0] is x and _last_dim(m.args[1], ndim)
            and len(m.args) > 2 and m.args[2]):
        return None
    return x


def _softmax_input(p: fx.Node) -> fx.Node | tuple[fx.Node, float] | None:
    """What ``p`` is the softmax of, over the last dimension, else None: ``x`` for ``softmax(x)``
    (``aten._softmax``, or ``div(e, sum(e, [d], True))`` with ``e = exp(sub(x, amax(x, [d],
    True)))``), or ``(y, k)`` for ``softmax(y * k)``, ``k`` a number.

    The second form is inductor's rewrite of a scaled softmax (torch/_inductor/fx_passes/
    joint_graph.py, ``mul_softmax_pattern``: attention scores without a mask reach softmax as
    ``s * scale``), which its joint-graph passes make before ours see the graph:
    ``exp(sub(y, amax(y)) * k)`` with ``y = s * sign``, ``k = sign * scale`` (torch up to
    2.12), and from 2.13 on ``exp(where(all(isfinite(x)), <that>, sub(x, amax(x))))`` with
    ``x = s * scale``, whose last branch is the first form's (the ``where`` picks between two
    ways of writing the same softmax of ``x``)."""
    val = p.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    ndim = val.dim()
    if call(p, aten._softmax.default):
        x, dim, half_to_float = p.args
        return x if _last_dim(dim, ndim) and not half_to_float else None
    if not call(p, aten.div.Tensor):
        return None
    e, s = p.args
    if not (call(e, aten.exp.default) and call(s, aten.sum.dim_IntList)):
        return None
    if s.args[0] is not e or not _last_dim(s.args[1], ndim) or not (len(s.args) > 2 and s.args[2]) or s.kwargs:
        return None
    d = e.args[0]
    if call(d, aten.where.self) and len(d.users) == 1:
        d = d.args[2]
    x = _shifted(d, ndim)
    if x is not None:
        return x
    if call(d, aten.mul.Tensor) and _scalar(d.args[1]) and len(d.users) == 1:
        y = _shifted(d.args[0], ndim)
        if y is not None:
            return y, float(d.args[1])
    return None


def _scaled_node(graph: fx.Graph, y: fx.Node, k: float, before: fx.Node) -> fx.Node:
    """A node for ``y * k`` before ``before``, with ``y = s * c`` (``c`` a number) written
    ``s * (c * k)`` so that :func:`_absorb_scores` sees the scores' scale on ``s``."""
    if call(y, aten.mul.Tensor) and _scalar(y.args[1]) and isinstance(y.args[0], fx.Node):
        y, k = y.args[0], float(y.args[1]) * k
    with graph.inserting_before(before):
        x = graph.call_function(aten.mul.Tensor, (y, k))
    x.meta["val"] = y.meta["val"] * k if isinstance(y.meta.get("val"), torch.Tensor) else None
    return x


def _softmax_backward_args(sb: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(g, p)`` if ``sb`` is softmax's backward over the last dimension for output ``p`` and
    incoming gradient ``g`` (``_softmax_backward_data`` or its decomposition
    ``fma(neg(p), sum(g * p, [d], True), g * p)``), else None."""
    val = sb.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    ndim = val.dim()
    if call(sb, aten._softmax_backward_data.default):
        g, p, dim, dtype = sb.args
        return (g, p) if _last_dim(dim, ndim) and dtype == torch.float32 else None
    fma = getattr(torch.ops.prims, "fma", None)  # registered by inductor's decompositions
    if fma is None or not call(sb, fma.default):
        return None
    neg, s, gp = sb.args
    if not (call(neg, aten.neg.default) and call(s, aten.sum.dim_IntList) and call(gp, aten.mul.Tensor)):
        return None
    p = neg.args[0]
    if s.args[0] is not gp or not _last_dim(s.args[1], ndim) or not (len(s.args) > 2 and s.args[2]) or s.kwargs:
        return None
    a, b = gp.args
    g = b if a is p else a if b is p else None
    return (g, p) if isinstance(g, fx.Node) else None


def _dropout_args(a: fx.Node, *, shared: bool = False) -> tuple[fx.Node, float] | None:
    """``(seed, p)`` if ``a`` is ``fqt::dropout(p_node, seed, p)`` with ``0 < p < 1`` read by one
    node (the quantizer it feeds, or softmax's backward; ``shared``: or by others too), else
    None."""
    if not call(a, torch.ops.fqt.dropout.default) or (len(a.users) != 1 and not shared):
        return None
    seed, p = a.args[1], a.args[2]
    if not (isinstance(seed, fx.Node) and isinstance(p, (int, float)) and 0.0 < p < 1.0):
        return None
    return seed, float(p)


def _seed_before(graph: fx.Graph, seed: fx.Node, p: fx.Node) -> bool:
    """Make the dropout's ``seed`` available where the fused op goes (before softmax's ``p``):
    True if it already is, or if it is a draw that moves up there without changing the order
    of the graph's draws (no other random op in between; it reads no node)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    if order[seed] < order[p]:
        return True
    if not call(seed, torch.ops.fqt.new_seed.default) or seed.all_input_nodes:
        return False
    between = [n for n in graph.nodes if order[p] <= order[n] < order[seed]]
    if any(n.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
           for n in between):
        return False
    p.prepend(seed)
    return True


def _quantizer_args(qs: list[fx.Node]) -> tuple[list[Any], list[int], str]:
    """The fused ops' (seeds, bits, granularities) arguments for the quantizers ``qs``."""
    return [q.args[1] for q in qs], [q.args[2] for q in qs], ",".join(q.args[3] for q in qs)


def _fuse_backward(graph: fx.Graph, x2: fx.Node) -> bool:
    """Fuse the stochastic quantizers of ``x2`` = view(softmax_backward * c, [N, D]) with the
    softmax backward, if that is what ``x2`` is. True if fused."""
    qs = sr_readers(x2)
    if qs is None:
        return False
    m = x2.args[0]
    scale = 1.0
    if call(m, aten.mul.Tensor) and isinstance(m.args[1], (int, float)) and not isinstance(m.args[1], bool):
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
    drop = _dropout_args(g)
    if drop is not None:  # the gradient through the forward's dropout of p: dropped in the kernel
        g = g.args[0]
        if not isinstance(g, fx.Node):
            return False
    if not cpu_float32((g, p, sb)):
        return False
    vals = [n.meta["val"] for n in (g, p, sb)]
    if vals[0].shape != vals[1].shape or vals[0].numel() >= 2**31:
        return False
    xv = x2.meta.get("val")
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 2 and xv.shape[-1] == vals[0].shape[-1]):
        return False
    ep = epilogue_through_views(g)

    def make_args(qs: list[fx.Node]) -> tuple[Any, ...]:
        rows, cols = emit_terms(graph, ep, detect_fake_mode(vals)) if ep is not None else ([], [])
        return (ep.acc if ep is not None else g, p, scale, *_quantizer_args(qs), rows, cols, *(drop or ()))

    outs = replace_with_fused(graph, x2, qs, torch.ops.fqt.softmax_backward_sr_quantize.default, make_args, [xv])
    if outs is None:
        return False
    x2.replace_all_uses_with(outs[0])
    if not outs[0].users:
        graph.erase_node(outs[0])
    erase_dead(x2, stop=g)
    if ep is not None:
        erase_dead(g, stop=ep.acc)
    return True


def _scores_parts(x: fx.Node) -> tuple[EpilogueMatch, float, fx.Node | None] | None:
    """``(epilogue, c, mask)`` if ``x`` is ``[add](mul(s, c), mask)`` (or ``[add](s, mask)``), ``s``
    a lowered GEMM's result through views and ``mask`` a float32 tensor broadcasting to ``x``'s
    last two dimensions (the attention scores as SDPA's decomposition writes them), else None.
    Every node of the chain must have one reader."""
    xv = x.meta["val"]
    if len(x.users) != 1 or xv.dim() < 1:
        return None
    lq = xv.shape[-2] if xv.dim() >= 2 else 1
    node, mask, scale = x, None, 1.0
    if call(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs:
        for a, b in (node.args, node.args[::-1]):
            av = a.meta.get("val") if isinstance(a, fx.Node) else None
            bv = b.meta.get("val") if isinstance(b, fx.Node) else None
            if (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor) and av.shape == xv.shape
                    and bv.dtype == torch.float32 and bv.dim() <= xv.dim() and all(d == 1 for d in bv.shape[:-2])
                    and bv.dim() >= 1 and bv.shape[-1] in (1, xv.shape[-1])
                    and (bv.dim() < 2 or bv.shape[-2] in (1, lq))):
                node, mask = a, b
                break
        else:
            return None
        if len(node.users) != 1:
            return None
    if call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
        node, scale = node.args[0], float(node.args[1])
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return None
    ep = epilogue_through_views(node)
    return (ep, scale, mask) if ep is not None else None


def _absorb_scores(graph: fx.Graph, node: fx.Node, outs: list[fx.Node], x: fx.Node) -> bool:
    """Where the fused softmax's input ``x`` is a lowered GEMM's result [times a constant]
    [plus a mask] (:func:`_scores_parts`), the op takes the int32 product, its epilogue terms,
    the constant and the mask instead, and the float scores are never written. The op's P and
    codes then have the product's shape ((B H, Lq, L) for attention): views give their readers
    ``x``'s shape."""
    parts = _scores_parts(x)
    if parts is None:
        return False
    ep, scale, mask = parts
    acc_shape = ep.acc.meta["val"].shape
    if mask is not None and mask.meta["val"].dim() > len(acc_shape):
        # a (1, 1, Lq, L) mask of 4-D scores: the product is (B H, Lq, L), and the op takes
        # masks of at most its rank; the leading dimensions are all 1 (_scores_parts)
        mv = mask.meta["val"]
        with graph.inserting_before(node):
            mask = graph.call_function(aten.view.default, (mask, list(mv.shape[-2:])))
        mask.meta["val"] = mv.view(mv.shape[-2:])
    new_vals = [outs[0].meta["val"].new_empty(acc_shape), outs[1].meta["val"].new_empty(acc_shape)]
    if any(view_shape(v) is None for v in (outs[0].meta["val"], outs[1].meta["val"])):
        return False
    with graph.inserting_before(node):
        rows, cols = emit_terms(graph, ep, detect_fake_mode([x.meta["val"]]))
    old_vals = [outs[0].meta["val"], outs[1].meta["val"]]
    node.args = (ep.acc, node.args[1], node.args[2], scale, mask, rows, cols, *node.args[7:])
    node.meta["val"] = (*new_vals, *node.meta["val"][2:])
    outs[0].meta["val"], outs[1].meta["val"] = new_vals
    view_outputs(graph, outs[:2], old_vals)
    erase_dead(x, stop=ep.acc)
    return True


def skipped_because(cfg: FQTConfig) -> str | None:
    """Why the pass does not run under ``cfg`` here, or None when it does (it then fuses the
    patterns the module docstring lists; ``passes.insert_qdq`` asks this too)."""
    if not cfg.fuse_softmax:
        return "fuse_softmax=False"
    if not cfg.lower_int_gemm:
        return "lower_int_gemm=False (simulated graph)"
    if not softmax_quant.available():
        return f"kernel {softmax_quant.status()}"
    return None


def fuse_softmax(gm: fx.GraphModule, cfg: FQTConfig, kind: str = "") -> dict[str, Any]:
    """Fuse every matched softmax + quantizer pattern of ``gm`` in place.

    Returns ``{"fused": n, "fused_backward": m, "kernel": <kernel status>}`` (forward-style
    softmax + quantizer fusions, softmax-backward + stochastic quantizer fusions) and, where the
    pass did not run, ``"skipped": <why>``."""
    status = softmax_quant.status()
    why = skipped_because(cfg)
    if why is not None:
        return {"fused": 0, "fused_backward": 0, "kernel": status, "skipped": why}
    graph = gm.graph
    fused = 0
    for q in list(graph.nodes):
        if not call(q, torch.ops.fqt.quantize.default) or q.args[3] != "tensor":
            continue
        p, drop = q.args[0], None
        # the dropped probabilities may have other readers (nn.MultiheadAttention's returned
        # weights): the dropout stays for them, on the fused op's P (the same counter-based mask)
        if isinstance(p, fx.Node) and (drop := _dropout_args(p, shared=True)) is not None:
            p = p.args[0]
        x = _softmax_input(p) if isinstance(p, fx.Node) else None
        scaled = None
        if isinstance(x, tuple):  # softmax(y * k): the op's input is a new node for y * k
            scaled, x = x, x[0]
        xv = x.meta.get("val") if x is not None else None
        if not (isinstance(xv, torch.Tensor) and xv.dtype == torch.float32 and xv.device.type == "cpu"):
            continue
        if any(u.target is not operator.getitem for u in q.users):
            continue
        if drop is not None and (xv.numel() >= 2**31 or not _seed_before(graph, drop[0], p)):
            continue  # the kernels draw the mask at 32-bit indices; fqt::dropout itself also has 64-bit ones
        bits, scheme = q.args[1], q.args[2]
        if scaled is not None:
            x = _scaled_node(graph, *scaled, before=p)
        with graph.inserting_before(p):
            node = graph.call_function(torch.ops.fqt.softmax_quantize.default,
                                       (x, bits, scheme, 1.0, None, [], [], *(drop or ())))
            outs = [graph.call_function(operator.getitem, (node, i)) for i in range(4)]
        node.meta["val"] = (p.meta["val"], q.meta["val"][0], q.meta["val"][1], q.meta["val"][2])
        for i, o in enumerate(outs):
            o.meta["val"] = node.meta["val"][i]
        dropped = q.args[0]
        for u in list(q.users):
            u.replace_all_uses_with(outs[1 + u.args[1]])
            graph.erase_node(u)
        graph.erase_node(q)
        if drop is not None and not dropped.users:
            graph.erase_node(dropped)
        p.replace_all_uses_with(outs[0])
        erase_dead(p, stop=x)
        _absorb_scores(graph, node, outs, x)
        fused += 1
    fused_bwd = 0
    for x2 in list(graph.nodes):
        if (call(x2, aten.view.default) or call(x2, aten.reshape.default)) and _fuse_backward(graph, x2):
            fused_bwd += 1
    if fused or fused_bwd:
        graph.lint()
        gm.recompile()
    return {"fused": fused, "fused_backward": fused_bwd, "kernel": status}
