"""insert_qdq: replace every covered matmul-like node of a torch-level FX graph by its FQT form.

Works on graphs from TorchDynamo (``torch._C._nn.linear``, ``torch.conv2d``, ``operator.matmul``,
parameters as placeholders, module paths in ``node.meta["nn_module_stack"]``) and from
``torch.fx.symbolic_trace`` (``call_module`` nodes, parameters as ``get_attr``).

A covered node becomes a call of :mod:`fqt_compile.functional` (``fqt_linear``, ``fqt_conv``,
``fqt_matmul``, ``fqt_addmm``, ``fqt_sdpa``): forward quantizers on its operands and the two
gradient quantizers on its output path. Every decision, quantized or skipped and why, is
recorded in ``node.meta["fqt"]`` (a :class:`NodeDecision`) and returned in the result.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from ..config import FQTConfig, Granularity, Mode, OpKind, SdpaPolicy
from ..functional import (
    QSpec,
    einsum_plan,
    fqt_addbmm,
    fqt_addmm,
    fqt_conv,
    fqt_conv_transpose,
    fqt_dropout,
    fqt_einsum,
    fqt_linear,
    fqt_matmul,
    fqt_multi_head_attention,
    fqt_sdpa,
    qspec_from_config,
    same_padding,
)
from . import fuse_softmax
from .keep_codes import FQT_AC_ID_BASE

__all__ = ["insert_qdq", "InsertResult", "NodeDecision", "FQT_FUNCTIONS", "module_path_of", "join_path"]

log = logging.getLogger(__name__)

FQT_FUNCTIONS = (fqt_linear, fqt_conv, fqt_conv_transpose, fqt_matmul, fqt_addmm, fqt_addbmm, fqt_sdpa,
                 fqt_multi_head_attention, fqt_einsum)

_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_TRANSPOSE_FNS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
                       torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.mv, torch.Tensor.matmul, torch.Tensor.bmm,
               torch.Tensor.mm, torch.Tensor.mv}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "mv", "__matmul__"}
_ADDMM_FNS = {torch.addmm, torch.baddbmm, torch.addbmm, torch.Tensor.addmm, torch.Tensor.baddbmm, torch.Tensor.addbmm}
_ADDMM_METHODS = {"addmm", "baddbmm", "addbmm"}
_SDPA_FNS = {F.scaled_dot_product_attention}
# Ops that are noted in the report as staying in full precision.
_FULL_PRECISION_FNS: dict[Any, str] = {
    F.embedding: "embedding (a lookup, not a matmul)",
    F.layer_norm: "normalization",
    F.batch_norm: "normalization",
    F.group_norm: "normalization",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    # products dynamo leaves as one call: listed, so that none runs in float unsaid
    torch.bilinear: "bilinear (nn.Bilinear) is not covered",
    torch.linalg.multi_dot: "linalg.multi_dot is not covered",
    torch.chain_matmul: "chain_matmul is not covered",
    torch.kron: "kron is not covered",
    **{getattr(torch, name): f"{name} (a vector product) is not covered"
       for name in ("inner", "outer", "ger", "addmv", "addr", "dot", "vdot")},
    **{getattr(torch, name): "recurrent layer (LSTM/GRU/RNN) is not covered"
       for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
}
_FULL_PRECISION_METHODS: dict[str, str] = {
    "softmax": "softmax",
    **{name: f"{name} (a vector product) is not covered"
       for name in ("inner", "outer", "ger", "addmv", "addr", "dot", "vdot")},
}
_FULL_PRECISION_MODULES: dict[type, str] = {
    nn.Embedding: "embedding (a lookup, not a matmul)",
    nn.LayerNorm: "normalization",
    nn.BatchNorm1d: "normalization",
    nn.BatchNorm2d: "normalization",
    nn.BatchNorm3d: "normalization",
    nn.GroupNorm: "normalization",
    nn.Bilinear: "bilinear (nn.Bilinear) is not covered",
    nn.RNNBase: "recurrent layer (LSTM/GRU/RNN) is not covered",
}


@dataclass
class NodeDecision:
    """What the pass did with one node (stored in ``node.meta["fqt"]``)."""

    node: str  # node name in the torch-level graph
    module: str  # module path ("" for the root)
    op: str  # "linear", "conv2d", "matmul", "bmm", "addmm", "sdpa", "embedding", ...
    kind: str | None  # OpKind value for covered kinds, None otherwise
    quantized: bool
    reason: str  # why skipped, or "quantized"
    mode: str = "off"
    spec: QSpec | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shape: tuple[int, ...] | None = None
    flops: int = 0  # forward multiply-adds x 2
    overrides: list[str] = field(default_factory=list)
    #: the higher-order op body the node is in ("" for the graph itself): a
    #: ``torch.utils.checkpoint`` region's, or another op's (then the node stays in full precision)
    region: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "spec"}
        d["spec"] = self.spec._asdict() if self.spec is not None else None
        d["shapes"] = [list(s) for s in self.shapes]
        d["out_shape"] = list(self.out_shape) if self.out_shape is not None else None
        return d


@dataclass
class InsertResult:
    decisions: list[NodeDecision] = field(default_factory=list)
    #: ``F.dropout`` calls turned into ``fqt_dropout`` (config.counter_dropout)
    counter_dropouts: int = 0

    @property
    def quantized(self) -> list[NodeDecision]:
        return [d for d in self.decisions if d.quantized]

    @property
    def skipped(self) -> list[NodeDecision]:
        return [d for d in self.decisions if not d.quantized]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.quantized:
            out[d.op] = out.get(d.op, 0) + 1
        return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

#: a dynamo source's frame local, and the item of it where the local is a tuple: a frame whose
#: module came in positionally (``def wrapper(*args, **kwargs)``, as transformers' decorators
#: write them) names it ``L['args'][0]``
_DYNAMO_PREFIX = re.compile(r"^L\['[^']*'\](?:\[\d+\])?\.?")


def _normalize_path(path: str) -> str:
    # "L['self'].layers[0]._modules['attn']" -> "layers.0.attn"; "L['args'][0].h[0]" -> "h.0"
    path = _DYNAMO_PREFIX.sub("", path)
    path = re.sub(r"^__self__\.?", "", path)  # fqt_compile.compile traces model._call_impl
    path = re.sub(r"(?:^|\.)_modules\['([^']*)'\]", r".\1", path)  # torch 2.5: "L['self']._modules['layers']..."
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    return path.strip(".")


def module_path_of(node: fx.Node, prefix: str = "") -> str:
    """Module path of the module whose forward created ``node``; ``prefix``: the path of the
    module whose frame dynamo compiled, where that is not the compiled model's (after a graph
    break inside a submodule's ``forward``, the graph's paths are relative to that submodule)."""
    return join_path(prefix, _relative_module_path(node))


def join_path(prefix: str, path: str) -> str:
    """``prefix.path``, or whichever of the two is not empty."""
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _relative_module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return _normalize_path(list(stack.values())[-1][0])
    for arg in node.all_input_nodes:  # symbolic_trace: F.linear(x, self.weight)
        if arg.op == "get_attr" and "." in str(arg.target):
            return str(arg.target).rsplit(".", 1)[0]
    return ""


def _val(node: Any) -> Any:
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val", node.meta.get("tensor_meta")))
    return None


def _is_param(gm: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        try:
            obj = gm.get_parameter(str(node.target))
        except AttributeError:
            return False
        return isinstance(obj, nn.Parameter)
    if node.op == "placeholder":
        if "fqt_parameter" in node.meta:  # a checkpoint body's: what the region was handed
            return bool(node.meta["fqt_parameter"])
        return isinstance(_val(node), nn.Parameter)
    return False


def _shape(node: Any) -> tuple[int, ...] | None:
    v = _val(node)
    if isinstance(v, torch.Tensor) or type(v).__name__ == "TensorMetadata":
        # int() on a SymInt would add a guard and specialize a dynamic graph: record the hint
        return tuple(s if isinstance(s, int) else _size_hint(s) for s in v.shape)
    return None


def _size_hint(s: Any) -> int:
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else -1


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for s in shape or ():
        n *= max(int(s), 0)
    return n


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


@dataclass
class _Match:
    op: str
    kind: OpKind
    build: Callable[[fx.Graph, QSpec], fx.Node] | None  # None: cannot be covered
    second_is_weight: bool
    reason: str = "quantized"
    operands: tuple[Any, ...] = ()
    flops: int = 0


def _linear_flops(x_shape, w_shape) -> int:
    if not x_shape or not w_shape:
        return 0
    return 2 * _numel(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _matmul_flops(a_shape, b_shape, out_shape) -> int:
    if not a_shape or not out_shape:
        return 0
    return 2 * _numel(out_shape) * a_shape[-1]


def _conv_transpose_flops(x_shape, w_shape) -> int:
    if not x_shape or not w_shape:
        return 0
    # each input element: (out_channels / groups) * kernel multiply-adds
    return 2 * _numel(x_shape) * _numel(w_shape[1:])


def _conv_flops(w_shape, out_shape, groups: int) -> int:
    if not w_shape or not out_shape:
        return 0
    # each output element: in_channels/groups * kernel multiply-adds
    return 2 * _numel(out_shape) * _numel(w_shape[1:])


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------


def _match(gm: fx.GraphModule, node: fx.Node) -> _Match | str | None:
    """A :class:`_Match` for a matmul-like node, a full-precision reason string for a noted
    op, or None for anything else."""
    target = node.target
    out_shape = _shape(node)

    if node.op == "call_module":
        mod = gm.get_submodule(str(target))
        if isinstance(mod, nn.Linear):
            x = node.args[0]

            def build_linear(graph: fx.Graph, spec: QSpec, path=str(target), x=x) -> fx.Node:
                wn = graph.get_attr(f"{path}.weight")
                bn = graph.get_attr(f"{path}.bias") if mod.bias is not None else None
                return graph.call_function(fqt_linear, (x, wn, bn), {"spec": spec})

            return _Match("linear", OpKind.LINEAR, build_linear, True,
                          operands=(x,), flops=_linear_flops(_shape(x), tuple(mod.weight.shape)))
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            x = node.args[0]
            if mod.padding_mode != "zeros":
                return _Match(f"conv{mod.weight.dim() - 2}d", OpKind.CONV, None, True,
                              reason=f"padding_mode={mod.padding_mode!r} is not covered (only 'zeros')")
            padding = mod.padding
            if isinstance(padding, str):
                padding = [0] * (mod.weight.dim() - 2) if padding == "valid" else same_padding(mod.kernel_size, mod.dilation)
                if padding is None:
                    return _Match(f"conv{mod.weight.dim() - 2}d", OpKind.CONV, None, True,
                                  reason="padding='same' with an even kernel (asymmetric padding) is not covered")

            def build_conv(graph: fx.Graph, spec: QSpec, path=str(target), x=x, padding=list(padding)) -> fx.Node:
                wn = graph.get_attr(f"{path}.weight")
                bn = graph.get_attr(f"{path}.bias") if mod.bias is not None else None
                return graph.call_function(
                    fqt_conv, (x, wn, bn, list(mod.stride), padding, list(mod.dilation), mod.groups), {"spec": spec}
                )

            return _Match(f"conv{mod.weight.dim() - 2}d", OpKind.CONV, build_conv, True, operands=(x,),
                          flops=_conv_flops(tuple(mod.weight.shape), out_shape, mod.groups))
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            n = mod.weight.dim() - 2
            op = f"conv_transpose{n}d"
            if mod.padding_mode != "zeros":
                return _Match(op, OpKind.CONV, None, True, reason=f"padding_mode={mod.padding_mode!r} is not covered")
            if len(node.args) > 1 or node.kwargs:  # output_size: torch computes output_padding from it
                return _Match(op, OpKind.CONV, None, True,
                              reason="nn.ConvTranspose called with output_size under symbolic_trace is not covered")
            x = node.args[0]

            def build_tconv(graph: fx.Graph, spec: QSpec, path=str(target), x=x) -> fx.Node:
                wn = graph.get_attr(f"{path}.weight")
                bn = graph.get_attr(f"{path}.bias") if mod.bias is not None else None
                return graph.call_function(
                    fqt_conv_transpose,
                    (x, wn, bn, list(mod.stride), list(mod.padding), list(mod.output_padding), mod.groups,
                     list(mod.dilation)),
                    {"spec": spec},
                )

            return _Match(op, OpKind.CONV, build_tconv, True, operands=(x,),
                          flops=_conv_transpose_flops(_shape(x), tuple(mod.weight.shape)))
        if isinstance(mod, nn.MultiheadAttention):
            return "nn.MultiheadAttention module is opaque to symbolic_trace: use torch.compile (dynamo) capture"
        for cls, why in _FULL_PRECISION_MODULES.items():
            if isinstance(mod, cls):
                return why
        return None

    if node.op == "call_function" and target in _LINEAR_FNS:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")

        def build_lin(graph: fx.Graph, spec: QSpec) -> fx.Node:
            return graph.call_function(fqt_linear, (x, w, b), {"spec": spec})

        return _Match("linear", OpKind.LINEAR, build_lin, True, operands=(x, w),
                      flops=_linear_flops(_shape(x), _shape(w)))

    if node.op == "call_function" and target in _CONV_FNS:
        x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
        b = _arg(node, 2, "bias")
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
        dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
        op = f"conv{_CONV_FNS[target]}d"
        if padding == "same":
            ws = _shape(w)
            n = len(ws) - 2 if ws else 0
            dil = [dilation] * n if isinstance(dilation, int) else list(dilation)
            if ws is None or same_padding(ws[2:], dil) is None:
                return _Match(op, OpKind.CONV, None, True,
                              reason="padding='same' with an even kernel (asymmetric padding) is not covered")

        def build_fconv(graph: fx.Graph, spec: QSpec) -> fx.Node:
            return graph.call_function(fqt_conv, (x, w, b, stride, padding, dilation, groups), {"spec": spec})

        return _Match(op, OpKind.CONV, build_fconv, True, operands=(x, w),
                      flops=_conv_flops(_shape(w), out_shape, 1))

    if node.op == "call_function" and target in _CONV_TRANSPOSE_FNS:
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        defaults = (None, None, None, 1, 0, 0, 1, 1)
        args = [_arg(node, i, name, default) for i, (name, default) in enumerate(zip(names, defaults))]

        def build_ftconv(graph: fx.Graph, spec: QSpec) -> fx.Node:
            return graph.call_function(fqt_conv_transpose, tuple(args), {"spec": spec})

        return _Match(f"conv_transpose{_CONV_TRANSPOSE_FNS[target]}d", OpKind.CONV, build_ftconv, True,
                      operands=(args[0], args[1]), flops=_conv_transpose_flops(_shape(args[0]), _shape(args[1])))

    is_matmul = (node.op == "call_function" and target in _MATMUL_FNS) or (
        node.op == "call_method" and target in _MATMUL_METHODS
    )
    if is_matmul:
        a, b = node.args[0], node.args[1]
        op = {"__matmul__": "matmul"}.get(getattr(target, "__name__", str(target)), getattr(target, "__name__", str(target)))
        sa, sb = _shape(a), _shape(b)
        if sa is not None and sb is not None and len(sa) < 2 and len(sb) < 2:
            return _Match(op, OpKind.MATMUL, None, False, reason="the dot product of two vectors is not covered")
        b_param = _is_param(gm, b)
        kind = OpKind.LINEAR if b_param else OpKind.MATMUL

        def build_mm(graph: fx.Graph, spec: QSpec) -> fx.Node:
            return graph.call_function(fqt_matmul, (a, b), {"spec": spec})

        return _Match(op, kind, build_mm, b_param, operands=(a, b), flops=_matmul_flops(sa, sb, out_shape))

    is_addmm = (node.op == "call_function" and target in _ADDMM_FNS) or (
        node.op == "call_method" and target in _ADDMM_METHODS
    )
    if is_addmm:
        bias, a, b = node.args[0], _arg(node, 1, "mat1", _arg(node, 1, "batch1")), _arg(node, 2, "mat2", _arg(node, 2, "batch2"))
        if a is None:
            a = node.kwargs.get("batch1")
            b = node.kwargs.get("batch2")
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        op = getattr(target, "__name__", str(target))
        b_param = _is_param(gm, b)
        kind = OpKind.LINEAR if b_param else OpKind.MATMUL
        # addbmm sums the batch of products: one product whose contraction takes the batch too
        fn, flops = fqt_addmm, _matmul_flops(_shape(a), _shape(b), out_shape)
        if op == "addbmm":
            fn, sa = fqt_addbmm, _shape(a)
            flops = _matmul_flops(sa, _shape(b), out_shape) * _numel(sa[:1] if sa else (0,))

        def build_addmm(graph: fx.Graph, spec: QSpec) -> fx.Node:
            return graph.call_function(fn, (bias, a, b), {"beta": beta, "alpha": alpha, "spec": spec})

        return _Match(op, kind, build_addmm, b_param, operands=(a, b), flops=flops)

    if node.op == "call_function" and target in _SDPA_FNS:
        q, k, v = node.args[:3]
        rest = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]))
        rest.update(node.kwargs)
        sq, sk = _shape(q), _shape(k)
        flops = 0
        if sq and sk:
            flops = 2 * 2 * _numel(sq[:-1]) * sk[-2] * sq[-1]

        def build_sdpa(graph: fx.Graph, spec: QSpec) -> fx.Node:
            return graph.call_function(fqt_sdpa, (q, k, v), {**rest, "spec": spec})

        return _Match("sdpa", OpKind.MATMUL, build_sdpa, False, operands=(q, k, v), flops=flops)

    if node.op == "call_function" and target is F.multi_head_attention_forward:
        return _match_mha(node)

    if node.op == "call_function" and target is torch.einsum:
        return _match_einsum(gm, node)

    if node.op == "call_function" and target is torch.tensordot:
        return _match_tensordot(gm, node)

    if node.op == "call_function" and target in _FULL_PRECISION_FNS:
        return _FULL_PRECISION_FNS[target]
    if node.op == "call_method" and target in _FULL_PRECISION_METHODS:
        return _FULL_PRECISION_METHODS[target]
    return None


def tensordot_equation(a_dim: int, b_dim: int, dims: Any) -> str | None:
    """The einsum equation of ``torch.tensordot(a, b, dims)`` (``dims`` an int: the last ``dims``
    dimensions of ``a`` with the first of ``b``; or two lists of paired dimensions), or None
    where ``dims`` is not a constant of those forms."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        pairs = list(zip(range(a_dim - dims, a_dim), range(dims)))
    elif isinstance(dims, (list, tuple)) and len(dims) == 2 and all(isinstance(d, (list, tuple)) for d in dims) \
            and len(dims[0]) == len(dims[1]) and all(isinstance(i, int) for d in dims for i in d):
        pairs = [(i % a_dim, j % b_dim) for i, j in zip(*dims)]
    else:
        return None
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    a = [next(letters) for _ in range(a_dim)]
    b = [next(letters) for _ in range(b_dim)]
    for i, j in pairs:
        b[j] = a[i]
    paired_a, paired_b = {i for i, _ in pairs}, {j for _, j in pairs}
    out = [c for i, c in enumerate(a) if i not in paired_a] + [c for j, c in enumerate(b) if j not in paired_b]
    return f"{''.join(a)},{''.join(b)}->{''.join(out)}"


