"""Reading a lowered GEMM's scale epilogue back from an aten graph, for the fused kernels that
take the int32 product and its epilogue terms in place of the float result
(``fqt_compile/sr_fused.py``).

``lower_int_gemm._lower`` writes the float result of an integer GEMM as

    out = acc_f32 * sA * sB  [+ rows * sA * oB]  [+ cols * oA]

(``acc_f32`` the int32 product cast to float32; each factor broadcasts along rows (B?, M, 1),
along columns (B?, 1, N), or is a scalar). :func:`match_epilogue` recognises exactly that
shape of graph -- a left-leaning chain of ``add`` over products of ``mul`` -- whatever the
factors are, and returns the int32 product with each term's factors split into a row side and
a column side, so that a kernel computes ``acc * r0 * c0 + sum_t r_t * c_t`` per row in cache
and the float result (as large as the product) is never written. :func:`emit_terms` puts the
(small) products of each side into the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fqt_compile.sr_fused import MAX_EPILOGUE_TERMS

from .decompose_fqt import Emitter

__all__ = ["EpilogueMatch", "match_epilogue", "emit_terms"]

aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default
_INT_PRODUCERS = ("fqt.int_mm_amx", "fqt.bmm_int8", "fqt.mm_int8", "aten._int_mm")


@dataclass
class EpilogueMatch:
    """``out = acc * prod(rows[0]) * prod(cols[0]) + sum_t prod(rows[t]) * prod(cols[t])``."""

    acc: fx.Node  # the int32 product, (B, M, N) or (M, N), contiguous
    rows: list[list[fx.Node]]  # per term: factors broadcasting along rows (or scalars)
    cols: list[list[fx.Node]]  # per term: factors broadcasting along columns
    out: fx.Node


def _call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _factors(node: fx.Node, top: bool) -> list[fx.Node] | None:
    """The factors of a product ``mul(mul(a, b), c)``: a ``mul`` node with one user (or the
    term itself) is opened; every factor must be a node."""
    if _call(node, aten.mul.Tensor) and (top or len(node.users) == 1):
        out: list[fx.Node] = []
        for a in node.args:
            if not isinstance(a, fx.Node):
                return None
            f = _factors(a, False)
            if f is None:
                return None
            out += f
        return out
    return [node]


def _side(val: Any, b: int, m: int, n: int) -> str | None:
    """"row" if ``val`` broadcasts along rows of (b, m, n), "col" along columns, "scalar" for one
    element, else None."""
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or val.dim() > 3:
        return None
    if val.numel() == 1:
        return "scalar"
    shape = (1,) * (3 - val.dim()) + tuple(val.shape)
    if shape[0] not in (1, b):
        return None
    if shape[1:] == (m, 1):
        return "row"
    if shape[1:] == (1, n):
        return "col"
    return None


def _int_product(node: fx.Node) -> fx.Node | None:
    """The int32 product if ``node`` is its cast to float32."""
    if not (_call(node, _convert) and node.args[1] == torch.float32 and len(node.users) == 1):
        return None
    acc = node.args[0]
    val = acc.meta.get("val") if isinstance(acc, fx.Node) else None
    if not (isinstance(val, torch.Tensor) and val.dtype == torch.int32 and val.dim() in (2, 3) and val.is_contiguous()):
        return None
    op = acc.args[0] if acc.target is operator.getitem and acc.args[1] == 0 else acc  # int_mm_amx_sums
    if not (isinstance(op.target, torch._ops.OpOverload) and any(p in str(op.target) for p in _INT_PRODUCERS)):
        return None
    return acc


def match_epilogue(out: fx.Node) -> EpilogueMatch | None:
    """The epilogue whose result is ``out``, or None if ``out`` is not a lowered GEMM's float
    result (or one this form cannot express: more than MAX_EPILOGUE_TERMS terms, M or N of 1,
    a factor of another shape). Intermediate nodes must have one user each."""
    terms: list[fx.Node] = []
    node = out
    while _call(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs:
        a, t = node.args
        if not (isinstance(a, fx.Node) and isinstance(t, fx.Node)) or (node is not out and len(node.users) != 1):
            return None
        terms.append(t)
        node = a
    if node is not out and len(node.users) != 1:
        return None
    head = _factors(node, True)
    if head is None:
        return None
    accs = [(i, _int_product(f)) for i, f in enumerate(head)]
    accs = [(i, a) for i, a in accs if a is not None]
    if len(accs) != 1 or 1 + len(terms) > MAX_EPILOGUE_TERMS:
        return None
    i_acc, acc = accs[0]
    shape = tuple(acc.meta["val"].shape)
    b, m, n = (1, *shape) if len(shape) == 2 else shape
    if m == 1 or n == 1:
        return None
    rows: list[list[fx.Node]] = []
    cols: list[list[fx.Node]] = []
    for factors in [head[:i_acc] + head[i_acc + 1:]] + [_factors(t, True) for t in reversed(terms)]:
        if factors is None:
            return None
        r, c = [], []
        for f in factors:
            side = _side(f.meta.get("val"), b, m, n)
            if side is None:
                return None
            (c if side == "col" else r).append(f)
        rows.append(r)
        cols.append(c)
    return EpilogueMatch(acc, rows, cols, out)


def emit_terms(graph: fx.Graph, ep: EpilogueMatch, fake_mode: Any) -> tuple[list[fx.Node], list[fx.Node]]:
    """Nodes for each term's row product and column product (a 1.0 scalar for an empty side),
    inserted at the graph's current insertion point."""
    e = Emitter(graph, fake_mode)
    device = ep.acc.meta["val"].device

    def product(fs: list[fx.Node]) -> fx.Node:
        if not fs:
            return e(aten.scalar_tensor.default, 1.0, dtype=torch.float32, device=device)
        p = fs[0]
        for f in fs[1:]:
            p = e(aten.mul.Tensor, p, f)
        return p

    return [product(r) for r in ep.rows], [product(c) for c in ep.cols]
