"""lower_int_gemm: run the quantized GEMMs of the aten forward/backward graphs on integer kernels.

Every GEMM of a covered product reaches the aten graphs as one ``fqt::qmm`` node (see
``fqt_compile/gemm.py``): ``(a_codes * a_scale + a_offset) @ (b_codes * b_scale + b_offset)``.
With int8 codes the product splits exactly into an integer GEMM and a float epilogue, provided
the scales and offsets are constant along the contracted axis K (DESIGN.md section 4)::

    A @ B = sA * sB * (cA @ cB)            integer GEMM, int32 accumulation
          + sA * rowsum_K(cA) * oB          rank-1 zero-point corrections
          + oA * colsum_K(B~)

``rowsum``/``colsum`` are exact in float32 (|sum| <= 128 K < 2^24). The integer GEMM, for
CPU operands whose K keeps ``K * max|a| * max|b|`` below 2^31 (known at compile time), is
``fqt::int_mm_amx`` (2-D and batched; ``fqt_compile/amx.py``; ``fqt::int_mm_amx_sums`` where
the epilogue has a zero-point term: the same product plus rowsum_K(cA) and colsum_K(cB), taken
from the operands the kernel packs, so no other pass reads the codes) where the CPU has AMX-INT8,
else ``aten._int_mm`` for 2-D operands (``fqt::mm_int8``, the same with row-major operands, for
a convolution's), and ``fqt::bmm_int8`` (int32 out) for batched ones;
otherwise ``fqt::int_mm``, which splits K into int32-safe chunks at run time and pads for
cuBLASLt. A qmm node is left simulated, with the
reason recorded, when a scale or offset varies along K (e.g. per-row Q_b2 in ``grad_weight``,
per-output-channel weights in ``grad_input``), when an operand is a float estimate rather than
codes (a BHQ/Hadamard transform on the contracted axis; exact QAT gradients), when the device
has no integer GEMM, or when ``config.lower_int_gemm`` is off. The lowered graph computes the
same estimator as the simulated one, to float rounding, from the same codes.

Convolutions reach the graphs as ``fqt::qconv`` / ``qconv_grad_input`` / ``qconv_grad_weight``
(one node per conv GEMM, on int8 codes). Where exact and measured faster than the float
convolution (``_conv_rule``, from ``benchmarks/bench_conv.py``), a conv node is rewritten
into a channels-last im2col of the codes and an ``fqt::qmm`` node, which is then lowered like
any other (see the section on convolutions below); otherwise it stays, with its reason. On a
CPU where oneDNN's int8 convolution sums exactly (``gemm.conv_int8_available``), the
``output`` GEMM and a stride-1 ``grad_input`` run as that direct convolution
(``fqt::conv_int8``) instead of im2col + GEMM, with the same epilogue, under a rule of its
own (``_direct_rule``: from 32 channels; ``FQTConfig.direct_conv``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._prims_common import make_contiguous_strides_for

from .. import amx
from ..config import FQTConfig
from ..gemm import CONV_INT8_MAX_K, conv_int8_available, int32_safe_k
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
    kernel: str  # "fqt.int_mm_amx", "aten._int_mm", "fqt.mm_int8", "fqt.bmm_int8", "fqt.int_mm" (+ "im2col+" for convs), "fqt.conv_int8" or "simulated"
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
    """Offsets of symmetric forward quantizers are zero (and the literal zeros the conv
    lowering passes): skip their correction terms."""
    if isinstance(node, fx.Node) and node.target is aten.full.default and node.args[1] == 0:
        return True
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
            hint = ""
            if str(node.args[8]).endswith(":grad_input"):
                hint = " (per-channel weights: symmetric ones fold their scales into Q_b1 and lower; affine ones do not)"
            return f"{name} varies along the contracted axis K (shape {tuple(_val(t).shape)}){hint}"
    return None


def lower_int_gemm(gm: fx.GraphModule, cfg: FQTConfig, kind: str = "") -> LowerResult:
    """Lower every lowerable ``fqt::qmm`` node of ``gm`` (in place); returns the decisions."""
    result = LowerResult()
    graph = gm.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    # qmm node of a lowered convolution -> (its decision, its sums, the decision of the
    # strided grad_input it is one phase of, or None)
    conv_note: dict[fx.Node, tuple[GemmDecision, dict[str, Any], GemmDecision | None]] = {}
    phase_of: dict[int, tuple[int, list[GemmDecision], list[int]]] = {}  # id of such a grad_input's -> (count, phases lowered)
    for node in list(graph.nodes):
        gemm_kind = _QCONV_GEMM.get(node.target) if node.op == "call_function" else None
        if gemm_kind is None:
            continue
        tag = node.args[-1]
        # a transposed convolution's GEMMs are a convolution's with the roles exchanged
        # (functional.fqt_conv_transpose): its tag, "<module>[transposed]:<gemm>", names the
        # product's own GEMM
        module, _, gemm = tag.rpartition(":")
        transposed = module.endswith(TRANSPOSED)
        reason, mkn, direct = _conv_why_not(node, cfg, gemm_kind, transposed)
        phases: list[tuple[fx.Node, bool]] = []
        c = _conv_args(node)
        if reason is None and cfg.conv_phases and _phased(gemm_kind, c):
            try:
                phases, reason = _split_phases(node, graph, fake_mode, cfg)
            except Exception as e:
                raise RuntimeError(f"fqt lower_int_gemm failed on node {node.format_node()}: {e}") from e
        if reason is not None and transposed:
            reason += f" (a transposed convolution's {gemm} GEMM, run as a convolution's {gemm_kind} GEMM)"
        d = GemmDecision(tag, module, gemm or gemm_kind, False, reason or "", "simulated", mkn, node.name)
        if reason is None:
            try:
                if phases:  # one output GEMM per phase, each lowered as its own; d gathers them
                    phase_of[id(d)] = (len(phases), [], list(c.stride))
                    shifted: dict[fx.Node, fx.Node] = {}  # the gradient's uint8 copy, made once
                    for sub, sub_direct in phases:
                        mm, sums = _lower_conv(sub, graph, fake_mode, "output", sub_direct, shifted)
                        conv_note[mm] = (dataclasses.replace(d), sums, d)
                else:
                    mm, sums = _lower_conv(node, graph, fake_mode, gemm_kind, direct)
                    conv_note[mm] = (d, sums, None)
            except Exception as e:
                raise RuntimeError(f"fqt lower_int_gemm failed on node {node.format_node()}: {e}") from e
        else:
            node.meta["fqt_lowering"] = d
            result.decisions.append(d)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.fqt.qmm.default:
            continue
        if node in conv_note:  # the GEMM of a lowered convolution (im2col)
            d, sums, whole = conv_note[node]
            _lower(node, graph, fake_mode, d, sums, conv=True)
            if d.kernel == "fqt.conv_int8":
                d.reason = "lowered (direct int8 convolution, oneDNN)"
            else:
                d.reason = "lowered (im2col)" if d.reason == "lowered" else d.reason.replace("lowered (", "lowered (im2col; ", 1)
                d.kernel = "im2col+" + d.kernel
            if whole is None:
                result.decisions.append(d)
                continue
            count, done, stride = phase_of[id(whole)]
            done.append(d)
            if len(done) == count:
                _gather_phases(whole, done, stride)
                result.decisions.append(whole)
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
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    log.info(
        "lower_int_gemm[%s]: %d of %d GEMMs lowered", kind, len(result.lowered), len(result.decisions)
    )
    return result


# ---------------------------------------------------------------------------------------------
# convolutions: fqt::qconv / qconv_grad_input / qconv_grad_weight -> im2col + fqt::qmm
# ---------------------------------------------------------------------------------------------
#
# Channels-last im2col of int8 codes: columns (B*L, kh*kw*C), L = Ho*Wo output positions,
# column index (i, j, c). With it the three conv GEMMs are plain GEMMs:
#
#   output      : cols(X) (B*L, K) @ W^T (K, O)           -> (B, Ho, Wo, O)      K = kh*kw*C
#   grad_input  : G (B*L, O) @ W (O, K) -> columns        -> col2im (sum of the
#                 k*k shifted column blocks, in float)    -> (B, C, H, W)
#   grad_weight : G^T (O, B*L) @ cols(X) (B*L, K)          -> (O, kh, kw, C)
#
# Zero padding: a padded entry must be the value 0, which codes * s + o represents only if
# o / s is an integer level. So padded entries get code 0 and no offset: the GEMM is given
# offset 0 for that operand and the offset's contribution over the real (unpadded) entries is
# added back exactly: o * (M @ B~) with M the (L, K) 0/1 im2col of ones (output), or
# o * (sum_b G~) (O, L) @ M (grad_weight). Both are small float products.
#
# Which way is faster on the target is measured by benchmarks/bench_conv.py (float
# convolution vs this lowering, per GEMM, epilogue included); the rule below follows it.

_QCONV_GEMM = {
    torch.ops.fqt.qconv.default: "output",
    torch.ops.fqt.qconv_grad_input.default: "grad_input",
    torch.ops.fqt.qconv_grad_weight.default: "grad_weight",
}

# When im2col + int8 GEMM beats the float convolution on this CPU, read off
# benchmarks/bench_conv.py (benchmarks/results/conv.json, table in docs/performance.md).
# Building the columns costs ~M*K bytes of traffic; the integer GEMM repays it in proportion to
# N. Measured: N >= 64 wins when the int8 columns stay within ~32 MiB (0.3-0.75x the float
# time), ties or loses beyond (a 56x56, 64-channel conv: 1.0-1.4x); N <= 32 ties or loses;
# a first layer (K = 9) loses 6-10x. grad_input with stride > 1 would correlate a gradient
# with stride-1 zeros inserted (s^2 times the work): 3.9x slower. grad_weight (M = out
# channels) wins from M >= 32 with N = k*k*C >= 64.
#
# oneDNN's direct int8 convolution (output, stride-1 grad_input; ``_direct_conv``) builds no
# columns and beat the float convolution from K >= 64 and N >= 32 (0.46-0.90x its time in
# four runs; 64+ channels 0.46-0.62x); below, it loses or ties: a 1-channel stem's output
# (K = 9) 1.9-2.7x, 8 and 16 channels 0.59-1.25x (benchmarks/results/conv_zen5_s17_direct.json,
# docs/performance.md, Direct int8 convolution).
CONV_RULE = True  # benchmarks/bench_conv.py turns it off to time the lowering everywhere
#: the suffix of a transposed convolution's module in its GEMM tags (functional.fqt_conv_transpose)
TRANSPOSED = "[transposed]"
_COLS_CACHE_BYTES = 32 * 2**20


def _direct_conv(gemm: str, c: "_ConvArgs", weight: torch.Tensor, k: int) -> bool:
    """Whether this conv GEMM runs as ``fqt::conv_int8`` (oneDNN's direct int8 convolution):
    ``output``, or ``grad_input`` of a stride-1 convolution whose padding is at most its
    dilated kernel's reach (the transposed convolution is then a direct one with non-negative
    padding), on a CPU where :func:`conv_int8_available`, with codes of at most 8 bits and
    K = C*kh*kw within oneDNN's exact int32 range."""
    if weight.device.type != "cpu" or max(c.a_bits, c.b_bits) > 8 or k > CONV_INT8_MAX_K:
        return False
    if gemm == "grad_input":
        ks = [_static(s) for s in weight.shape[2:]]
        if any(s != 1 for s in c.stride) or any(p > d * (n - 1) for p, d, n in zip(c.padding, c.dilation, ks)):
            return False
    elif gemm != "output":
        return False
    return conv_int8_available()