def _match_tensordot(gm: fx.GraphModule, node: fx.Node) -> _Match:
    """``torch.tensordot``: the einsum it is (:func:`tensordot_equation`, :func:`_match_einsum`)."""
    a, b = _arg(node, 0, "a"), _arg(node, 1, "b")
    dims = _arg(node, 2, "dims", 2)
    sa, sb = _shape(a), _shape(b)
    equation = tensordot_equation(len(sa), len(sb), dims) if sa is not None and sb is not None else None
    if equation is None:
        return _Match("tensordot", OpKind.MATMUL, None, False,
                      reason="tensordot whose dims or operand shapes are unknown is not covered")
    m = _match_einsum(gm, node, equation=equation, operands=[a, b])
    return dataclasses.replace(m, op="tensordot", reason=m.reason.replace("einsum", "tensordot (as einsum)", 1))


def _match_einsum(gm: fx.GraphModule, node: fx.Node, *, equation: Any = None,
                  operands: list[Any] | None = None) -> _Match:
    """``torch.einsum`` of two operands that is one (batched) product (:func:`einsum_plan`):
    :func:`fqt_einsum`, with the operand that is a parameter (if one is) second, under the
    weight quantizer; other einsums stay in full precision with the reason."""
    if operands is None:
        equation, *operands = node.args
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
    if not isinstance(equation, str):
        return _Match("einsum", OpKind.MATMUL, None, False, reason="einsum whose equation is not a constant")
    shapes = [_shape(o) for o in operands]
    if any(s is None for s in shapes):  # no shapes (symbolic_trace without example inputs): the letters tell
        if "..." in equation:
            return _Match("einsum", OpKind.MATMUL, None, False,
                          reason="einsum with an ellipsis on operands of unknown shapes (give example inputs)")
        shapes = [(0,) * len(spec) for spec in equation.replace(" ", "").partition("->")[0].split(",")]
        if len(shapes) != len(operands):
            return _Match("einsum", OpKind.MATMUL, None, False, reason=f"einsum equation {equation!r} not understood")
    if len(operands) != 2:
        n = len(operands)
        return _Match("einsum", OpKind.MATMUL, None, False,
                      reason=f"einsum of {n} operand{'s' * (n != 1)} is not covered (two operands: one product)")
    plan = einsum_plan(equation, len(shapes[0]), len(shapes[1]))
    if isinstance(plan, str):
        return _Match("einsum", OpKind.MATMUL, None, False, reason=plan)
    a, b = operands
    swap = _is_param(gm, a) and not _is_param(gm, b)
    if swap:
        a, b = b, a
    b_param = _is_param(gm, b)
    explicit = f"{plan.b},{plan.a}->{plan.out}" if swap else f"{plan.a},{plan.b}->{plan.out}"
    size = dict(zip(plan.a, shapes[0])) | {c: d for c, d in zip(plan.b, shapes[1]) if c not in plan.a or d != 1}
    flops = 2 * _numel([size[c] for c in plan.batch + plan.m + plan.n + plan.k])

    def build_einsum(graph: fx.Graph, spec: QSpec) -> fx.Node:
        return graph.call_function(fqt_einsum, (explicit, a, b), {"spec": spec})

    return _Match("einsum", OpKind.LINEAR if b_param else OpKind.MATMUL, build_einsum, b_param, operands=(a, b),
                  flops=flops)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
