"""Export of the quantized inference form: torch.export round trip and ONNX QDQ round trip in
onnxruntime, against the compiled FQT model in eval mode, at batch sizes other than the traced one.

Tolerance. The inference form computes exactly what the simulated FQT forward computes
(``lower_int_gemm=False``): checked to float rounding. Against the default compiled model
(integer GEMMs) and in onnxruntime, float rounding differs (int32 accumulation, onnxruntime's
reductions, erf, softmax, the division inside QuantizeLinear), so an element on a rounding tie
of an 8-bit activation quantizer can take the neighbouring code, which moves the values that
depend on it by about one quantization step (~1/255 of that tensor's range) and, through the
next ranges, others by less. We accept a max error of MAX_REL and a mean error of MEAN_REL of
the output's largest magnitude (observed: max <= 2.3e-3, mean <= 1e-4).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys

import pytest
import torch

import fqt_compile
from fqt_compile import FQTConfig, ForwardSpec
from fqt_compile.export import MIN_EXPORT_TORCH, FQTExportError, export, export_onnx
from fqt_compile.models import MLP, SmallCNN, TransformerBlock

export_module = sys.modules["fqt_compile.export"]  # the package's name `export` is the function

# export() and export_onnx() refuse older torch with a clear error (tested below by faking the
# version); run the rest where they work
pytestmark = pytest.mark.skipif(
    export_module.torch_version() < MIN_EXPORT_TORCH, reason=f"export needs torch >= {MIN_EXPORT_TORCH}"
)

MAX_REL = 2e-2
MEAN_REL = 1e-3
TRACE_BATCH = 3
RUN_BATCHES = (1, 5)
CFG = FQTConfig(compiler="eager")
SIMULATED = dataclasses.replace(CFG, lower_int_gemm=False)

class _AttentionCheckpointed(torch.nn.Module):
    """nn.MultiheadAttention called as by default, returning its attention weights (one row: its
    input projection, both attention products and its output projection), and a linear layer in
    a torch.utils.checkpoint region, which the inference form calls as a plain function."""

    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        out, weights = self.mha(x, x, x)
        return checkpoint(self.fc, out + weights.amax(-1, keepdim=True), use_reentrant=False)


class _Einsums(torch.nn.Module):
    """A weight product and attention written with torch.einsum (the weight first)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 16) / 4)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, 2, 8).transpose(1, 2)
                   for z in self.qkv(torch.einsum("fd,bld->blf", self.w, x)).chunk(3, dim=-1))
        p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k), dim=-1)
        return torch.einsum("bhij,bhjd->bhid", p, v)


class _MatVec(torch.nn.Module):
    """A linear layer, then a product with a vector weight (a one-column matrix: one scale)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.v = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.relu(self.fc(x)) @ self.v


# (model, input shape without batch, quantized products, quantized operands)
CASES = {
    "matvec": (_MatVec, (4, 16), 2, 4),
    "einsum": (_Einsums, (5, 16), 4, 8),
    "conv_transpose": (lambda: torch.nn.Sequential(
        torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, padding=1)), (8, 5, 5), 2, 4),
    "mha_checkpoint": (_AttentionCheckpointed, (4, 16), 2, 10),
    "mlp": (lambda: MLP(16, 32, 4), (16,), 3, 6),
    "cnn": (lambda: SmallCNN(width=8), (1, 8, 8), 5, 10),
    "block": (lambda: TransformerBlock(32, 4), (8, 32), 5, 12),  # sdpa: two products, four operands
}


def _reference(model, cfg):
    """The compiled FQT model in eval mode (the training code path's forward)."""
    ref = fqt_compile.compile(copy.deepcopy(model).eval(), cfg)

    def run(x):
        with torch.no_grad():
            return ref(x)

    return run


@functools.lru_cache(maxsize=None)
def _case(name):
    """(model, simulated reference) per case, built once: compiling costs more than the checks."""
    make, *_ = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    return model, _reference(model, SIMULATED)


def _close(actual, expected):
    err = (torch.as_tensor(actual) - expected).abs()
    scale = expected.abs().max()
    assert err.max() <= MAX_REL * scale, f"max error {err.max():.3g} vs scale {scale:.3g}"
    assert err.mean() <= MEAN_REL * scale, f"mean error {err.mean():.3g} vs scale {scale:.3g}"


def _fqt_nodes(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("fqt.")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_export_round_trip(name, tmp_path):
    _, shape, _, operands = CASES[name]
    model, simulated = _case(name)
    ep = export(model, torch.randn(TRACE_BATCH, *shape), CFG)
    assert isinstance(ep, torch.export.ExportedProgram)
    # forward quantizers only: one fqt::fake_quant per quantized operand, no gradient quantizers
    assert _fqt_nodes(ep) == [torch.ops.fqt.fake_quant.default] * operands
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    for b in RUN_BATCHES:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            out = ep.module()(x)
        # the same estimator as the compiled model's simulated forward, to float rounding
        torch.testing.assert_close(out, simulated(x))
        assert torch.equal(loaded.module()(x), out)


@pytest.mark.parametrize("sdpa", ["decompose", "recompute"])
def test_torch_export_takes_either_quantized_attention_policy(sdpa):
    """``sdpa="recompute"`` tags each attention call with the mask form it trains with
    (``mask_as_bias``); the inference form accepts it and computes the same forward (export
    raised a TypeError on it until the eighteenth session)."""
    model, simulated = _case("block")
    ep = export(model, torch.randn(TRACE_BATCH, 8, 32), dataclasses.replace(CFG, sdpa=sdpa))
    assert _fqt_nodes(ep) == [torch.ops.fqt.fake_quant.default] * CASES["block"][3]
    x = torch.randn(5, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), simulated(x))


def test_torch_export_matches_the_default_compiled_model():
    """Against the compiled model with integer GEMMs (see the tolerance note above)."""
    model, _ = _case("block")
    ep = export(model, torch.randn(TRACE_BATCH, 8, 32), CFG)
    ref = _reference(model, CFG)
    for b in RUN_BATCHES:
        x = torch.randn(b, 8, 32)
        _close(ep.module()(x), ref(x))


def _ort_sessions(path):
    ort = pytest.importorskip("onnxruntime")
    out = {}
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):  # ENABLE_ALL is what users get by default
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        out[level] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return out


