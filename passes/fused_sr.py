"""Graph surgery shared by the passes that fuse an elementwise backward with the stochastic
quantizers of its result (``fuse_softmax.py``, ``fuse_gelu.py``; the kernels are in
``fqt_compile/sr_fused.py``), and by ``fuse_quantizers.py`` (the same with no elementwise op).

The pattern both passes rewrite: an (N, D) node ``x2`` (the elementwise backward's result,
viewed 2-D) read by 1 to MAX_QUANTIZERS ``fqt::sr_quantize`` nodes and possibly by others.
:func:`replace_with_fused` puts one call of the fused op right after ``x2``, rewires each
quantizer's outputs to the op's, and hands back the op's leading outputs (the gradient itself
and whatever else the op returns before the quantizers' outputs) for the caller to rewire the
other readers of ``x2``.

Seeds: the fused call takes every quantizer's seed. Seed draws (``fqt::new_seed``) after ``x2``
move up to the call, and with them every other seed draw in between, so that the graph draws
its seeds in the same order as before and each quantizer keeps its seed (and its draws).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fqt_compile.sr_fused import GRANS, MAX_QUANTIZERS

from .epilogue import EpilogueMatch, match_epilogue

__all__ = ["bias_sums", "call", "cpu_float32", "erase_dead", "sr_readers", "replace_with_fused",
           "epilogue_through_views", "view_shape", "view_outputs"]

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def call(node: Any, target: Any) -> bool:
    """``node`` is a call_function node of ``target``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def erase_dead(node: fx.Node, stop: fx.Node) -> None:
    """Erase ``node`` and then its inputs that it left without users, never ``stop`` nor
    anything that is not a call_function."""
    todo, erased = [node], set()
    while todo:
        n = todo.pop()
        if n is stop or n in erased or n.users or n.op != "call_function":
            continue
        todo.extend(n.all_input_nodes)
        n.graph.erase_node(n)
        erased.add(n)


def view_shape(val: Any) -> list[int] | None:
    """``val``'s shape as ``aten.view`` arguments a graph can hold: ints, with one symbolic size
    (a dynamic batch) written -1; None when more than one size is symbolic."""
    dims = list(val.shape)
    sym = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if len(sym) > 1:
        return None
    return [-1 if i in sym else int(d) for i, d in enumerate(dims)]


def view_outputs(graph: fx.Graph, outs: list[fx.Node], vals: list[Any]) -> bool:
    """Give each getitem of ``outs`` (a fused op's outputs, shaped as its input) a view to the
    shape of ``vals`` for its readers, where the shapes differ; False (nothing changed) when a
    shape cannot be written (:func:`view_shape`)."""
    shapes = [view_shape(v) for v in vals]
    if any(sh is None for sh in shapes):
        return False
    for o, v, sh in zip(outs, vals, shapes):
        if tuple(o.meta["val"].shape) == tuple(v.shape):
            continue
        with graph.inserting_after(o):
            view = graph.call_function(aten.view.default, (o, sh))
        view.meta["val"] = v
        o.replace_all_uses_with(view, delete_user_cb=lambda u: u is not view)
    return True


def cpu_float32(nodes: Sequence[fx.Node]) -> bool:
    """Every node's ``meta["val"]`` is a float32 CPU tensor (what the fused kernels take)."""
    vals = [n.meta.get("val") for n in nodes]
    return all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device.type == "cpu" for v in vals)


def bias_sums(x2: fx.Node) -> list[fx.Node]:
    """The readers of ``x2`` that are ``sum(x2, [0])`` (no keepdim, no dtype): a bias gradient,
    which the fused ops return as their column sums."""
    return [u for u in x2.users if call(u, aten.sum.dim_IntList) and u.args[0] is x2 and not u.kwargs
            and list(u.args[1]) == [0] and (len(u.args) < 3 or not u.args[2])]


def sr_readers(x2: fx.Node) -> list[fx.Node] | None:
    """The ``fqt::sr_quantize`` readers of ``x2`` if a fused op can take them all (1 to
    MAX_QUANTIZERS, known granularities, read only through getitem), else None."""
    qs = [u for u in x2.users if call(u, torch.ops.fqt.sr_quantize.default)]
    if not qs or len(qs) > MAX_QUANTIZERS or any(q.args[3] not in GRANS for q in qs):
        return None
    if any(u.target is not operator.getitem for q in qs for u in q.users):
        return None
    return qs


def epilogue_through_views(g: fx.Node) -> EpilogueMatch | None:
    """The lowered GEMM epilogue that ``g`` is (through views), if nothing else reads ``g`` or the
    views: a fused kernel then computes ``g`` from the int32 product, and the float ``g`` is never
    written (``passes/epilogue.py``)."""
    node = g
    while len(node.users) == 1 and any(call(node, op) for op in _VIEWS):
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    if len(g.users) != 1 or len(node.users) != 1:
        return None
    return match_epilogue(node)


def replace_with_fused(graph: fx.Graph, x2: fx.Node, qs: list[fx.Node], target: Any,
                       make_args: Callable[[list[fx.Node]], tuple[Any, ...]], head_vals: Sequence[Any]) -> list[fx.Node] | None:
    """Insert ``target(*make_args(qs))`` after ``x2`` (``qs`` in graph order; ``make_args`` runs
    at the insertion point, so nodes it emits land there); the op returns ``len(head_vals)`` leading outputs,
    then codes, scale, offset per quantizer of ``qs``. The quantizers are rewired and erased;
    returns the getitem nodes of the leading outputs (None, and nothing changed, when a seed
    is not a movable draw)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    qs = sorted(qs, key=order.__getitem__)
    seeds = [q.args[1] for q in qs]
    if any(order[sd] > order[x2] and not call(sd, torch.ops.fqt.new_seed.default) for sd in seeds):
        return None
    last = max(order[sd] for sd in seeds)
    pos = x2
    for n in [n for n in graph.nodes if order[x2] < order[n] <= last and call(n, torch.ops.fqt.new_seed.default)]:
        if pos.next is not n:  # already in place (torch 2.5's fx warns on moving a node onto itself)
            pos.append(n)
        pos = n
    with graph.inserting_before(pos.next):
        node = graph.call_function(target, make_args(qs))
        vals = list(head_vals)
        outs = [graph.call_function(operator.getitem, (node, i)) for i in range(len(vals))]
        for q in qs:
            for i in range(3):
                outs.append(graph.call_function(operator.getitem, (node, len(outs))))
                vals.append(q.meta["val"][i])
    node.meta["val"] = vals
    for o, v in zip(outs, vals):
        o.meta["val"] = v
    nh = len(head_vals)
    for k, q in enumerate(qs):
        for u in list(q.users):
            u.replace_all_uses_with(outs[nh + 3 * k + u.args[1]])
            graph.erase_node(u)
        graph.erase_node(q)
    return outs[:nh]