#: the arguments of F.multi_head_attention_forward that fqt_multi_head_attention takes
_MHA_ARGS = ("query", "key", "value", "num_heads", "in_proj_weight", "in_proj_bias", "dropout_p", "out_proj_weight",
             "out_proj_bias", "training", "key_padding_mask", "attn_mask", "use_separate_proj_weight",
             "q_proj_weight", "k_proj_weight", "v_proj_weight", "is_causal", "need_weights", "average_attn_weights")


def _match_mha(node: fx.Node) -> _Match:
    """nn.MultiheadAttention as dynamo leaves it: one ``F.multi_head_attention_forward`` call.
    Covered (as :func:`fqt_multi_head_attention`, one row), with or without the attention
    weights, except for the rarely used extras, which keep it whole, in full precision, with the
    reason."""
    try:
        bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as e:
        return _Match("multi_head_attention", OpKind.MATMUL, None, False, reason=f"unexpected arguments: {e}")
    bound.apply_defaults()
    a = bound.arguments
    why = None
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        why = "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not covered"
    elif a["static_k"] is not None or a["static_v"] is not None:
        why = "F.multi_head_attention_forward with static_k/static_v is not covered"
    q, k = _shape(a["query"]), _shape(a["key"])
    flops = 0
    if q and k and len(q) in (2, 3):
        lq, e, n = q[0], q[-1], (q[1] if len(q) == 3 else 1)
        lk = k[0]
        flops = 2 * n * e * e * (2 * lq + 2 * lk) + 2 * 2 * n * lq * lk * e  # projections + the two attention products
    if why is not None:
        return _Match("multi_head_attention", OpKind.MATMUL, None, False, operands=(a["query"], a["key"], a["value"]),
                      flops=flops, reason=why)
    args = tuple(a[name] for name in _MHA_ARGS)

    def build_mha(graph: fx.Graph, spec: QSpec) -> fx.Node:
        return graph.call_function(fqt_multi_head_attention, args, {"spec": spec})

    return _Match("multi_head_attention", OpKind.MATMUL, build_mha, True, operands=(a["query"], a["key"], a["value"]),
                  flops=flops)


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------


