"""lower_int_gemm: run the quantized GEMMs of the aten forward/backward graphs on integer kernels.

Every GEMM of a covered product reaches the aten graphs as one ``fqt::qmm`` node (see
``fqt_compile/gemm.py``): ``(a_codes * a_scale + a_offset) @ (b_codes * b_scale + b_offset)``.
With int8 codes the product splits exactly into an integer GEMM and a float epilogue, provided
the scales and offsets are constant along the contracted axis K (DESIGN.md section 4)::

    A @ B = sA * sB * (cA @ cB)            integer GEMM, int32 accumulation
          + sA * rowsum_K(cA) * oB          rank-1 zero-point corrections
          + oA * colsum_K(B~)

``rowsum``/``colsum`` are exact in float32 (|sum| <= 128 K < 2^24). The integer GEMM is
``aten._int_mm`` for 2-D CPU operands whose K keeps ``K * max|a| * max|b|`` below 2^31 (known
at compile time), else ``fqt::int_mm``, which splits K into int32-safe chunks at run time,
handles batched operands and pads for cuBLASLt. A qmm node is left simulated, with the
reason recorded, when a scale or offset varies along K (e.g. per-row Q_b2 in ``grad_weight``,
per-output-channel weights in ``grad_input``), when an operand is a float estimate rather than
codes (a BHQ/Hadamard transform on the contracted axis; exact QAT gradients), when the device
has no integer GEMM, or when ``config.lower_int_gemm`` is off. The lowered graph computes the
same estimator as the simulated one, to float rounding, from the same codes.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..config import FQTConfig
from ..gemm import int32_safe_k
from .decompose_fqt import Emitter

__all__ = ["lower_int_gemm", "LowerResult", "GemmDecision"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default  # what post-AOT graphs use for casts
_VIEW_OPS = {
    aten.t.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.clone.default,
}  # fmt: skip


@dataclass
class GemmDecision:
    """What the pass did with one quantized GEMM."""

    tag: str  # "<module>:<gemm>"
    module: str
    gemm: str  # "output" | "grad_input" | "grad_weight"
    lowered: bool
    reason: str
    kernel: str  # "aten._int_mm", "fqt.int_mm" or "simulated"
    mkn: tuple[int, ...] = ()  # (M, K, N) or (B, M, K, N); -1 where symbolic
    node: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, mkn=list(self.mkn))


@dataclass
class LowerResult:
    decisions: list[GemmDecision] = field(default_factory=list)

    @property
    def lowered(self) -> list[GemmDecision]:
        return [d for d in self.decisions if d.lowered]

    @property
    def simulated(self) -> list[GemmDecision]:
        return [d for d in self.decisions if not d.lowered]


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _static(s: Any) -> int:
    return s if isinstance(s, int) else -1


def _const_along(t: Any, dim: int) -> bool:
    """True if ``t`` (a scale/offset value) is constant along ``dim`` of its operand."""
    if not isinstance(t, torch.Tensor):
        return False
    if t.dim() == 0:
        return True
    return t.dim() >= -dim and _static(t.shape[dim]) == 1


def _is_zero_offset(node: Any) -> bool:
    """Offsets of symmetric forward quantizers are zero: skip their correction terms."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args):
        return False
    src = node.args[0]
    return (
        node.target is operator.getitem
        and node.args[1] == 2
        and isinstance(src, fx.Node)
        and src.target is torch.ops.fqt.quantize.default
        and src.args[2] == "symmetric"
    )


def _why_not(node: fx.Node, cfg: FQTConfig) -> str | None:
    a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, a_bits, b_bits, _ = node.args
    va, vb = _val(a_codes), _val(b_codes)
    if not cfg.lower_int_gemm:
        return "config.lower_int_gemm is False"
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return "operand shapes unknown (no meta['val'])"
    if va.dtype != torch.int8 or vb.dtype != torch.int8 or a_bits == 0 or b_bits == 0:
        return (
            "an operand is a float estimate, not integer codes (exact QAT gradient, or a "
            "BHQ/Hadamard transform that mixes the contracted axis)"
        )
    if va.device.type not in ("cpu", "cuda"):
        return f"no integer GEMM kernel on device {va.device.type!r}"
    for name, t in (("a_scale", a_scale), ("a_offset", a_offset)):
        if not _const_along(_val(t), -1):
            return f"{name} varies along the contracted axis K (shape {tuple(_val(t).shape)})"
    for name, t in (("b_scale", b_scale), ("b_offset", b_offset)):
        if not _const_along(_val(t), -2):
            return f"{name} varies along the contracted axis K (shape {tuple(_val(t).shape)})"
    return None