def _direct_rule(mkn: tuple[int, ...]) -> str | None:
    """None if the direct int8 convolution is expected faster than the float one (see
    above), else why not (the im2col rule, stricter, rejects these shapes too)."""
    _, k, n = mkn
    small = [f"{name}={v} < {lim}" for name, v, lim in (("K", k, 64), ("N", n, 32)) if v < lim]
    if small:
        return (f"convolution: {' and '.join(small)}, where oneDNN's direct int8 convolution and im2col + int8 "
                "GEMM measured slower than the float convolution (benchmarks/bench_conv.py)")
    return None


def _conv_rule(gemm: str, mkn: tuple[int, ...], stride: list[int]) -> str | None:
    """None if the im2col lowering is expected faster than the float convolution (see
    above), else why not."""
    m, k, n = mkn
    slower = "im2col + int8 GEMM measured slower than the float convolution (benchmarks/bench_conv.py)"
    if gemm == "grad_weight":
        small = [f"{name}={v} < {lim}" for name, v, lim in (("M (out-channels)", m, 32), ("N (k*k*C)", n, 64)) if v < lim]
        if small:
            return f"convolution: {' and '.join(small)}, where {slower}"
        return None
    if gemm == "grad_input" and any(s != 1 for s in stride):
        return f"convolution: stride {stride} (grad_input would run on a zero-dilated gradient), where {slower}"
    small = [f"{name}={v} < 64" for name, v in (("K", k), ("N", n)) if v < 64]
    if small:
        return f"convolution: {' and '.join(small)}, where {slower}"
    if n < 128 and m * k > _COLS_CACHE_BYTES:
        return f"convolution: N={n} < 128 with {m * k / 2**20:.0f} MiB of int8 columns (> 32 MiB), where {slower}"
    return None


@dataclass
class _ConvArgs:
    a: tuple[Any, Any, Any]  # codes, scale, offset of the first operand
    b: tuple[Any, Any, Any]
    a_bits: int
    b_bits: int
    shape: list[int] | None  # input_shape / weight_shape of the backward GEMMs
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    tag: str