def insert_qdq(gm: fx.GraphModule, cfg: FQTConfig, *, path_prefix: str = "") -> InsertResult:
    """Quantize every covered matmul-like node of ``gm`` in place (see module docstring).
    ``path_prefix``: the module path that the graph's module paths are relative to (see
    :func:`module_path_of`); the decisions, the overrides and the report use the full paths.

    The bodies of ``torch.utils.checkpoint`` regions (dynamo's ``tag_activation_checkpoint``
    higher-order op) are rewritten too: their products are quantized like any other, and the
    region recomputes them in the backward (:func:`_insert_checkpoint_body`). A product in the
    body of any other higher-order op stays in full precision, recorded with the op's name."""
    result = InsertResult()
    _insert_graph(gm, cfg, path_prefix, result, region="")
    return result


def _insert_graph(gm: fx.GraphModule, cfg: FQTConfig, path_prefix: str, result: InsertResult, region: str) -> None:
    """The pass on one graph: ``gm`` itself (``region`` "") or the body of a checkpoint region
    (``region``: the body's attribute name)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        hop = _higher_order_name(node)
        if hop is not None:
            _insert_higher_order(gm, node, hop, cfg, path_prefix, result)
            continue
        try:
            m = _match(gm, node)
        except Exception as e:  # re-raise with the node attached (STYLE 7)
            raise RuntimeError(f"fqt insert_qdq failed on node {node.format_node()}: {e}") from e
        if m is None:
            continue
        path = module_path_of(node, path_prefix)
        name = f"{region}.{node.name}" if region else node.name
        if isinstance(m, str):
            d = NodeDecision(name, path, _op_name(node), None, False, f"full precision: {m}",
                             shapes=[s for s in (_shape(a) for a in node.args) if s is not None],
                             out_shape=_shape(node), region=region)
            node.meta["fqt"] = d
            result.decisions.append(d)
            continue
        local = cfg.for_module(path)
        d = NodeDecision(
            name, path, m.op, m.kind.value, False, m.reason, mode=local.mode.value,
            shapes=[s for s in (_shape(a) for a in m.operands) if s is not None],
            out_shape=_shape(node), flops=m.flops, overrides=cfg.matching_overrides(path), region=region,
        )
        if m.build is None:
            d.reason = m.reason  # not coverable (e.g. a vector product); the match says why
        elif local.mode is Mode.OFF:
            d.reason = "mode 'off'" + (f" (override {d.overrides[-1]!r})" if d.overrides else "")
        elif m.kind not in local.ops:
            d.reason = f"op kind {m.kind.value!r} not in config.ops"
        elif m.op == "sdpa" and local.sdpa is SdpaPolicy.FULL_PRECISION:
            d.reason = "scaled_dot_product_attention kept in full precision (config.sdpa='full_precision')"
        else:
            spec = qspec_from_config(local, second_is_weight=m.second_is_weight, name=path)
            with graph.inserting_before(node):
                new = m.build(graph, spec)
            new.meta.update({k: v for k, v in node.meta.items() if k != "fqt"})
            d.quantized, d.reason, d.spec = True, "quantized", spec
            new.meta["fqt"] = d
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if m.op == "multi_head_attention":
                d.reason = _set_mha_attention(new, local, recompute=not region)
            if region:
                d.reason += "; recomputed in the backward by its torch.utils.checkpoint region"
            elif m.op == "sdpa" and local.sdpa is SdpaPolicy.RECOMPUTE:
                # (after the old node is gone: it reads the users)
                d.reason = _mark_recompute(new, mask_as_bias=_softmax_fused(local, new))
            log.debug("insert_qdq: %s (%s at %r) -> %s", node.name, m.op, path, spec.describe())
            result.decisions.append(d)
            continue
        node.meta["fqt"] = d
        result.decisions.append(d)
    # in a checkpoint region everything is recomputed already, and torch's dropout keeps the
    # region's own handling of its random state
    if cfg.recompute_mlp and not region:
        _mark_mlp_recompute(graph)
    if cfg.counter_dropout and not region:
        result.counter_dropouts = _counter_dropouts(graph, cfg, path_prefix)
    graph.lint()
    gm.recompile()
    if not region:
        log.info("insert_qdq: %d quantized, %d kept in full precision", len(result.quantized), len(result.skipped))


#: dynamo's form of ``torch.utils.checkpoint`` (its body is a GraphModule attribute of the graph)
_CHECKPOINT_HOP = "tag_activation_checkpoint"


def _higher_order_name(node: fx.Node) -> str | None:
    """The name of the higher-order op ``node`` calls (``torch.ops.higher_order.<name>``), or None."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def _bodies(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, fx.GraphModule]]:
    """The graph modules a higher-order op node reads (``get_attr`` arguments), with their names."""
    out = []
    for a in node.all_input_nodes:
        sub = getattr(gm, str(a.target), None) if a.op == "get_attr" else None
        if isinstance(sub, fx.GraphModule):
            out.append((str(a.target), sub))
    return out


