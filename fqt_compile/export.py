"""Export the inference form of a quantized model: ``torch.export`` and ONNX (QDQ).

The inference form of an FQT model is its forward pass: every covered product computes with
quantized operands, ``F(Q_f(X), Q_w(W))``, and the gradient quantizers (Q_b1, Q_b2) vanish
because there is no backward. Both exporters build it the same way:

1. capture the model in eval mode with TorchDynamo (``torch._dynamo.export``: a torch-level
   graph with parameters as attributes, which ``passes.insert_qdq`` reads like a
   ``torch.compile`` graph);
2. ``passes.insert_qdq`` with the config, the same decisions as training (overrides, skipped
   ops);
3. each FQT product (``fqt_linear`` ...) is replaced by its inference form: the float op on
   ``fqt::fake_quant`` operands (``fqt::fake_quant`` = ``dequantize(quantize(x))``, a custom
   op with a fake implementation, so it survives ``torch.export`` as one node);
4. ``torch.export.export`` with a dynamic batch dimension -> :func:`export`'s result.

:func:`export_onnx` then converts the ``ExportedProgram`` with ``torch.onnx.export`` (dynamo
exporter) and a custom translation of ``fqt::fake_quant`` into ONNX ``QuantizeLinear`` /
``DequantizeLinear`` (scale and zero point computed in the graph from the tensor's range, as
the training graph does; ``axis`` set for per-channel ranges), folds the weights' quantization
into int8 initializers (weights are stored as int8 codes followed by ``DequantizeLinear``), and
checks the model with ``onnx.checker``. See ``docs/export.md`` for the mapping of each scheme.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_config, torch_version
from .config import FQTConfig, Mode
from .functional import (QSpec, activations_spec, addmm_with, einsum_with, fqt_addbmm, fqt_addmm, fqt_conv, fqt_conv_transpose,
                         fqt_einsum, fqt_linear, fqt_matmul, fqt_multi_head_attention, fqt_sdpa, matvec_with, mha_with,
                         sdpa_with)
from .passes.insert_qdq import _CHECKPOINT_HOP, InsertResult, _higher_order_name, insert_qdq

__all__ = ["export", "export_onnx", "inference_graph", "ONNX_OPSET", "FQTExportError"]

log = logging.getLogger(__name__)

#: Default ONNX opset (QuantizeLinear/DequantizeLinear with per-axis scales need >= 13;
#: 18 is torch.onnx's default and what onnxscript's torchlib targets).
ONNX_OPSET = 18


class FQTExportError(NotImplementedError):
    """The model holds an op that the requested export format cannot express."""


# The oldest torch release the export paths were run with (2.11, 2.13, 2.14, 2.15 pass the
# tests). On 2.5 torch.onnx's exporter does not apply the custom translation of fqt::fake_quant
# and torch.export fails on SmallCNN with a dynamic batch; 2.6-2.10 were not tried.
MIN_EXPORT_TORCH = (2, 11)


def _check_torch_version(what: str) -> None:
    if torch_version() < MIN_EXPORT_TORCH:
        raise RuntimeError(
            f"fqt_compile.{what} needs torch >= {'.'.join(map(str, MIN_EXPORT_TORCH))} (the oldest release it "
            f"was tested with); this is torch {torch.__version__}. Training and inspection work on it."
        )


# ---------------------------------------------------------------------------------------------
# inference forms of the FQT products: float ops on fake-quantized operands
# ---------------------------------------------------------------------------------------------


def _fq(x: Tensor, bits: int, scheme: str, gran: str, axis: int) -> Tensor:
    return torch.ops.fqt.fake_quant(x, bits, scheme, gran, axis)


def _infer_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, spec: QSpec) -> Tensor:
    # output = X~ @ W~^T + b; per-channel input ranges are per input feature (last dim)
    x_t = _fq(x, spec.a_bits, spec.a_scheme, spec.a_gran, -1)
    w_t = _fq(weight, spec.b_bits, spec.b_scheme, spec.b_gran, 0)
    return F.linear(x_t, w_t, bias)


def _infer_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, spec: QSpec) -> Tensor:
    # output = conv(X~, W~) + b; per-channel input ranges are per input channel (dim 1)
    x_t = _fq(x, spec.a_bits, spec.a_scheme, spec.a_gran, 1)
    w_t = _fq(weight, spec.b_bits, spec.b_scheme, spec.b_gran, 0)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return conv(x_t, w_t, bias, stride, padding, dilation, groups)


def _infer_conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                          spec: QSpec) -> Tensor:
    # output = conv_transpose(X~, W~) + b; per-channel weights per output channel (dim 1)
    x_t = _fq(x, spec.a_bits, spec.a_scheme, spec.a_gran, 1)
    w_t = _fq(weight, spec.b_bits, spec.b_scheme, spec.b_gran, 1)
    conv = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[weight.dim()]
    return conv(x_t, w_t, bias, stride, padding, output_padding, groups, dilation)


def _infer_matmul(a: Tensor, b: Tensor, *, spec: QSpec) -> Tensor:
    # output = A~ @ B~ (both operands ranged over their last dim when per-channel; a vector as
    # the one-row or one-column matrix the training form quantizes)
    return matvec_with(lambda x, y: torch.matmul(_fq(x, spec.a_bits, spec.a_scheme, spec.a_gran, -1),
                                                 _fq(y, spec.b_bits, spec.b_scheme, spec.b_gran, -1)), a, b)


def _infer_addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: float = 1, alpha: float = 1, spec: QSpec) -> Tensor:
    return addmm_with(lambda x, y: _infer_matmul(x, y, spec=spec), bias, a, b, beta, alpha)


def _infer_einsum(equation: str, a: Tensor, b: Tensor, *, spec: QSpec) -> Tensor:
    return einsum_with(lambda x, y: _infer_matmul(x, y, spec=spec), equation, a, b)


def _infer_addbmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: float = 1, alpha: float = 1, spec: QSpec) -> Tensor:
    return addmm_with(lambda x, y: _infer_einsum("bnk,bkp->np", x, y, spec=spec), bias, a, b, beta, alpha)


def _infer_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, *, spec: QSpec, mask_as_bias: bool = True,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    # fqt_sdpa's decomposition in eval (no dropout), on fake-quantized operands; mask_as_bias
    # is how the training graph applies a boolean or causal mask (sdpa="recompute" chooses it
    # per call): the same probabilities either way
    return sdpa_with(lambda a, b, which: _infer_matmul(a, b, spec=spec), query, key, value, attn_mask, 0.0,
                     is_causal, scale, enable_gqa, mask_as_bias, return_weights)


def _infer_mha(*args: Any, spec: QSpec, quantize_attention: bool = True, recompute_id: int | None = None,
               mask_as_bias: bool = True, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    # fqt_multi_head_attention's products in their inference forms (eval: no dropout; nothing
    # to recompute, and the mask forms give the same probabilities)
    attn_spec = activations_spec(spec)

    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, causal: bool,
                  need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if quantize_attention:
            got = _infer_sdpa(q, k, v, mask, 0.0, causal, spec=attn_spec, return_weights=need_weights)
        elif need_weights:
            got = sdpa_with(lambda a, b, which: torch.matmul(a, b), q, k, v, mask, 0.0, causal, return_weights=True)
        else:
            got = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)
        return got if need_weights else (got, None)

    return mha_with(lambda x, w, b, which: _infer_linear(x, w, b, spec=spec), attention, *args, **kwargs)


_INFERENCE_FORMS = {
    fqt_linear: _infer_linear,
    fqt_conv: _infer_conv,
    fqt_conv_transpose: _infer_conv_transpose,
    fqt_matmul: _infer_matmul,
    fqt_addmm: _infer_addmm,
    fqt_sdpa: _infer_sdpa,
    fqt_multi_head_attention: _infer_mha,
    fqt_einsum: _infer_einsum,
    fqt_addbmm: _infer_addbmm,
}


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a Tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


@contextlib.contextmanager
def _eval_uncompiled(model: nn.Module, what: str) -> Iterator[None]:
    """The model in eval mode and without its ``torch.compile`` wrapper, restored after."""
    if model.training:
        msg = (
            f"{what}: {type(model).__name__} is in training mode; exporting eval semantics "
            "(dropout off, batch-norm running statistics, no gradient quantizers). Call "
            "model.eval() first to silence this warning."
        )
        warnings.warn(msg, UserWarning, stacklevel=4)
    was_training = model.training
    compiled = model.__dict__.get("_compiled_call_impl")
    model.eval()
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled
        model.train(was_training)


def inference_graph(
    model: nn.Module, example_inputs: Any, config: FQTConfig | str | dict | None = None
) -> tuple[fx.GraphModule, InsertResult]:
    """The quantized inference form of ``model`` as a torch-level ``fx.GraphModule`` whose
    products compute on ``fqt::fake_quant`` operands, and the ``insert_qdq`` decisions."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: model must be an nn.Module, got {type(model).__name__}")
    cfg = resolve_config(config)
    args = _as_tuple(example_inputs)
    with _eval_uncompiled(model, "fqt_compile.export"), torch.no_grad():
        try:
            gm, _ = torch._dynamo.export(model)(*args)
        except Exception as e:
            raise RuntimeError(
                f"fqt_compile.export: TorchDynamo could not capture {type(model).__name__} as one graph: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
    result = insert_qdq(gm, cfg) if cfg.mode is not Mode.OFF else InsertResult()
    _inline_checkpoint_regions(gm)
    for g in (gm, *(m for m in gm.modules() if isinstance(m, fx.GraphModule) and m is not gm)):  # and bodies
        for node in g.graph.nodes:
            if node.op == "call_function" and node.target in _INFERENCE_FORMS:
                node.target = _INFERENCE_FORMS[node.target]
        g.graph.lint()
        g.recompile()
    return gm, result


def _inline_checkpoint_regions(gm: fx.GraphModule) -> None:
    """A ``torch.utils.checkpoint`` region (dynamo's ``tag_activation_checkpoint`` with the
    region as its body) becomes a plain call of its body: inference keeps no activations to
    recompute, and torch.export does not take the op from a dynamo graph."""
    for node in list(gm.graph.nodes):
        if (_higher_order_name(node) == _CHECKPOINT_HOP and node.args and isinstance(node.args[0], fx.Node)
                and node.args[0].op == "get_attr"):
            body = node.args[0]
            node.op, node.target, node.args, node.kwargs = "call_module", str(body.target), tuple(node.args[1:]), {}
            if not body.users:
                gm.graph.erase_node(body)


def _dynamic_batch_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(a, Tensor) and a.dim() >= 1 else None for a in args)