def lower_int_gemm(gm: fx.GraphModule, cfg: FQTConfig, kind: str = "") -> LowerResult:
    """Lower every lowerable ``fqt::qmm`` node of ``gm`` (in place); returns the decisions."""
    result = LowerResult()
    graph = gm.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.fqt.qmm.default:
            continue
        tag = node.args[8]
        module, _, gemm = tag.rpartition(":")
        va, vb = _val(node.args[0]), _val(node.args[3])
        mkn: tuple[int, ...] = ()
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            mkn = tuple(_static(s) for s in (*va.shape, vb.shape[-1]))
        reason = _why_not(node, cfg)
        d = GemmDecision(tag, module, gemm, False, reason or "", "simulated", mkn, node.name)
        if reason is None:
            try:
                _lower(node, graph, fake_mode, d)
            except Exception as e:
                raise RuntimeError(f"fqt lower_int_gemm failed on node {node.format_node()}: {e}") from e
        else:
            node.meta["fqt_lowering"] = d
        result.decisions.append(d)
        log.debug("lower_int_gemm[%s]: %s -> %s (%s)", kind, tag, d.kernel, d.reason)
    result.decisions.extend(_conv_decisions(graph))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    log.info(
        "lower_int_gemm[%s]: %d of %d GEMMs lowered", kind, len(result.lowered), len(result.decisions)
    )
    return result


_CONV_REASON = (
    "convolution: runs as a float convolution on dequantized codes (simulated); an im2col "
    "integer lowering is not implemented (measured on CPU by benchmarks/bench_conv.py: slower "
    "than the float convolution for kernels > 1, faster only for 1x1)"
)


_DEQUANT_STEPS = _VIEW_OPS | {aten.add.Tensor, aten.mul.Tensor, _convert, aten._to_copy.default}


def _from_dequantize(n: Any) -> bool:
    """True if ``n`` is dequantized int8 codes: fqt::dequantize, or its aten form
    ``convert(codes) * scale + offset`` (through views)."""
    while isinstance(n, fx.Node) and n.op == "call_function":
        if n.target is torch.ops.fqt.dequantize.default:
            return True
        if n.target not in _DEQUANT_STEPS:
            return False
        n = n.args[0]
    val = _val(n)
    return isinstance(val, torch.Tensor) and val.dtype == torch.int8


def _conv_decisions(graph: fx.Graph) -> list[GemmDecision]:
    """Report the convolutions of FQT products (forward: aten.convolution on dequantized
    codes; backward: convolution_backward with a dequantized weight) as simulated GEMMs."""
    from .insert_qdq import _normalize_path

    out = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is aten.convolution.default and _from_dequantize(n.args[1]):
            stack = n.meta.get("nn_module_stack") or n.meta.get("fwd_nn_module_stack")
            gemms = ["output"]
        elif n.target is aten.convolution_backward.default and _from_dequantize(n.args[2]):
            stack = n.meta.get("fwd_nn_module_stack") or n.meta.get("nn_module_stack")
            mask = n.args[10]
            gemms = [g for g, m in zip(("grad_input", "grad_weight"), mask[:2]) if m]
        else:
            continue
        if n.target is aten.convolution.default and "fwd_nn_module_stack" in n.meta:
            continue  # a forward convolution recomputed in the backward graph
        module = _normalize_path(list(stack.values())[-1][0]) if stack else ""
        for g in gemms:
            out.append(GemmDecision(f"{module}:{g}", module, g, False, _CONV_REASON, "simulated", (), n.name))
    return out


def _lower(node: fx.Node, graph: fx.Graph, fake_mode: Any, d: GemmDecision) -> None:
    a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, a_bits, b_bits, _ = node.args
    va = _val(a_codes)
    k = va.shape[-1]
    max_k = int32_safe_k(a_bits, b_bits)
    f32 = torch.float32
    with graph.inserting_before(node):
        e = Emitter(graph, fake_mode)
        # acc = cA @ cB, exact integer accumulation
        if va.dim() == 2 and va.device.type == "cpu" and isinstance(k, int) and k <= max_k:
            # oneDNN's int8 GEMM is ~3x slower on a transposed (column-major) operand than on
            # a row-major copy of it; the copy of int8 codes is cheap next to the GEMM
            a_in, b_in = (
                x if _val(x).is_contiguous() else e(aten.clone.default, x, memory_format=torch.contiguous_format)
                for x in (a_codes, b_codes)
            )
            acc = e(_convert, e(aten._int_mm.default, a_in, b_in), f32)
            d.kernel = "aten._int_mm"
        else:
            acc = e(torch.ops.fqt.int_mm.default, a_codes, b_codes, max_k)
            d.kernel = "fqt.int_mm"
        # out = sA * sB * acc + sA * rowsum(cA) * oB + oA * colsum(B~)
        out = e(aten.mul.Tensor, e(aten.mul.Tensor, acc, a_scale), b_scale)
        if not _is_zero_offset(b_offset):
            rows = e(aten.sum.dim_IntList, a_codes, [-1], True, dtype=f32)
            out = e(aten.add.Tensor, out, e(aten.mul.Tensor, e(aten.mul.Tensor, rows, a_scale), b_offset))
        if not _is_zero_offset(a_offset):
            b_deq = e(aten.add.Tensor, e(aten.mul.Tensor, e(_convert, b_codes, f32), b_scale), b_offset)
            cols = e(aten.sum.dim_IntList, b_deq, [-2], True)
            out = e(aten.add.Tensor, out, e(aten.mul.Tensor, cols, a_offset))
    d.lowered = True
    if d.kernel == "fqt.int_mm":
        d.reason = f"lowered (fqt.int_mm: batched, dynamic K or K > {max_k} split into int32-safe chunks)"
    else:
        d.reason = "lowered"
    out.meta["fqt_lowering"] = d
    node.replace_all_uses_with(out)
    graph.erase_node(node)