def _insert_higher_order(gm: fx.GraphModule, node: fx.Node, hop: str, cfg: FQTConfig, path_prefix: str,
                         result: InsertResult) -> None:
    bodies = _bodies(gm, node)
    if hop == _CHECKPOINT_HOP and len(bodies) == 1 and node.args and node.args[0].op == "get_attr":
        _insert_checkpoint_body(gm, node, bodies[0], cfg, path_prefix, result)
        return
    # any other higher-order op (a custom autograd.Function, control flow, ...): its products
    # are not rewritten; say so for each one, so that none is left out silently
    for name, body in bodies:
        for inner in body.graph.nodes:
            if inner.op not in ("call_function", "call_method", "call_module") or _higher_order_name(inner):
                continue
            m = _match(body, inner)
            if not isinstance(m, _Match):
                continue
            d = NodeDecision(f"{name}.{inner.name}", module_path_of(inner, path_prefix), m.op, m.kind.value, False,
                             f"inside torch.ops.higher_order.{hop}, whose body fqt does not rewrite",
                             shapes=[s for s in (_shape(a) for a in m.operands) if s is not None],
                             out_shape=_shape(inner), flops=m.flops, region=name)
            inner.meta["fqt"] = d
            result.decisions.append(d)
            log.warning("insert_qdq: %s (%s at %r) stays in full precision: it is inside higher-order op %s",
                        inner.name, m.op, d.module, hop)


