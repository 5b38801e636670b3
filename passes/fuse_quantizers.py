"""fuse_quantizers: the stochastic quantizers of one gradient, and its column sums, in one kernel.

A linear layer's output gradient ``G`` (N x D) is rounded by two stochastic quantizers in the
backward graph, Q_b1 for the grad_input GEMM (per row by default) and Q_b2 for the grad_weight
GEMM (per column), and summed over rows for the bias gradient. Where nothing else fuses them
(``fuse_softmax``, ``fuse_gelu`` run first and take theirs), inductor compiles each quantizer
into its own loops over ``G``, with the column ranges read column-strip by column-strip.
This pass replaces every float32 CPU node read by at least two ``fqt::sr_quantize`` nodes
(and its ``sum(., [0])`` reader, if any) with one ``fqt::sr_quantize_multi``
(``fqt_compile/gelu_quant.py``): one pass over ``G`` for the ranges, the column sums and the
per-row quantizers, one for the per-column ones. Same quantizers, same seeds, same draws: the
codes, scales and offsets are bit-equal to the unfused graph's (``tests/test_fuse_quantizers.py``).

It runs after the other fusions, only where the GEMMs are lowered (``lower_int_gemm``) and the
kernel is available. A node with one quantizer is left to inductor, which fuses that into
the kernel producing ``G`` without another pass over it, unless ``G`` is in memory anyway
(a graph input, or the output of a call inductor does not fuse into: a GEMM, a convolution, an
``fqt::`` kernel, or a contiguous view of one): then the quantizer is marked
(``node.meta[C_KERNEL]``) and ``passes/decompose_fqt.py`` leaves it an ``fqt::sr_quantize``
call, which runs the same C kernel for one quantizer (``gelu_quant.sr_quantize_kernel``, codes
bit-equal). On the AMD machine of docs/performance.md that kernel quantized an 8192 x 1024
gradient per row in 2.2 and 3.1 ms (two runs) against 3.0 and 4.3 ms for inductor's loops
(``benchmarks/bench_quantizers.py``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fqt_compile import gelu_quant
from fqt_compile.config import FQTConfig

from .decompose_fqt import C_KERNEL
from .fused_sr import bias_sums, cpu_float32, replace_with_fused, sr_readers

__all__ = ["fuse_quantizers"]

aten = torch.ops.aten
#: ops inductor runs as calls of their own (it fuses no elementwise code into them): their
#: output is in memory, so a quantizer reading it saves nothing by being inlined
_EXTERN = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._int_mm.default,
           aten.convolution.default, aten.convolution_backward.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}


def _fuse(graph: fx.Graph, g: fx.Node) -> bool:
    qs = sr_readers(g)
    if qs is None or len(qs) < 2:
        return False
    if not _kernel_operand(g):
        return False
    gv = g.meta["val"]
    sums = bias_sums(g)
    colsum_val = sums[0].meta["val"] if sums else gv.new_empty((gv.shape[1],))

    def make_args(qs: list[fx.Node]) -> tuple[Any, ...]:
        return (g, [q.args[1] for q in qs], [q.args[2] for q in qs], ",".join(q.args[3] for q in qs))

    outs = replace_with_fused(graph, g, qs, torch.ops.fqt.sr_quantize_multi.default, make_args, [colsum_val])
    if outs is None:
        return False
    for u in sums:
        u.replace_all_uses_with(outs[0])
        graph.erase_node(u)
    if not outs[0].users:
        graph.erase_node(outs[0])
    return True


def fuse_quantizers(gm: fx.GraphModule, cfg: FQTConfig, kind: str = "") -> dict[str, Any]:
    """Fuse the stochastic quantizers (two or more) of each gradient node of ``gm`` in place.

    Returns ``{"fused": n, "kernel": <kernel status>}`` and, where the pass did not run,
    ``"skipped": <why>``."""
    status = gelu_quant.status()
    if not cfg.fuse_quantizers:
        return {"fused": 0, "kernel": status, "skipped": "fuse_quantizers=False"}
    if not cfg.lower_int_gemm:
        return {"fused": 0, "kernel": status, "skipped": "lower_int_gemm=False (simulated graph)"}
    if not gelu_quant.available():
        return {"fused": 0, "kernel": status, "skipped": f"kernel {status}"}
    graph = gm.graph
    fused = 0
    for g in list(graph.nodes):
        if g.op == "call_function" and sum(u.target is torch.ops.fqt.sr_quantize.default for u in g.users) >= 2:
            fused += _fuse(graph, g)
    if fused:
        graph.lint()
        gm.recompile()
    kernel = 0
    for q in graph.nodes:
        if q.target is torch.ops.fqt.sr_quantize.default and _c_kernel_pays(q.args[0]):
            q.meta[C_KERNEL] = True
            kernel += 1
    return {"fused": fused, "c_kernel": kernel, "kernel": status}


def _in_memory(x: Any) -> bool:
    """``x`` is a graph input, an extern call's output (``_EXTERN``, an ``fqt::`` op, an item
    of either) or a contiguous view of one: inductor reads it from memory whatever reads it."""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _VIEWS:
        val = x.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.is_contiguous()):
            return False
        x = x.args[0]
    if not isinstance(x, fx.Node):
        return False
    if x.op == "placeholder":
        return True
    if x.op != "call_function":
        return False
    src = x.args[0] if x.target is operator.getitem else x
    if not (isinstance(src, fx.Node) and src.op == "call_function"):
        return False
    return src.target in _EXTERN or getattr(src.target, "namespace", None) == "fqt"


def _kernel_operand(g: Any) -> bool:
    """``g`` is what the C kernel takes: a CPU float32 2-D node below 2**31 elements."""
    if not (isinstance(g, fx.Node) and cpu_float32([g])):
        return False
    gv = g.meta["val"]
    return gv.dim() == 2 and gv.numel() < 2**31


def _c_kernel_pays(g: Any) -> bool:
    """A lone quantizer's input for the C kernel: a kernel operand of static size, in memory
    anyway (``_in_memory``)."""
    val = g.meta.get("val") if isinstance(g, fx.Node) else None  # static first: no guard on a symbolic size
    return isinstance(val, torch.Tensor) and isinstance(val.numel(), int) and _kernel_operand(g) and _in_memory(g)