def export(
    model: nn.Module,
    example_inputs: Any,
    config: FQTConfig | str | dict | None = None,
    *,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export`` of the quantized inference form of ``model`` (eval semantics).

    The program holds one ``fqt::fake_quant`` node per quantized operand (forward quantizers
    Q_f, Q_w); the gradient quantizers vanish. ``dynamic_batch`` makes dim 0 of every tensor
    input symbolic (give an example batch of at least 2: torch.export specializes size 1).
    A model in training mode is exported with eval semantics and a warning; the model's mode
    and weights are left as they were.
    """
    _check_torch_version("export")
    gm, _ = inference_graph(model, example_inputs, config)
    args = _as_tuple(example_inputs)
    dynamic_shapes = _dynamic_batch_shapes(args) if dynamic_batch else None
    try:
        return torch.export.export(gm, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        if not dynamic_batch:
            raise
        raise RuntimeError(
            f"fqt_compile.export: torch.export failed with a dynamic batch dimension for "
            f"{type(model).__name__} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the model may depend on the batch size: pass dynamic_batch=False, or an example "
            "batch larger than 1"
        ) from e


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


def _onnx_fake_quant(x: Any, bits: int, scheme: str, granularity: str, axis: int) -> Any:
    """``fqt::fake_quant`` in ONNX: range reductions, QuantizeLinear (+ Clip below 8 bits) and
    DequantizeLinear, in float32.

    Our quantizer stores ``x ~= codes * scale + offset`` with int8 codes in
    [-2^(b-1), 2^(b-1) - 1]. ONNX: ``q = saturate(round(x / scale) + zero_point)``,
    ``y = (q - zero_point) * scale``:

    - ``affine_zero``: zero_point = (level of 0.0) - 2^(b-1) = -offset / scale, an integer;
    - ``symmetric``:   zero_point = 0, codes clipped to +-(2^(b-1) - 1);
    - ``affine``:      the range starts at ``lo``, not at a level of 0: quantize ``x - lo``
                       with zero_point -2^(b-1), add ``lo`` after DequantizeLinear.

    Below 8 bits the int8 codes are clipped to the b-bit range (ONNX has no int2..int7).
    A zero range stores scale 0 in torch; here the divisor is 1 there, which gives the same
    values (every code equals the zero point).
    """
    from onnxscript import ir
    from onnxscript.onnx_opset import opset18 as op

    half, levels = 2 ** (bits - 1), 2**bits - 1
    rank = len(x.shape)
    f32 = ir.DataType.FLOAT
    is_f32 = x.dtype == f32
    xf = x if is_f32 else op.Cast(x, to=f32)
    if granularity == "tensor":
        lo, hi = op.ReduceMin(xf, keepdims=0), op.ReduceMax(xf, keepdims=0)
        q_axis = 1  # ignored for scalar scales
    else:
        q_axis = axis % rank
        axes = op.Constant(value_ints=[d for d in range(rank) if d != q_axis])
        lo, hi = op.ReduceMin(xf, axes, keepdims=0), op.ReduceMax(xf, axes, keepdims=0)

    def const(v: float) -> Any:
        return op.Constant(value_float=float(v))

    def int8(v: Any) -> Any:
        return op.Cast(v, to=ir.DataType.INT8)

    zero_f = const(0.0)
    shift = None
    if scheme == "symmetric":
        qmin, qmax = -(half - 1), half - 1
        span = op.Max(op.Abs(lo), op.Abs(hi))
        scale = op.Div(span, const(qmax))
        div = op.Where(op.Greater(scale, zero_f), scale, const(1.0))
        zp = int8(op.Mul(scale, zero_f))  # zeros with the scale's shape
    elif scheme == "affine_zero":
        qmin, qmax = -half, half - 1
        lo, hi = op.Min(lo, zero_f), op.Max(hi, zero_f)
        scale = op.Div(op.Sub(hi, lo), const(levels))
        div = op.Where(op.Greater(scale, zero_f), scale, const(1.0))
        zero = op.Clip(op.Round(op.Div(op.Neg(lo), div)), zero_f, const(levels))  # level of 0.0
        zp = int8(op.Sub(zero, const(half)))
    elif scheme == "affine":
        qmin, qmax = -half, half - 1
        scale = op.Div(op.Sub(hi, lo), const(levels))
        div = op.Where(op.Greater(scale, zero_f), scale, const(1.0))
        zp = int8(op.Sub(op.Mul(scale, zero_f), const(half)))
        shift = lo if granularity == "tensor" else op.Unsqueeze(
            lo, op.Constant(value_ints=[d for d in range(rank) if d != q_axis])
        )
        xf = op.Sub(xf, shift)
    else:
        raise FQTExportError(f"fqt::fake_quant: scheme {scheme!r} has no ONNX form")
    q = op.QuantizeLinear(xf, div, zp, axis=q_axis)
    if qmin > -128 or qmax < 127:
        q = op.Clip(q, op.Constant(value=ir.tensor(qmin, dtype=ir.DataType.INT8)),
                    op.Constant(value=ir.tensor(qmax, dtype=ir.DataType.INT8)))
    y = op.DequantizeLinear(q, div, zp, axis=q_axis)
    if shift is not None:
        y = op.Add(y, shift)
    return y if is_f32 else op.CastLike(y, x)


#: fqt ops with an ONNX form. Everything else in the ``fqt`` namespace (integer GEMMs,
#: gradient quantizers, BHQ/Hadamard transforms) exists only in training graphs.
_ONNX_TRANSLATIONS = {"fqt::fake_quant": _onnx_fake_quant}


def _check_onnx_ops(ep: torch.export.ExportedProgram) -> None:
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace == "fqt" and target._schema.name not in _ONNX_TRANSLATIONS:
            stack = node.meta.get("nn_module_stack") or {}
            path = str(list(stack.values())[-1][0]) if stack else ""
            where = f" in module {path!r}" if path else ""
            raise FQTExportError(
                f"export_onnx: {target._schema.name} (node {node.name!r}{where}) has no ONNX form. "
                f"Only forward quantizers ({', '.join(sorted(_ONNX_TRANSLATIONS))}) export: integer "
                "GEMMs, fqt::qmm and gradient quantizers belong to training graphs. Export the float "
                "model with a config (export_onnx(model, inputs, path, config)), not a model that "
                "calls fqt ops or fqt_compile.functional products itself."
            )


def _fold_weight_quantization(model: Any) -> int:
    """Replace ``QuantizeLinear`` (and the int8 ``Clip`` after it) of constant tensors by int8
    initializers: weights are stored as codes + ``DequantizeLinear``. Returns the count."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:  # Constant nodes the optimizer left
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            consts.setdefault(node.output[0], node.attribute[0].t)
    folded, keep = 0, []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in ("QuantizeLinear", "Clip") and inputs and all(i in consts for i in inputs):
            feeds = {i: numpy_helper.to_array(consts[i]) for i in inputs}
            (value,) = ReferenceEvaluator(node).run(None, feeds)
            tensor = numpy_helper.from_array(np.asarray(value), node.output[0])
            graph.initializer.append(tensor)
            consts[node.output[0]] = tensor
            folded += node.op_type == "QuantizeLinear"
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    onnx.checker.check_model(model)
    return folded


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    config: FQTConfig | str | dict | None = None,
    *,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
) -> Any:
    """Write the quantized inference form of ``model`` to ``path`` as ONNX (QDQ form).

    Forward quantizers become ``QuantizeLinear``/``DequantizeLinear`` pairs (``axis`` set for
    per-channel ranges; activation ranges are computed in the graph from each batch, as in
    training); weights are stored as int8 codes followed by ``DequantizeLinear``; gradient
    quantizers vanish. The model is checked with ``onnx.checker`` (full check) and returned
    as an ``onnx.ModelProto``. Needs the ``export`` extra (onnx, onnxscript; onnxruntime to
    run it). A model in training mode is exported with eval semantics and a warning. Raises
    :class:`FQTExportError` for an op without an ONNX form, naming it.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(
            f"export_onnx needs onnx and onnxscript ({e.name} is missing): pip install 'fqt_compile[export]'"
        ) from None
    if opset < 13:
        raise ValueError(f"export_onnx: opset must be >= 13 (per-axis QuantizeLinear), got {opset}")
    _check_torch_version("export_onnx")
    ep = export(model, example_inputs, config, dynamic_batch=dynamic_batch)
    _check_onnx_ops(ep)
    table = {getattr(torch.ops.fqt, name.split("::")[1]).default: fn for name, fn in _ONNX_TRANSLATIONS.items()}
    args = _as_tuple(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            ep, args, custom_translation_table=table, opset_version=opset, dynamo=True, verbose=False
        )
    proto = program.model_proto
    n = _fold_weight_quantization(proto)
    log.info("export_onnx: %d weight quantizers folded into int8 initializers", n)
    path = os.fspath(path)
    onnx.save(proto, path)
    onnx.checker.check_model(path, full_check=True)
    return proto