def _insert_checkpoint_body(gm: fx.GraphModule, node: fx.Node, body: tuple[str, fx.GraphModule], cfg: FQTConfig,
                            path_prefix: str, result: InsertResult) -> None:
    """Quantize the products in the body of a ``torch.utils.checkpoint`` region.

    The body's placeholders are the op's operands after the body (dynamo lifts the region's
    parameters into them), so a placeholder is a parameter where its operand is one. The
    recompute options (``sdpa="recompute"``, ``recompute_mlp``) and ``counter_dropout`` leave
    the body alone: the region recomputes all of it in the backward already, and a seed that
    quantized attention's dropout draws in it is saved by ``passes.keep_codes`` (drawn again,
    it would give the recomputed attention another mask)."""
    name, sub = body
    if sub.meta.get("fqt_rewritten"):  # one body read by two regions: its products are quantized once
        return
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for ph, operand in zip(placeholders, node.args[1:]):
        ph.meta["fqt_parameter"] = _is_param(gm, operand)
    _insert_graph(sub, cfg, path_prefix, result, region=name)
    sub.meta["fqt_rewritten"] = True


_AC_IDS = itertools.count(FQT_AC_ID_BASE)  # keep_codes tells our regions from a user's by this


def _tag_for_recompute(nodes: list[fx.Node]) -> None:
    """One recompute region: the tags activation checkpointing uses, which AOTAutograd copies
    onto every aten node traced from these, so its partitioner recomputes them in the
    backward instead of saving their outputs (except the quantizers of the region's inputs,
    whose int8 codes ``passes.keep_codes`` keeps)."""
    ac_id = next(_AC_IDS)
    for n in nodes:
        n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        n.meta["ac_graph_id"] = ac_id