def _conv_args(node: fx.Node) -> _ConvArgs:
    a = tuple(node.args[0:3])
    b = tuple(node.args[3:6])
    if node.target is torch.ops.fqt.qconv.default:
        a_bits, b_bits, stride, padding, dilation, groups, tag = node.args[6:]
        shape = None
    else:
        a_bits, b_bits, shape, stride, padding, dilation, groups, tag = node.args[6:]
    return _ConvArgs(a, b, a_bits, b_bits, shape, list(stride), list(padding), list(dilation), groups, tag)  # type: ignore[arg-type]


def _const_dims(t: Any, dims: tuple[int, ...]) -> bool:
    """True if scale/offset value ``t`` is constant along ``dims`` of its operand."""
    if not isinstance(t, torch.Tensor):
        return False
    return t.dim() == 0 or all(_static(t.shape[d]) == 1 for d in dims)


def _conv_geometry(x_shape: Any, w_shape: Any, c: _ConvArgs) -> tuple[int, int, int] | None:
    """(M, K, N) of the GEMM as lowered, from static shapes (None if any is symbolic)."""
    dims = [*x_shape, *w_shape]
    if not all(isinstance(s, int) for s in dims):
        return None
    b, ch, *sp = x_shape
    o, _, *ks = w_shape
    out_sp = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(sp, c.padding, c.dilation, ks, c.stride)]
    positions = math.prod(out_sp)
    kk = math.prod(ks) * ch
    return b * positions, kk, o