def _run_ort(session, x):
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_round_trip_in_onnxruntime(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    _, shape, products, operands = CASES[name]
    model, ref = _case(name)
    path = tmp_path / f"{name}.onnx"
    proto = export_onnx(model, torch.randn(TRACE_BATCH, *shape), path, CFG)
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == operands
    # activations are quantized in the graph; weights are int8 initializers (folded Q)
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    # sdpa has no weights; the attention module's row has two (input and output projections)
    n_weights = {"block": products - 1, "mha_checkpoint": products + 1, "einsum": 2}.get(name, products)
    assert len(weights) == n_weights
    assert ops.count("QuantizeLinear") == operands - n_weights
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # no custom ops left
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    for level, session in _ort_sessions(path).items():
        for b in RUN_BATCHES:
            x = torch.randn(b, *shape)
            _close(_run_ort(session, x), ref(x))


def _attr(node, name):
    return next((a.i for a in node.attribute if a.name == name), None)


@pytest.mark.parametrize(
    "input_spec,weight_spec",
    [
        (ForwardSpec(8, "channel"), ForwardSpec(8, "channel")),  # per-channel: axis
        (ForwardSpec(4, symmetric=True), ForwardSpec(4, "channel", symmetric=True)),  # < 8 bits: Clip
        (ForwardSpec(8, zero_aligned=False), ForwardSpec(6, "channel", zero_aligned=False)),  # affine
    ],
    ids=["channel8", "symmetric4", "affine"],
)
def test_onnx_schemes_granularities_and_bit_widths(input_spec, weight_spec, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = MLP(16, 32, 4).eval()
    cfg = FQTConfig(compiler="eager", input=input_spec, weight=weight_spec)
    path = tmp_path / "mlp.onnx"
    proto = export_onnx(model, torch.randn(TRACE_BATCH, 16), path, cfg)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    weight_dq = [n for n in dq if n.input[0] in inits]
    assert len(weight_dq) == 3
    for n in weight_dq:
        codes, scale = inits[n.input[0]], inits[n.input[1]]
        assert scale.shape == (codes.shape[0],) and _attr(n, "axis") == 0  # one scale per output row
        half = 2 ** (weight_spec.bits - 1)
        assert codes.min() >= -half and codes.max() <= half - 1
    if input_spec.granularity.value == "channel":
        act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        assert act_q and all(_attr(n, "axis") == 1 for n in act_q)  # last dim of (N, features)
    if input_spec.bits < 8 or input_spec.symmetric:
        assert any(n.op_type == "Clip" for n in proto.graph.node)
    ref = _reference(model, dataclasses.replace(cfg, lower_int_gemm=False))
    for session in _ort_sessions(path).values():
        for b in RUN_BATCHES:
            x = torch.randn(b, 16)
            _close(_run_ort(session, x), ref(x))


def test_training_mode_model_warns_and_exports_eval_semantics():
    model, simulated = _case("cnn")
    stats = [b.clone() for b in model.buffers()]
    model.train()
    try:
        with pytest.warns(UserWarning, match="training mode; exporting eval semantics"):
            ep = export(model, torch.randn(TRACE_BATCH, 1, 8, 8), CFG)
        assert model.training  # the model's mode is restored
    finally:
        model.eval()
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(ep.module()(x), simulated(x))  # batch-norm running statistics


class _CallsIntegerGemm(torch.nn.Module):
    def forward(self, x):
        return torch.ops.fqt.int_mm(x, x.t(), 1024)


def test_op_without_onnx_form_is_named(tmp_path):
    pytest.importorskip("onnxscript")
    x = torch.randint(-8, 8, (4, 4), dtype=torch.int8)
    with pytest.raises(FQTExportError, match=r"fqt::int_mm \(node 'int_mm'\) has no ONNX form"):
        export_onnx(_CallsIntegerGemm().eval(), x, tmp_path / "x.onnx", dynamic_batch=False)


def test_missing_onnx_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"pip install 'fqt_compile\[export\]'"):
        export_onnx(MLP(16, 32, 4).eval(), torch.randn(2, 16), tmp_path / "x.onnx")


def test_older_torch_gets_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(export_module, "torch_version", lambda: (2, 5))
    model, shape = MLP(16, 32, 4), (TRACE_BATCH, 16)
    with pytest.raises(RuntimeError, match=r"fqt_compile.export needs torch >= 2.11 .* this is torch"):
        export(model, torch.randn(*shape), CFG)
    pytest.importorskip("onnxscript")
    with pytest.raises(RuntimeError, match=r"fqt_compile.export_onnx needs torch >= 2.11"):
        export_onnx(model, torch.randn(*shape), tmp_path / "m.onnx", CFG)