def _softmax_fused(cfg: FQTConfig, sdpa: fx.Node) -> bool:
    """Whether ``passes.fuse_softmax`` will take this attention's softmax and its backward
    (``cfg.fuse_softmax``, lowered GEMMs, the C kernel here, a per-tensor quantizer of the
    probabilities, float32 CPU operands): then the fused kernels take the mask as an added bias
    and no float scores are written."""
    q = _val(sdpa.args[0]) if sdpa.args else None
    return (fuse_softmax.skipped_because(cfg) is None and cfg.input.granularity is Granularity.TENSOR
            and isinstance(q, torch.Tensor) and q.device.type == "cpu" and q.dtype == torch.float32)


def _mark_recompute(node: fx.Node, mask_as_bias: bool = False) -> str:
    """Tag an fqt_sdpa call so that AOTAutograd's partitioner recomputes what is traced from it
    in the backward (the score GEMM, the softmax and the quantizer of its output) instead of
    saving it (the tags activation checkpointing uses, copied onto every aten node traced from
    this one); ``passes.keep_codes`` keeps the int8 codes of q, k and v, which the backward's
    GEMMs read anyway, and the seed of the attention dropout (``fqt::dropout``), whose mask is
    then recomputed exactly.

    (Until the fourteenth session the q/k/v projection was recomputed too, from its float
    input, when it fed only this attention: 19 MB less per GPT block, but a one-block step 8%
    slower than with the codes kept; docs/performance.md.)

    Boolean masks are applied with ``masked_fill`` there unless ``mask_as_bias`` (the fused
    softmax kernels will run): with the bias form and inductor's own softmax kernels, inductor
    ran the recomputed score GEMM next to the backward's and kept both products and their float
    forms alive together (peak step memory of a GPT block 577 -> 973 MB); the fused kernels
    read the int32 products and the bias directly (one block: peak 574 MB with the bias form,
    583 MB with masked_fill), and ``masked_fill``'s backward would keep softmax's backward out
    of the fused kernel (docs/performance.md)."""
    _tag_for_recompute([node])
    node.kwargs = {**node.kwargs, "mask_as_bias": mask_as_bias}
    return ("quantized; attention probabilities recomputed in the backward from the int8 codes of q, k, v "
            "(config.sdpa='recompute')")  # fmt: skip


def _set_mha_attention(node: fx.Node, cfg: FQTConfig, recompute: bool) -> str:
    """How an fqt_multi_head_attention call computes its attention under ``cfg.sdpa``, and the
    decision's reason: quantized, and (``sdpa="recompute"``, outside a checkpoint region) a
    recompute region as :func:`_mark_recompute` makes of an ``fqt_sdpa`` call, unless the
    caller keeps every head's probabilities (``need_weights`` without
    ``average_attn_weights``: those are an output anyway); or in full precision."""
    if cfg.sdpa is SdpaPolicy.FULL_PRECISION:
        node.kwargs = {**node.kwargs, "quantize_attention": False}
        return "quantized: the projections; the attention in full precision (config.sdpa='full_precision')"
    if not recompute:  # a checkpoint region: the caller says so
        return "quantized: input projections, attention and output projection"
    names = dict(zip(_MHA_ARGS, node.args))
    all_heads_out = names["need_weights"] and not names["average_attn_weights"]
    if cfg.sdpa is SdpaPolicy.RECOMPUTE and not all_heads_out:
        node.kwargs = {**node.kwargs, "recompute_id": next(_AC_IDS), "mask_as_bias": _softmax_fused(cfg, node)}
        return ("quantized: input projections, attention and output projection (attention probabilities "
                "recomputed in the backward from the int8 codes of q, k, v: config.sdpa='recompute')")
    why = ("every head's probabilities are returned (average_attn_weights=False)" if all_heads_out
           and cfg.sdpa is SdpaPolicy.RECOMPUTE else f"config.sdpa={cfg.sdpa.value!r}")
    return f"quantized: input projections, attention and output projection (attention probabilities kept: {why})"