def _conv_why_not(node: fx.Node, cfg: FQTConfig, gemm: str,
                  transposed: bool = False) -> tuple[str | None, tuple[int, ...], bool]:
    """(None if this conv GEMM lowers, else why not; its (M, K, N); whether it lowers as
    oneDNN's direct int8 convolution rather than im2col + integer GEMM). ``transposed``: the
    GEMM belongs to a transposed convolution (``fqt_conv_transpose``: the roles exchanged), for
    the operands' names in the reasons."""
    c = _conv_args(node)
    va, vb = _val(c.a[0]), _val(c.b[0])
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return "operand shapes unknown (no meta['val'])", (), False
    if gemm == "output":
        x_shape, w_shape = va.shape, vb.shape
    elif gemm == "grad_input":
        x_shape, w_shape = c.shape, vb.shape
    else:
        x_shape, w_shape = vb.shape, c.shape
    geo = _conv_geometry(list(x_shape), list(w_shape), c)
    mkn: tuple[int, ...] = ()
    if geo is not None:
        m, k, n = geo
        # grad_input runs as a direct convolution of the (stride-dilated) gradient with the
        # flipped kernel: M = input positions, K = kernel window x out-channels, N = C
        x_pos = math.prod(x_shape[0:1] + x_shape[2:])
        mkn = {"output": (m, k, n), "grad_input": (x_pos, k // x_shape[1] * n, x_shape[1]), "grad_weight": (n, m, k)}[gemm]
    if not cfg.lower_int_gemm:
        return "config.lower_int_gemm is False", mkn, False
    if va.dtype != torch.int8 or vb.dtype != torch.int8 or c.a_bits == 0 or c.b_bits == 0:
        return (
            "an operand is a float estimate, not integer codes (exact QAT gradient, or a "
            "BHQ/Hadamard transform that mixes the samples grad_weight contracts over)"
        ), mkn, False
    if va.device.type not in ("cpu", "cuda"):
        return f"no integer GEMM kernel on device {va.device.type!r}", mkn, False
    if va.dim() not in (3, 4):
        return "convolution: only 1-D and 2-D convolutions are lowered (im2col); 3-D stays simulated", mkn, False
    if c.groups != 1:
        return f"convolution: groups={c.groups} (only groups=1 is lowered)", mkn, False
    if geo is None:
        return "convolution: symbolic shapes (the im2col lowering needs static shapes)", mkn, False
    # constant along the contracted axes (DESIGN.md section 4)
    nd = va.dim()
    spatial = tuple(range(2, nd))
    contracted = {
        "output": ((1, *spatial), tuple(range(1, nd))),  # X: channels x window; W: all but O
        "grad_input": ((1, *spatial), (0, *spatial)),  # G: out-channels x window; W: out-channels x window
        "grad_weight": ((0, *spatial), (0, *spatial)),  # G and X: batch x positions
    }[gemm]
    for which, ops_, dims in (("first", c.a, contracted[0]), ("second", c.b, contracted[1])):
        for label, t in zip(("scale", "offset"), ops_[1:]):
            if not _const_dims(_val(t), dims):
                roles = {"output": ("input", "weight"), "grad_input": ("gradient (Q_b1)", "weight"),
                         "grad_weight": ("gradient (Q_b2)", "input")}
                if transposed:  # the roles of the convolution's GEMM this one runs as
                    roles = {"grad_input": ("input", "weight"), "output": ("gradient (Q_b1)", "weight"),
                             "grad_weight": ("input", "gradient (Q_b2)")}
                role = roles[gemm][0 if which == "first" else 1]
                why = (f"the {role} {label} varies along the contracted axis (shape {tuple(_val(t).shape)})")
                if gemm == "grad_weight" and role == "gradient (Q_b2)":
                    why += "; a conv's grad_weight contracts over samples and positions: only a per-tensor Q_b2 lowers"
                return why, mkn, False
    if cfg.conv_phases and _phased(gemm, c):  # each phase is decided as the output GEMM it runs as (_split_phases)
        return None, mkn, False
    if cfg.direct_conv and _direct_conv(gemm, c, vb, mkn[1]):
        why = _direct_rule(mkn) if CONV_RULE else None
        # a 1x1 kernel's grad_input columns are the gradient itself (no copy to pay for):
        # im2col + integer GEMM measured faster there (0.41-0.43x the float convolution
        # against 0.52-0.56x direct, four runs), where its rule lowers it
        one_by_one = gemm == "grad_input" and all(_static(k) == 1 for k in vb.shape[2:])
        if why is None and CONV_RULE and one_by_one and _conv_rule(gemm, mkn, c.stride) is None:
            return None, mkn, False
        return why, mkn, why is None
    return (_conv_rule(gemm, mkn, c.stride) if CONV_RULE else None), mkn, False


def _zero(e: Emitter, like: fx.Node) -> fx.Node:
    return e(aten.full.default, [], 0.0, dtype=torch.float32, device=_val(like).device)


class _ConvEmitter:
    """Emits the im2col graph pieces of one 2-D convolution geometry (a 1-D one is viewed as
    2-D with H = 1): input (B, C, H, W), weight (O, C, kh, kw), stride, padding (top, bottom,
    left, right), dilation."""

    def __init__(self, e: Emitter, x_shape: list[int], w_shape: list[int], stride: list[int],
                 pads: list[int], dilation: list[int], one_d: bool) -> None:  # fmt: skip
        self.e, self.one_d = e, one_d
        self.B, self.C, self.H, self.W = x_shape
        self.O, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.dh, self.dw) = stride, dilation
        self.pads = pads
        pt, pb, pl, pr = pads
        self.Ho = (self.H + pt + pb - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.Wo = (self.W + pl + pr - self.dw * (self.kw - 1) - 1) // self.sw + 1
        self.L = self.Ho * self.Wo
        self.K = self.kh * self.kw * self.C
        self.padded = any(p != 0 for p in pads)

    @classmethod
    def of(cls, e: Emitter, c: _ConvArgs, x_shape: list[int], w_shape: list[int]) -> "_ConvEmitter":
        if len(x_shape) == 3:  # 1-D: (B, C, L) as (B, C, 1, L)
            x4, w4 = [x_shape[0], x_shape[1], 1, x_shape[2]], [w_shape[0], w_shape[1], 1, w_shape[2]]
            (p,) = c.padding
            return cls(e, x4, w4, [1, *c.stride], [0, 0, p, p], [1, *c.dilation], True)
        ph, pw = c.padding
        return cls(e, list(x_shape), list(w_shape), c.stride, [ph, ph, pw, pw], c.dilation, False)

    # Only ops with an inductor lowering (no t / flip / stack / ones: inductor asserts on ops
    # it would decompose but cannot lower, as this pass runs after decomposition).

    def as4d(self, n: fx.Node) -> fx.Node:
        return self.e(aten.unsqueeze.default, n, 2) if self.one_d else n

    def stack(self, pieces: list[fx.Node], dim: int) -> fx.Node:
        if len(pieces) == 1:
            return self.e(aten.unsqueeze.default, pieces[0], dim)
        return self.e(aten.cat.default, [self.e(aten.unsqueeze.default, p, dim) for p in pieces], dim)

    def flip_hw(self, w4d: fx.Node) -> fx.Node:
        """W[:, :, ::-1, ::-1]: reversing both kernel dims reverses the flattened window."""
        e = self.e
        o, c, kh, kw = _val(w4d).shape
        w3 = e(aten.reshape.default, w4d, [o, c, kh * kw])
        rev = [e(aten.slice.Tensor, w3, 2, f, f + 1) for f in reversed(range(kh * kw))]
        return e(aten.reshape.default, rev[0] if len(rev) == 1 else e(aten.cat.default, rev, 2), [o, c, kh, kw])

    def from4d(self, n: fx.Node) -> fx.Node:
        return self.e(aten.squeeze.dim, n, 2) if self.one_d else n

    def _pad_hw(self, t: fx.Node, channels_last: bool = False) -> fx.Node:
        """Zero-pad (or crop, for negative pads) the H, W dims of ``t``."""
        if not self.padded:
            return t
        pt, pb, pl, pr = self.pads
        pad = [0, 0, pl, pr, pt, pb] if channels_last else [pl, pr, pt, pb]
        return self.e(aten.constant_pad_nd.default, t, pad, 0.0)

    def windows(self, t: fx.Node, h_dim: int) -> list[fx.Node]:
        """The kh*kw strided (Ho, Wo) windows of ``t`` along dims (h_dim, h_dim + 1), in
        column order (i, j)."""
        e, out = self.e, []
        for i in range(self.kh):
            for j in range(self.kw):
                r0, c0 = i * self.dh, j * self.dw
                p = e(aten.slice.Tensor, t, h_dim, r0, r0 + self.sh * (self.Ho - 1) + 1, self.sh)
                out.append(e(aten.slice.Tensor, p, h_dim + 1, c0, c0 + self.sw * (self.Wo - 1) + 1, self.sw))
        return out

    def im2col(self, x4d: fx.Node) -> fx.Node:
        """(B, C, H, W) -> (B*L, K) columns, zero padded, channels last, column order (i, j, c)."""
        e = self.e
        cl = self._pad_hw(e(aten.permute.default, x4d, [0, 2, 3, 1]), channels_last=True)
        b = _val(x4d).shape[0]
        if self.dh == 1 and self.dw == 1:  # two unfold views and one copy
            u = e(aten.unfold.default, e(aten.unfold.default, cl, 1, self.kh, self.sh), 2, self.kw, self.sw)
            cols = e(aten.permute.default, u, [0, 1, 2, 4, 5, 3])  # (B, Ho, Wo, kh, kw, C)
        else:
            pieces = self.windows(cl, 1)
            cols = self.stack(pieces, 3)
        return e(aten.reshape.default, cols, [b * self.L, self.K])

    def cols_rowsum(self, x4d: fx.Node) -> fx.Node:
        """rowsum_K of im2col(x) as (B*L, 1) float32, from the input: sum over channels
        first, then over each window (C times less work than summing the columns)."""
        e = self.e
        ch = self._pad_hw(e(aten.sum.dim_IntList, x4d, [1], False, dtype=torch.float32))  # (B, Hp, Wp)
        total = None
        for w in self.windows(ch, 1):
            total = w if total is None else e(aten.add.Tensor, total, w)
        return e(aten.reshape.default, total, [_val(x4d).shape[0] * self.L, 1])

    def cols_colsum(self, x4d: fx.Node) -> fx.Node:
        """colsum over the B*L rows of im2col(x) as (1, K) float32, from the input: sum over
        the batch first, then each window over the positions."""
        e = self.e
        bsum = self._pad_hw(e(aten.sum.dim_IntList, x4d, [0], False, dtype=torch.float32))  # (C, Hp, Wp)
        per = [e(aten.sum.dim_IntList, w, [1, 2]) for w in self.windows(bsum, 1)]  # kh*kw x (C,)
        return e(aten.reshape.default, self.stack(per, 0), [1, self.K])

    def w_rows(self, w4d: fx.Node) -> fx.Node:
        """(O, C, kh, kw) -> (O, K) in column order (i, j, c)."""
        e = self.e
        return e(aten.reshape.default, e(aten.permute.default, w4d, [0, 2, 3, 1]), [self.O, self.K])

    def k_row(self, t: fx.Node) -> fx.Node:
        """A scale/offset of a (., C, kh, kw)-shaped operand, constant along its first dim,
        as () or a (1, K) row in column order (i, j, c)."""
        if _val(t).dim() == 0:
            return t
        e = self.e
        t = e(aten.permute.default, self.as4d(t), [0, 2, 3, 1])
        return e(aten.reshape.default, e(aten.expand.default, t, [1, self.kh, self.kw, self.C]), [1, self.K])

    def pos_rows(self, t: fx.Node) -> fx.Node:
        """A scale/offset of a (B, ., Ho, Wo)-shaped operand, constant along dim 1, as () or a
        (B*L, 1) column over the rows (b, ho, wo)."""
        if _val(t).dim() == 0:
            return t
        e = self.e
        t = e(aten.permute.default, self.as4d(t), [0, 2, 3, 1])
        return e(aten.reshape.default, e(aten.expand.default, t, [self.B, self.Ho, self.Wo, 1]), [self.B * self.L, 1])

    def direct(self, x4d: fx.Node, w4d: fx.Node, stride: list[int], padding: list[int], n: int,
               shifted: dict[fx.Node, fx.Node] | None = None) -> fx.Node:
        """``fqt::conv_int8`` of 4-D codes, as the (B*L, n) float32 product the im2col GEMM
        would give: its (B, Ho, Wo, n) result viewed as rows (b, ho, wo). The input goes in
        as ``gemm.shift_codes`` does it (codes + 128, uint8, channels last), a copy inductor
        fuses into the kernel that makes the codes. ``shifted``: such copies already made,
        by codes node (a strided grad_input's phases share the gradient's)."""
        e = self.e
        key = x4d.args[0] if self.one_d else x4d
        u = (shifted or {}).get(key)
        if u is None:
            u = e(_convert, e(aten.add.Tensor, e(_convert, x4d, torch.int16), 128), torch.uint8)
            u = e(aten.clone.default, e(aten.permute.default, u, [0, 2, 3, 1]), memory_format=torch.contiguous_format)
            if shifted is not None:
                shifted[key] = u
        out = e(torch.ops.fqt.conv_int8.default, u, w4d, stride, padding, [self.dh, self.dw])
        return e(aten.reshape.default, out, [self.B * self.L, n])

    def to_nchw(self, out2d: fx.Node, n: int) -> fx.Node:
        """(B*L, n) rows -> (B, n, Ho, Wo) (or (B, n, Wo) in 1-D)."""
        e = self.e
        out = e(aten.reshape.default, out2d, [self.B, self.Ho, self.Wo, n])
        return self.from4d(e(aten.permute.default, out, [0, 3, 1, 2]))


def _per_sample(e: Emitter, t: fx.Node, batch: int) -> fx.Node:
    """A scale/offset () or per sample (B, 1, ...) as () or (B, 1, 1)."""
    return t if _val(t).dim() == 0 else e(aten.reshape.default, t, [batch, 1, 1])


def _lower_conv(node: fx.Node, graph: fx.Graph, fake_mode: Any, gemm: str, direct: bool,
                shifted: dict[fx.Node, fx.Node] | None = None) -> tuple[fx.Node, dict[str, Any]]:
    """Replace a qconv node by im2col + a new fqt::qmm node (+ corrections); returns the qmm
    node (lowered afterwards like any other) and the row/column sums its epilogue can use
    (emitted before the qmm node, which they feed). ``direct``: ``sums["direct"]`` is the
    ``fqt::conv_int8`` of the codes, the same numbers as the qmm's integer product, which
    ``_lower`` then takes instead of a GEMM of the columns (left dead); ``shifted``: see
    ``_ConvEmitter.direct``."""
    c = _conv_args(node)
    f32 = torch.float32
    qmm = torch.ops.fqt.qmm.default
    with graph.inserting_before(node):
        e = Emitter(graph, fake_mode)
        if gemm == "output":
            # cols(X~) (B*L, K) @ W~^T (K, O)
            x, w = c.a, c.b
            ce = _ConvEmitter.of(e, c, list(_val(x[0]).shape), list(_val(w[0]).shape))
            x4 = ce.as4d(x[0])
            cols = ce.im2col(x4)
            wt = e(aten.permute.default, ce.w_rows(ce.as4d(w[0])), [1, 0])  # (K, O)
            ws, wo = (t if _val(t).dim() == 0 else e(aten.reshape.default, t, [1, ce.O]) for t in w[1:])
            fix = ce.padded and not _is_zero_offset(x[2])
            sums = {"a_rows": ce.cols_rowsum(x4)}
            if direct:
                pt, _, pl, _ = ce.pads
                sums["direct"] = ce.direct(x4, ce.as4d(w[0]), [ce.sh, ce.sw], [pt, pl], ce.O, shifted)
            a_off = _zero(e, x[2]) if fix else ce.pos_rows(x[2])
            mm = e(qmm, cols, ce.pos_rows(x[1]), a_off, wt, ws, wo, c.a_bits, c.b_bits, c.tag)
            out = mm
            if fix:  # + o_x * (M @ W~): the offset over the real (unpadded) entries only
                ones = e(aten.full.default, [1, ce.C, ce.H, ce.W], 1.0, dtype=f32, device=_val(x[0]).device)
                # M = im2col of ones: (L, K) 0/1, which column entries are real input
                corr = e(aten.mm.default, ce.im2col(ones), e.dequantize(wt, ws, wo))  # (L, O)
                out3 = e(aten.reshape.default, out, [ce.B, ce.L, ce.O])
                out = e(aten.add.Tensor, out3, e(aten.mul.Tensor, corr, _per_sample(e, x[2], ce.B)))
            result = ce.to_nchw(out, ce.O)
        elif gemm == "grad_input":
            # The transposed convolution as a direct one: G~ with stride-1 zeros inserted
            # between its positions and padded by d(k-1) - p (plus the rows a stride dropped
            # at the end), correlated with the flipped kernel W'[c, o, i, j] = W[o, c, -i, -j]:
            # cols(G_dilated) (B*H*W, k*k*O) @ W'^T (k*k*O, C).
            g, w = c.a, c.b
            x_shape = list(c.shape or ())
            fwd = _ConvEmitter.of(e, c, x_shape, list(_val(w[0]).shape))
            g4 = fwd.as4d(g[0])
            B, O = fwd.B, fwd.O

            def dilate(t: fx.Node) -> fx.Node:  # (., O, Ho, Wo) -> (., O, (Ho-1)*sh+1, (Wo-1)*sw+1)
                if fwd.sh == 1 and fwd.sw == 1:
                    return t
                n = _val(t).shape[0]
                t = e(aten.reshape.default, t, [n, O, fwd.Ho, 1, fwd.Wo, 1])
                t = e(aten.constant_pad_nd.default, t, [0, fwd.sw - 1, 0, 0, 0, fwd.sh - 1], 0.0)
                t = e(aten.reshape.default, t, [n, O, fwd.Ho * fwd.sh, fwd.Wo * fwd.sw])
                t = e(aten.slice.Tensor, t, 2, 0, (fwd.Ho - 1) * fwd.sh + 1)
                return e(aten.slice.Tensor, t, 3, 0, (fwd.Wo - 1) * fwd.sw + 1)

            hd, wd = (fwd.Ho - 1) * fwd.sh + 1, (fwd.Wo - 1) * fwd.sw + 1
            pt, _, pl, _ = fwd.pads
            lead_h, lead_w = fwd.dh * (fwd.kh - 1) - pt, fwd.dw * (fwd.kw - 1) - pl
            # rows/cols of X a stride skipped at the end get zeros (conv_transpose's output_padding)
            tail_h = fwd.H - (hd + 2 * lead_h - fwd.dh * (fwd.kh - 1))
            tail_w = fwd.W - (wd + 2 * lead_w - fwd.dw * (fwd.kw - 1))
            ce = _ConvEmitter(e, [B, O, hd, wd], [fwd.C, O, fwd.kh, fwd.kw], [1, 1],
                              [lead_h, lead_h + tail_h, lead_w, lead_w + tail_w], [fwd.dh, fwd.dw], fwd.one_d)  # fmt: skip
            assert (ce.Ho, ce.Wo) == (fwd.H, fwd.W), ((ce.Ho, ce.Wo), (fwd.H, fwd.W))
            gd = dilate(g4)
            cols = ce.im2col(gd)  # (B*H*W, kh*kw*O)
            w_flip = e(aten.permute.default, ce.flip_hw(ce.as4d(w[0])), [1, 0, 2, 3])  # (C, O, kh, kw)
            wt = e(aten.permute.default, ce.w_rows(w_flip), [1, 0])  # (K, C)
            fix = ce.padded or fwd.sh > 1 or fwd.sw > 1  # zeros that are not codes of G
            sums = {"a_rows": ce.cols_rowsum(gd)}
            if direct:  # stride 1: the padding is symmetric
                assert ce.pads[0] == ce.pads[1] and ce.pads[2] == ce.pads[3], ce.pads
                sums["direct"] = ce.direct(gd, w_flip, [1, 1], [lead_h, lead_w], fwd.C)
            a_off = _zero(e, g[2]) if fix else ce.pos_rows(g[2])
            # W's scale: () or per in-channel (1, C, 1, ...) (a transposed convolution's
            # per-output-channel weights; along O it is contracted and not lowered)
            ws, wo = (t if _val(t).dim() == 0 else e(aten.reshape.default, t, [1, fwd.C]) for t in w[1:])
            mm = e(qmm, cols, ce.pos_rows(g[1]), a_off, wt, ws, wo, c.a_bits, c.b_bits, c.tag)
            out = mm
            if fix:  # + o_g[b] * (M @ W'~) over the real entries of G only
                ones = dilate(e(aten.full.default, [1, O, fwd.Ho, fwd.Wo], 1.0, dtype=f32, device=_val(g[0]).device))
                corr = e(aten.mm.default, ce.im2col(ones), e.dequantize(wt, ws, wo))  # (H*W, C)
                out3 = e(aten.reshape.default, out, [B, ce.L, fwd.C])
                out = e(aten.add.Tensor, out3, e(aten.mul.Tensor, corr, _per_sample(e, g[2], B)))
            result = ce.to_nchw(out, fwd.C)
        else:  # grad_weight: G~^T (O, B*L) @ cols(X~) (B*L, K)
            g, x = c.a, c.b
            ce = _ConvEmitter.of(e, c, list(_val(x[0]).shape), list(c.shape or ()))
            g4, x4 = ce.as4d(g[0]), ce.as4d(x[0])
            a = e(aten.reshape.default, e(aten.permute.default, g4, [1, 0, 2, 3]), [ce.O, ce.B * ce.L])
            cols = ce.im2col(x4)
            fix = ce.padded and not _is_zero_offset(x[2])
            xs, xo = ce.k_row(x[1]), ce.k_row(x[2])
            gs, go = (t if _val(t).dim() == 0 else e(aten.reshape.default, t, [-1, 1]) for t in g[1:])
            b_cols = e(aten.mul.Tensor, ce.cols_colsum(x4), xs)
            if not fix:  # every column entry is real: + (B*L) * o_x
                b_cols = e(aten.add.Tensor, b_cols, e(aten.mul.Tensor, xo, float(ce.B * ce.L)))
            sums = {"b_cols": b_cols}
            mm = e(qmm, a, gs, go, cols, xs, _zero(e, x[2]) if fix else xo, c.a_bits, c.b_bits, c.tag)
            out = mm
            if fix:  # + o_x * (sum_b G~) (O, L) @ M (L, K)
                g_s, g_o = (ce.as4d(t) if _val(t).dim() else t for t in g[1:])
                g_deq = e.dequantize(g4, g_s, g_o)
                g_sum = e(aten.reshape.default, e(aten.sum.dim_IntList, g_deq, [0]), [ce.O, ce.L])
                ones = e(aten.full.default, [1, ce.C, ce.H, ce.W], 1.0, dtype=f32, device=_val(x[0]).device)
                corr = e(aten.mm.default, g_sum, ce.im2col(ones))
                out = e(aten.add.Tensor, out, e(aten.mul.Tensor, corr, xo))
            out = e(aten.reshape.default, out, [ce.O, ce.kh, ce.kw, ce.C])
            result = ce.from4d(e(aten.permute.default, out, [0, 3, 1, 2]))
        # the op promised a contiguous result (its fake), and later views rely on it
        result = e(aten.clone.default, result, memory_format=torch.contiguous_format)
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return mm, sums


# A strided convolution's grad_input, split by output phase. With stride s and dilation 1 along
# a dim, input position h, padded position h + p = s*t + r, receives only the kernel taps
# i = r + s*m: dX[h] = sum_m G[t - m] W[r + s*m]. The positions h = s*t' + r' of one phase r'
# (r = (r' + p) % s, t = t' + (r' + p) // s) are a stride-1 convolution of G with the flipped
# taps W[r::s][::-1], on G as it is (no zeros inserted): s^dims of them with the work of one.
# They are output GEMMs (fqt::qconv, stride 1), decided and lowered as such (a phase that no
# tap reaches is zeros), and their results interleave back into the input's positions.


# Each phase lowers by its output GEMM's rule, and the phases together only where they are
# large enough to repay their fixed costs (one weight prepacking and one epilogue each, and the
# interleaving copy). Measured (docs/performance.md, Strided grad_input): alone
# (benchmarks/bench_conv.py --strided), 67M multiply-adds per phase lost (1.07x the float
# convolution: 32 -> 64 channels, 14 x 14, kernel 4) and 127M won (0.82-0.95x), but in the
# step of SmallCNN, whose stride-2 convolution that is, the phases lost (1.02-1.03x the step,
# three A/B runs); ResNet-18's downsampling blocks (205M-462M per phase) gained (0.93x the step).
_PHASE_MIN_MACS = 150 * 10**6


def _phased(gemm: str, c: _ConvArgs) -> bool:
    """Whether this conv GEMM runs as its phases' stride-1 convolutions: a ``grad_input``
    with a stride > 1 along some dim and dilation 1 along every strided dim."""
    return (gemm == "grad_input" and any(s != 1 for s in c.stride)
            and all(s == 1 or d == 1 for s, d in zip(c.stride, c.dilation)))


def _flip(e: Emitter, t: fx.Node, dims: list[int]) -> fx.Node:
    """``t`` reversed along ``dims`` (unit slices concatenated: inductor has no flip here)."""
    for dim in dims:
        n = _val(t).shape[dim]
        if n > 1:
            t = e(aten.cat.default, [e(aten.slice.Tensor, t, dim, i, i + 1) for i in reversed(range(n))], dim)
    return t


def _split_phases(node: fx.Node, graph: fx.Graph, fake_mode: Any,
                  cfg: FQTConfig) -> tuple[list[tuple[fx.Node, bool]], str | None]:
    """Replace a strided ``qconv_grad_input`` node by one stride-1 ``fqt::qconv`` per output
    phase (see above) and their interleaving. Returns the phase nodes, each with whether it
    lowers as the direct int8 convolution, and None; or, when a phase would not lower by its
    own rule, no nodes and why, with the graph left as it was."""
    c = _conv_args(node)
    g, w = c.a, c.b
    vg, vw = _val(g[0]), _val(w[0])
    x_shape = [int(v) for v in (c.shape or ())]
    B, C, sizes = x_shape[0], x_shape[1], x_shape[2:]
    ks, g_sizes, nd = [int(k) for k in vw.shape[2:]], [int(v) for v in vg.shape[2:]], vw.dim() - 2
    before = set(graph.nodes)
    # along each dim, input position h = s*t' + r' (t' < ceil(n / s)) is padded position
    # h + p = s*t + r with kernel-tap residue r = (r' + p) % s and t = t' + (r' + p) // s
    spans = [-(-n // s) for s, n in zip(c.stride, sizes)]
    phases: list[tuple[tuple[int, ...], fx.Node, list[int]]] = []
    ys: dict[tuple[int, ...], fx.Node] = {}
    with graph.inserting_before(node):
        e = Emitter(graph, fake_mode)
        # the weight's scale: () or per in-channel, which is the phases' out-channel (dim 0)
        ws, wo = (t if _val(t).numel() == 1 else e(aten.reshape.default, t, [C] + [1] * (nd + 1)) for t in w[1:])
        for r in itertools.product(*(range(s) for s in c.stride)):
            res = [(ri + p) % s for ri, s, p in zip(r, c.stride, c.padding)]
            tlos = [(ri + p) // s for ri, s, p in zip(r, c.stride, c.padding)]
            taps = [len(range(rr, k, s)) for rr, k, s in zip(res, ks, c.stride)]
            if 0 in taps:  # a kernel narrower than its stride: no tap reaches this phase
                ys[r] = e(aten.full.default, [B, *spans, C], 0.0, dtype=torch.float32, device=vg.device)
                continue
            sub_w = w[0]
            for i, (rr, k, s) in enumerate(zip(res, ks, c.stride)):
                if s != 1:
                    sub_w = e(aten.slice.Tensor, sub_w, 2 + i, rr, k, s)
            sub_w = e(aten.permute.default, _flip(e, sub_w, list(range(2, 2 + nd))), [1, 0, *range(2, 2 + nd)])
            sub_w = e(aten.clone.default, sub_w, memory_format=torch.contiguous_format)  # (C, O, *taps)
            pads, crop = [], []
            for tlo, span, m, d, ho in zip(tlos, spans, taps, c.dilation, g_sizes):
                # output u of the padded stride-1 convolution is t = u + reach - pad; t runs to
                # tlo + span - 1, and past ho - 1 + reach every t is zero
                reach = d * (m - 1)
                pad = max(0, reach - tlo, min(reach, tlo + span - ho))
                u0, length = tlo - (reach - pad), ho + 2 * pad - reach
                pads.append(pad)
                crop.append((-u0, span - (length - u0)))  # keep [u0, u0 + span), zeros past the end
            sub = e(torch.ops.fqt.qconv.default, g[0], g[1], g[2], sub_w, ws, wo, c.a_bits, c.b_bits,
                    [1] * nd, pads, list(c.dilation), 1, c.tag)
            phases.append((r, sub, taps))
            # channels last (the lowered phase's rows: its NCHW result is a view of them), cropped
            y = e(aten.permute.default, sub, [0, *range(2, 2 + nd), 1])
            pad_arg = [0, 0] + [v for lr in reversed(crop) for v in lr]
            ys[r] = e(aten.constant_pad_nd.default, y, pad_arg, 0.0) if any(pad_arg) else y

        def stack(pieces: list[fx.Node], dim: int) -> fx.Node:
            us = [e(aten.unsqueeze.default, p, dim) for p in pieces]
            return us[0] if len(us) == 1 else e(aten.cat.default, us, dim)

        # interleave channels last, whole channel rows at a time: (B, T, C) x s -> (B, T, s, C);
        # (B, Th, Tw, C) x sh x sw -> (B, Th, sh, Tw, sw, C); then one transposing copy to NCHW
        if nd == 1:
            z = stack([ys[(r,)] for r in range(c.stride[0])], 2)
        else:
            sh, sw = c.stride
            z = stack([stack([ys[(rh, rw)] for rw in range(sw)], 3) for rh in range(sh)], 2)
        z = e(aten.reshape.default, z, [B, *(span * s for span, s in zip(spans, c.stride)), C])
        pad_arg = [0, 0] + [v for span, s, n in reversed(list(zip(spans, c.stride, sizes))) for v in (0, n - span * s)]
        z = e(aten.constant_pad_nd.default, z, pad_arg, 0.0) if any(pad_arg) else z  # the tail past n
        z = e(aten.permute.default, z, [0, nd + 1, *range(1, nd + 1)])
        result = e(aten.clone.default, z, memory_format=torch.contiguous_format)
    assert list(_val(result).shape) == x_shape, (list(_val(result).shape), x_shape)
    out, why, macs = [], None, 0
    head = f"convolution: stride {list(c.stride)}, run as {_phase_count(len(phases))}"
    one_by_one = all(m == 1 for _, _, taps in phases for m in taps)  # a strided 1 x 1 kernel
    for r, sub, _ in phases:
        sub_why, mkn, direct = _conv_why_not(sub, cfg, "output")
        if direct and one_by_one and CONV_RULE and _conv_rule("output", mkn, [1]) is None:
            direct = False  # its columns are the gradient itself: im2col, as for 1 x 1 kernels (measured)
        macs += math.prod(mkn)
        if sub_why is not None:
            shape = " x ".join(map(str, mkn))
            why = f"{head}, of which phase {list(r)} ({shape}) would not lower: {sub_why.removeprefix('convolution: ')}"
            break
        out.append((sub, direct))
    if why is None and CONV_RULE and macs < _PHASE_MIN_MACS * len(phases):
        why = (f"{head} of {macs / len(phases) / 1e6:.0f}M multiply-adds each on average (< "
               f"{_PHASE_MIN_MACS / 1e6:.0f}M), where their fixed costs measured slower than the float convolution "
               "(benchmarks/bench_conv.py)")
    if why is not None:
        for n in reversed(list(graph.nodes)):
            if n not in before:
                graph.erase_node(n)
        return [], why
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return out, None


def _phase_count(n: int) -> str:
    return f"{n} stride-1 phase convolution{'' if n == 1 else 's'}"


def _gather_phases(whole: GemmDecision, phases: list[GemmDecision], stride: list[int]) -> None:
    """The decision of a strided grad_input from those of its lowered phases."""
    whole.lowered = True
    whole.kernel = "phases+" + "|".join(sorted({d.kernel for d in phases}))
    how = "; ".join(sorted({d.reason.removeprefix("lowered (").removesuffix(")") for d in phases}))
    whole.reason = f"lowered (stride {stride}: {_phase_count(len(phases))}; {how})"


def _row_major(t: torch.Tensor) -> bool:
    """``t``'s strides are the row-major ones of its shape, size-1 dims included."""
    return tuple(t.stride()) == tuple(make_contiguous_strides_for(t.shape))


def _unflattened(n: fx.Node) -> fx.Node:
    """The input of ``n`` when ``n`` is a reshape of a tensor of more than 2 dims to a matrix
    (an im2col's columns), else ``n``."""
    if n.op == "call_function" and n.target is aten.reshape.default:
        src = n.args[0]
        if isinstance(src, fx.Node) and _val(src).dim() > 2 and _val(n).dim() == 2:
            return src
    return n


def _lower(node: fx.Node, graph: fx.Graph, fake_mode: Any, d: GemmDecision, sums: dict[str, Any] | None = None,
           conv: bool = False) -> None:
    """Lower one qmm node. ``sums`` may hold precomputed ``"a_rows"`` (rowsum_K of the
    first operand's codes, float32 (M, 1)) and ``"b_cols"`` (colsum_K of the second
    operand dequantized, (1, N)): a convolution computes them on the input, before im2col,
    for a fraction of the cost. ``conv``: the GEMM of a lowered convolution, whose operands
    are copies (im2col) that must be laid out row-major (``fqt::mm_int8``)."""
    sums = dict(sums or {})
    a_codes, a_scale, a_offset, b_codes, b_scale, b_offset, a_bits, b_bits, _ = node.args
    va = _val(a_codes)
    k = va.shape[-1]
    max_k = int32_safe_k(a_bits, b_bits)
    f32 = torch.float32
    with graph.inserting_before(node):
        e = Emitter(graph, fake_mode)
        # acc = cA @ cB, exact integer accumulation
        # row_major: a row-major copy of a transposed operand, made in the graph (a strided
        # copy inside an op ran at ~1 GB/s). The eager inner compiler runs it as written;
        # inductor's clone ignores memory_format and lays the copy out as its reads favour,
        # unless the consuming op asks for strides (the layout tags of fqt::mm_int8 and
        # fqt::bmm_int8; aten._int_mm asks for none).
        static_k = isinstance(k, int) and k <= max_k
        # "Contiguous" is not enough: a transposed vector, shape (1, n) with strides (1, 1), is
        # contiguous, and oneDNN's _int_mm on torch 2.13 reads such an operand wrongly (a
        # matrix-vector product's grad_input or grad_weight); it gets the copy too.
        row_major = lambda x: x if _row_major(_val(x)) else e(aten.clone.default, x, memory_format=torch.contiguous_format)  # noqa: E731
        vb = _val(b_codes)
        sizes = [_static(s) for s in (*va.shape, vb.shape[-1])]  # ([B,] M, K, N), -1 if symbolic
        bmkn = ([1] if va.dim() == 2 else []) + sizes
        if "direct" in sums:  # a convolution's GEMM as oneDNN's direct int8 convolution
            acc = sums.pop("direct")
            d.kernel = "fqt.conv_int8"
        elif (va.dim() in (2, 3) and va.device.type == "cpu" and static_k and min(bmkn) > 0
                and amx.suits(*bmkn)):
            # takes both operands in the layout they come in (packs b, transposes a K-major a
            # as it packs it); the zero-point terms' sums come from the packed operands
            need_rows = not _is_zero_offset(b_offset) and "a_rows" not in sums
            need_cols = not _is_zero_offset(a_offset) and "b_cols" not in sums
            if need_rows or need_cols:
                mm = e(torch.ops.fqt.int_mm_amx_sums.default, a_codes, b_codes)
                acc = e(_convert, e(operator.getitem, mm, 0), f32)
                if need_rows:
                    sums["a_rows"] = e(_convert, e(operator.getitem, mm, 1), f32)
                if need_cols:  # colsum_K(cB * sB + oB) = colsum_K(cB) * sB + K * oB
                    b_cols = e(aten.mul.Tensor, e(_convert, e(operator.getitem, mm, 2), f32), b_scale)
                    sums["b_cols"] = e(aten.add.Tensor, b_cols, e(aten.mul.Tensor, b_offset, float(k)))
            else:
                acc = e(_convert, e(torch.ops.fqt.int_mm_amx.default, a_codes, b_codes), f32)
            d.kernel = "fqt.int_mm_amx"
        elif va.dim() == 2 and va.device.type == "cpu" and static_k:
            if conv:  # the operands go in as the copies im2col traced before flattening them
                a_in, b_in = row_major(_unflattened(a_codes)), row_major(_unflattened(b_codes))
                acc = e(_convert, e(torch.ops.fqt.mm_int8.default, a_in, b_in, k), f32)
                d.kernel = "fqt.mm_int8"
            else:
                # inductor may hand a copy column-major here; oneDNN (AMD machine) takes that
                # at 1.0-1.3x the row-major time (a transposed weight costs nothing), cheaper
                # than a transposing copy
                acc = e(_convert, e(aten._int_mm.default, row_major(a_codes), row_major(b_codes)), f32)
                d.kernel = "aten._int_mm"
        elif va.dim() == 3 and va.device.type in ("cpu", "cuda") and static_k:
            # int32 out: the conversion fuses into the epilogue (a separate pass over the
            # (B, M, N) result otherwise: ~45 ms for attention's 128 x 512 x 512 scores)
            acc = e(_convert, e(torch.ops.fqt.bmm_int8.default, row_major(a_codes), row_major(b_codes)), f32)
            d.kernel = "fqt.bmm_int8"
        else:
            acc = e(torch.ops.fqt.int_mm.default, a_codes, b_codes, max_k)
            d.kernel = "fqt.int_mm"
        # out = sA * sB * acc + sA * rowsum(cA) * oB + oA * colsum(B~)
        out = e(aten.mul.Tensor, e(aten.mul.Tensor, acc, a_scale), b_scale)
        if not _is_zero_offset(b_offset):
            rows = sums.get("a_rows")
            if rows is None:
                rows = e(aten.sum.dim_IntList, a_codes, [-1], True, dtype=f32)
            out = e(aten.add.Tensor, out, e(aten.mul.Tensor, e(aten.mul.Tensor, rows, a_scale), b_offset))
        if not _is_zero_offset(a_offset):
            cols = sums.get("b_cols")
            if cols is None:
                cols = e(aten.sum.dim_IntList, e.dequantize(b_codes, b_scale, b_offset), [-2], True)
            out = e(aten.add.Tensor, out, e(aten.mul.Tensor, cols, a_offset))
    d.lowered = True
    if d.kernel == "fqt.int_mm":
        d.reason = f"lowered (fqt.int_mm: dynamic K, K > {max_k} split into int32-safe chunks, or CUDA padding)"
    else:
        d.reason = "lowered"
    out.meta["fqt_lowering"] = d
    node.replace_all_uses_with(out)
    graph.erase_node(node)