def dropout_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an ``F.dropout`` call node by name, defaults filled in."""
    bound = {"p": 0.5, "training": True, "inplace": False}
    bound.update(zip(("input", "p", "training", "inplace"), node.args))
    bound.update(node.kwargs)
    return bound


def _counter_dropouts(graph: fx.Graph, cfg: FQTConfig, path_prefix: str = "") -> int:
    """config.counter_dropout: ``F.dropout(x, p, training=True)`` with constant ``p`` and
    ``training`` (as dynamo writes ``nn.Dropout`` and ``F.dropout`` calls) becomes
    ``fqt_dropout``, outside modules whose mode is "off"; in-place dropout is left to torch."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.dropout:
            continue
        bound = dropout_arguments(node)
        p, training, inplace = bound["p"], bound["training"], bound["inplace"]
        if not (isinstance(p, (int, float)) and 0 < p <= 1 and training is True and inplace is False):
            continue
        if cfg.for_module(module_path_of(node, path_prefix)).mode is Mode.OFF:
            continue
        node.target = fqt_dropout
        node.args, node.kwargs = (bound["input"], float(p)), {}
        n += 1
    if n:
        log.info("insert_qdq: %d dropout calls use the counter-based mask (config.counter_dropout)", n)
    return n


#: activations whose backward reads their float input or output: a region must hold one (or a
#: product of two tensors, the gate of a gated MLP) for its recomputation to save anything
_ACTIVATIONS = {F.gelu, torch._C._nn.gelu, F.silu, torch.sigmoid, torch.tanh, torch.erf, torch.pow, F.sigmoid,
                F.tanh, operator.pow}
_ACTIVATION_METHODS = {"sigmoid", "tanh", "erf", "pow"}
#: other elementwise ops a region may hold (the arithmetic of activations written out, as HF
#: GPT-2's tanh-GELU), and views that keep the elements where they are
_ELEMENTWISE = {torch.mul, torch.add, torch.sub, torch.div, operator.mul, operator.add, operator.sub,
                operator.truediv, operator.neg, torch.neg, F.relu, torch.relu}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "neg", "relu", "view", "reshape", "contiguous"}
#: products whose linear layer may start a region (a parameter weight: the layer's GEMM is what
#: the backward runs again)
_LINEARS = (fqt_linear, fqt_addmm)


def _elementwise(node: fx.Node) -> tuple[bool, bool]:
    """(may be in a region, needs its float operands for its backward)."""
    if node.op == "call_function":
        activations, elementwise = _ACTIVATIONS, _ELEMENTWISE
        products: tuple[Any, ...] = (torch.mul, torch.div, operator.mul, operator.truediv)
    elif node.op == "call_method":
        activations, elementwise, products = _ACTIVATION_METHODS, _ELEMENTWISE_METHODS, ("mul", "div")
    else:
        return False, False
    if node.target in activations:
        return True, True
    if node.target in elementwise:
        return True, node.target in products and sum(isinstance(a, fx.Node) for a in node.args) == 2
    return False, False


def _mlp_region(start: fx.Node, taken: set[fx.Node]) -> list[fx.Node] | None:
    """The nodes to recompute for the quantized linear layer ``start``: the elementwise ops its
    output flows through (up to the next quantized product, or any other op), and any other
    quantized linear layer whose output joins them (a gated MLP's up projection:
    ``silu(gate(x)) * up(x)``). None where an op of the region reads a value from outside it
    other than a constant (a residual addition: that value would have to be kept for the
    recomputation), or where the region would save nothing (no activation whose backward reads
    floats)."""
    region, frontier, saves = {start}, [start], False
    inputs: set[fx.Node] = set()  # values the region's elementwise ops read
    while frontier:
        node = frontier.pop()
        if node.target not in _LINEARS:
            for arg in node.all_input_nodes:
                if arg in region:
                    continue
                if arg.op == "call_function" and arg.target in _LINEARS and arg not in taken:
                    region.add(arg)  # a gated MLP's other projection
                    frontier.append(arg)
                else:
                    inputs.add(arg)
        for user in node.users:
            if user in region:
                continue
            allowed, needs_float = _elementwise(user)
            if not allowed:
                # the region ends here: usually at the next quantized product, which saves the
                # codes of what it reads; any other op saves what its own backward needs
                continue
            saves |= needs_float
            region.add(user)
            frontier.append(user)
    # every value read from outside is a constant (one computed inside, as the tanh-GELU's
    # x + 0.044715 x^3 reads x^3, was reached by now)
    if any(arg not in region and arg.op != "get_attr" for arg in inputs) or not saves:
        return None
    return [n for n in start.graph.nodes if n in region]


def _mark_mlp_recompute(graph: fx.Graph) -> None:
    """config.recompute_mlp: tag each quantized linear layer whose output goes through an
    activation (GELU, SiLU, a tanh-GELU written out, the gated product of two layers' outputs),
    usually into the next quantized product, and that activation, for recomputation in the
    backward (see :func:`_mark_recompute`): the partitioner then keeps the int8 codes of the
    layers' input (``passes.keep_codes``), which their grad_weight GEMMs read anyway, instead of
    the activation's float input and intermediate values, and recomputes the layers' GEMMs and
    the activation."""
    taken: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEARS or node in taken:
            continue
        region = _mlp_region(node, taken)
        if region is None:
            continue
        taken.update(region)
        _tag_for_recompute(region)
        ops = [_op_name(n) for n in region if n.target not in _LINEARS and _elementwise(n)[1]]
        for linear in (n for n in region if n.target in _LINEARS):
            d = linear.meta.get("fqt")
            if d is not None:
                d.reason += (f"; output and the activation after it ({', '.join(dict.fromkeys(ops))}) recomputed in "
                             "the backward (config.recompute_mlp)")


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))
