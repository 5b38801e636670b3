"""Graph structure: what passes.insert_qdq put in the torch-level graph and what AOTAutograd
made of it (forward quantizers in the forward graph, gradient quantizers in the backward)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fqt_compile
from fqt_compile import FQTConfig, GradSpec, Override
from fqt_compile.functional import fqt_conv, fqt_linear, fqt_matmul, fqt_sdpa
from fqt_compile.inspect import report_from_records
from fqt_compile.models import MLP, SmallCNN, TransformerBlock
from fqt_compile.passes.insert_qdq import NodeDecision, insert_qdq, module_path_of

from conftest import quantizer_entries


def fqt_counts(gm: fx.GraphModule) -> Counter:
    """Counts of fqt:: op nodes by op name, except ``quantize`` and ``sr_quantize``: those count
    quantizers, whether a node of their own or inside a fused softmax kernel
    (conftest.quantizer_entries); plus sr_quantize by granularity."""
    c: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten._int_mm.default:
            c["aten_int_mm"] += 1
        if n.op == "call_function" and str(n.target).startswith("fqt."):
            name = str(n.target).split(".")[1]
            if name not in ("quantize", "sr_quantize"):
                c[name] += 1
    for op, _, gran in quantizer_entries(gm):
        c[op] += 1
        if op == "sr_quantize":
            c[f"sr_quantize:{gran}"] += 1
    # simulated + lowered (a lowered convolution GEMM is an fqt.mm_int8 on im2col columns, or
    # an fqt.conv_int8 on VNNI/AMX CPUs); lowered 2-D/batched CPU GEMMs: aten._int_mm,
    # fqt.mm_int8 and fqt.bmm_int8, or fqt.int_mm_amx (AMX CPUs)
    c["int_gemm"] = c["aten_int_mm"] + c["mm_int8"] + c["bmm_int8"] + c["int_mm_amx"] + c["conv_int8"]
    c["gemm"] = c["qmm"] + c["int_mm"] + c["int_gemm"] + c["qconv"] + c["qconv_grad_input"] + c["qconv_grad_weight"]
    return c


def compile_and_step(model, x, cfg):
    fqt_compile.compile(model, cfg)
    out = model(x)
    out.float().square().mean().backward()
    recs = fqt_compile.records(model)
    assert len(recs) == 1, "one graph expected (no graph breaks)"
    return recs[0]


# (model, input, products, products whose first operand needs no gradient, convolutions)
CASES = {
    "mlp": (lambda: MLP(64, 32, 10, depth=2), lambda: torch.randn(8, 64), 3, 1, 0),
    "cnn": (lambda: SmallCNN(width=8), lambda: torch.randn(4, 1, 8, 8), 5, 1, 4),
    "block": (lambda: TransformerBlock(32, 4), lambda: torch.randn(2, 8, 32), 6, 0, 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_graphs_hold_the_expected_quantizers(name):
    make, make_x, products, no_input_grad, convs = CASES[name]
    torch.manual_seed(0)
    # lowering off: the graphs as this pass leaves them (test_lower_int_gemm.py counts what
    # the lowering makes of them); nothing recomputed in the backward (the default recomputes
    # the attention and fc1 + GELU: tests/test_keep_codes.py counts what that adds)
    cfg = FQTConfig.recipe("psq8", compiler="eager", lower_int_gemm=False, sdpa="decompose", recompute_mlp=False)
    rec = compile_and_step(make(), make_x(), cfg)
    assert len(rec.insert.quantized) == (products if name != "block" else products - 1)  # sdpa = 2 products
    fw, bw = fqt_counts(rec.forward), fqt_counts(rec.backward)
    # forward: Q_f on the input and Q_w on the weight (or Q_f on both activations) per product;
    # every GEMM is one op on the int8 codes (fqt::qmm, fqt::qconv; nothing dequantized
    # outside them)
    assert fw["quantize"] == 2 * products
    assert fw["gemm"] == products and fw["qconv"] == convs and fw["dequantize"] == 0
    assert fw["sr_quantize"] == 0
    # backward: one GEMM op per path (grad_input where needed, grad_weight always); the
    # CNN's stem is its product without an input gradient
    assert bw["gemm"] == 2 * products - no_input_grad
    assert bw["qconv_grad_weight"] == convs and bw["qconv_grad_input"] == convs - (no_input_grad if convs else 0)
    # backward: Q_b1 (per-row, PSQ) per product whose input needs a gradient, Q_b2 (per-column)
    # per product
    assert bw["sr_quantize:row"] == products - no_input_grad
    assert bw["sr_quantize:column"] == products
    assert bw["sr_quantize"] == 2 * products - no_input_grad
    assert bw["quantize"] == 0  # forward quantizers are not re-run: codes are saved


def test_bhq_backward_graph_has_the_transform_nodes():
    torch.manual_seed(0)
    rec = compile_and_step(TransformerBlock(32, 4), torch.randn(2, 8, 32), FQTConfig.recipe("bhq5", compiler="eager"))
    bw = fqt_counts(rec.backward)
    assert bw["bhq_plan"] == bw["bhq_transform"] == bw["bhq_inverse"] == 6
    assert bw["sr_quantize:row"] == 6 and bw["sr_quantize:column"] == 6
    bits = sorted(b for op, b, _ in quantizer_entries(rec.backward) if op == "sr_quantize")
    assert bits == [5] * 6 + [8] * 6


def test_qat_mode_has_no_gradient_quantizers():
    torch.manual_seed(0)
    rec = compile_and_step(MLP(16, 16, 4), torch.randn(4, 16), FQTConfig.recipe("qat8", compiler="eager"))
    assert fqt_counts(rec.forward)["quantize"] == 6
    assert fqt_counts(rec.backward)["sr_quantize"] == 0


def test_decisions_are_recorded_in_node_meta_with_module_paths():
    torch.manual_seed(0)
    rec = compile_and_step(SmallCNN(width=8), torch.randn(2, 1, 8, 8), FQTConfig.recipe("psq8", compiler="eager"))
    by_module = {d.module: d for d in rec.insert.decisions}
    assert set(by_module) >= {"stem", "blocks.0.conv1", "blocks.0.conv2", "down", "fc", "bn", "blocks.0.bn1"}
    assert by_module["fc"].quantized and by_module["fc"].kind == "linear"
    assert by_module["down"].op == "conv2d" and by_module["down"].spec.gi_kind == "psq"
    assert by_module["down"].flops == 2 * (2 * 16 * 4 * 4) * (8 * 9)  # out elems x (C_in x k x k) x 2
    assert not by_module["bn"].quantized and "normalization" in by_module["bn"].reason
    for n in rec.torch_graph.graph.nodes:
        d = n.meta.get("fqt")
        if n.target in (fqt_conv, fqt_linear):
            assert isinstance(d, NodeDecision) and d.quantized


def test_overrides_keep_layers_in_full_precision_and_change_quantizers():
    torch.manual_seed(0)
    cfg = FQTConfig(
        compiler="eager",
        overrides=(Override("stem", mode="off"), Override("fc", grad_input=GradSpec("bhq", 4))),
    )
    rec = compile_and_step(SmallCNN(width=8), torch.randn(2, 1, 8, 8), cfg)
    by_module = {d.module: d for d in rec.insert.decisions}
    assert not by_module["stem"].quantized
    assert by_module["stem"].reason == "mode 'off' (override 'stem')"
    assert by_module["fc"].spec.gi_kind == "bhq" and by_module["fc"].spec.gi_bits == 4
    assert by_module["down"].spec.gi_kind == "psq"
    bw = fqt_counts(rec.backward)
    assert bw["bhq_plan"] == 1
    assert bw["sr_quantize"] == 2 * 4  # stem is off: 4 products, all with input gradients


def test_unmatched_override_warns():
    with pytest.warns(UserWarning, match="'nonexistent' matches no module"):
        fqt_compile.compile(MLP(8, 8, 2), FQTConfig(overrides=(Override("nonexistent", mode="off"),)))


def test_op_kinds_outside_config_ops_are_skipped_with_reason():
    torch.manual_seed(0)
    rec = compile_and_step(SmallCNN(width=8), torch.randn(2, 1, 8, 8), FQTConfig(ops=("linear",), compiler="eager"))
    convs = [d for d in rec.insert.decisions if d.op == "conv2d"]
    assert len(convs) == 4 and not any(d.quantized for d in convs)
    assert convs[0].reason == "op kind 'conv' not in config.ops"
    assert [d.module for d in rec.insert.quantized] == ["fc"]


def test_sdpa_full_precision_policy():
    torch.manual_seed(0)
    rec = compile_and_step(TransformerBlock(32, 4), torch.randn(2, 8, 32),
                           FQTConfig(sdpa="full_precision", compiler="eager"))
    (d,) = [d for d in rec.insert.decisions if d.op == "sdpa"]
    assert not d.quantized and "full precision" in d.reason
    assert fqt_counts(rec.backward)["sr_quantize"] == 8


def test_symbolic_trace_graph_gets_fqt_calls():
    torch.manual_seed(0)
    gm = fqt_compile.prepare(TransformerBlock(32, 4), "psq8", example_inputs=(torch.randn(2, 8, 32),))
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert targets[fqt_linear] == 4 and targets[fqt_sdpa] == 1
    assert not any(n.op == "call_module" and "fc" in str(n.target) for n in gm.graph.nodes)
    res = gm.meta["fqt_insert"]
    assert {d.module for d in res.quantized} == {"qkv", "proj", "fc1", "fc2", ""}
    assert next(d for d in res.quantized if d.op == "linear").shapes[0] == (2, 8, 32)


def test_matmul_with_parameter_is_linear_kind_and_activation_products_are_matmul():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            h = x @ self.w
            return torch.bmm(h, h.transpose(1, 2))

    gm = fx.symbolic_trace(M())
    res = insert_qdq(gm, FQTConfig())
    kinds = sorted((d.op, d.kind) for d in res.quantized)
    assert kinds == [("bmm", "matmul"), ("matmul", "linear")]
    assert sum(n.target is fqt_matmul for n in gm.graph.nodes) == 2
    x = torch.randn(2, 3, 8, requires_grad=True)
    gm(x).sum().backward()
    assert x.grad is not None


def test_matrix_vector_products_are_quantized_and_dot_products_skipped_with_reason():
    """A product with one vector operand is the matrix product of a one-row or one-column
    matrix (functional.matvec_with); the dot product of two vectors stays in float, said so."""
    from torch.fx.passes.shape_prop import ShapeProp

    def f(a, b):
        return torch.matmul(a, b)

    for shapes, quantized in ((((4, 3), (3,)), True), (((3,), (2, 3, 5)), True), (((3,), (3,)), False)):
        gm = fx.symbolic_trace(f)
        ShapeProp(gm).propagate(*(torch.randn(s) for s in shapes))
        res = insert_qdq(gm, FQTConfig())
        if quantized:
            assert [d.op for d in res.quantized] == ["matmul"] and res.skipped == [], shapes
        else:
            assert res.quantized == [] and res.skipped[0].reason == "the dot product of two vectors is not covered"


def test_module_path_normalization():
    class N:
        op = "call_function"
        meta = {"nn_module_stack": {"k": ("L['self'].layers[0]._modules['attn']", None)}}
        all_input_nodes: list = []

    assert module_path_of(N()) == "layers.0.attn"
    # torch 2.5's dynamo writes every level through _modules
    N.meta = {"nn_module_stack": {"k": ("L['self']._modules['layers']._modules['0']", None)}}
    assert module_path_of(N()) == "layers.0"


class _Dropouts(nn.Module):
    """nn.Dropout and F.dropout (written by dynamo as F.dropout calls), an in-place one, and a
    dropout inside a module configured off."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.1)
        self.off = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.2))

    def forward(self, x):
        h = F.dropout(self.drop(self.fc(x)), 0.3, self.training)
        return self.off(h) + F.dropout(x.clone(), 0.4, self.training, True)


@pytest.mark.parametrize("counter", [True, False])
def test_training_dropouts_use_the_counter_based_mask(counter):
    """config.counter_dropout: the training graph's F.dropout calls become fqt_dropout
    (fqt::dropout in the aten graphs, a 0-d int64 seed saved for the backward instead of a bool
    mask), except an in-place one and one in a module whose mode is "off"; an eval graph has
    none to rewrite; counter_dropout=False leaves torch's."""
    torch.manual_seed(0)
    m = _Dropouts()
    cfg = FQTConfig(compiler="eager", counter_dropout=counter, overrides=(Override("off*", mode="off"),))
    rec = compile_and_step(m, torch.randn(4, 16), cfg)
    assert rec.insert.counter_dropouts == (2 if counter else 0)
    calls = [n for n in rec.torch_graph.graph.nodes if n.op == "call_function"]
    assert sum(n.target is fqt_compile.functional.fqt_dropout for n in calls) == (2 if counter else 0)
    assert sum(n.target is F.dropout for n in calls) == (2 if counter else 4)
    drops = [n for n in rec.backward.graph.nodes if n.target is torch.ops.fqt.dropout.default]
    assert len(drops) == (2 if counter else 0)
    for n in drops:
        seed = n.args[1]
        assert seed.op == "placeholder" and seed.meta["val"].dtype == torch.int64 and seed.meta["val"].dim() == 0
    m.eval()
    torch._dynamo.reset()
    fqt_compile.compile(m, cfg)
    with torch.no_grad():
        m(torch.randn(4, 16))
    assert fqt_compile.records(m)[-1].insert.counter_dropouts == 0


# config.recompute_mlp (on by default): which activations between quantized linear layers the
# pass tags for recomputation in the backward (passes/insert_qdq._mlp_region)


class _TanhGelu(nn.Module):
    """HF GPT-2's MLP: the tanh approximation of GELU written out as elementwise ops."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = self.fc1(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.fc2(h)


class _Gated(nn.Module):
    """Llama's SwiGLU MLP: two projections of the same input joined by a product."""

    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(16, 64, bias=False), nn.Linear(16, 64, bias=False)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _GeluNorm(nn.Module):
    """GELU into a layer norm (BERT's masked-LM head): the region ends at the norm."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(16, 64), nn.LayerNorm(64)

    def forward(self, x):
        return self.norm(F.gelu(self.fc(x)))


class _Residual(nn.Module):
    """An activation that also reads the block's input: recomputing it would need that float."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.fc2(x + F.gelu(self.fc1(x)))


class _Relu(nn.Module):
    """ReLU's backward needs a mask only (kept as int8): recomputing would save nothing."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


#: model -> (the linear layers recomputed, the activation ops named in their reason)
RECOMPUTE_CASES = {
    "tanh_gelu": (_TanhGelu, ["fc1"], "pow, tanh, mul"),
    "gated": (_Gated, ["gate", "up"], "silu, mul"),
    "gelu_norm": (_GeluNorm, ["fc"], "gelu"),
    "residual": (_Residual, [], None),
    "relu": (_Relu, [], None),
}


@pytest.mark.parametrize("name", sorted(RECOMPUTE_CASES))
def test_recompute_mlp_tags_the_activation_regions_between_quantized_layers(name):
    make, recomputed, ops = RECOMPUTE_CASES[name]

    def step(recompute):
        torch.manual_seed(0)
        # a layer norm first, so that the layers' input is an activation, not the batch (whose
        # codes passes/keep_codes.py does not keep: quantizing it again costs no memory)
        model = nn.Sequential(nn.LayerNorm(16), make())
        rec = compile_and_step(model, torch.randn(4, 8, 16), FQTConfig(compiler="eager", recompute_mlp=recompute))
        return rec, {n: p.grad for n, p in model.named_parameters()}

    rec, grads = step(True)
    recomputed = [f"1.{m}" for m in recomputed]
    tagged = [d.module for d in rec.insert.decisions if "config.recompute_mlp" in d.reason]
    assert tagged == recomputed
    for d in rec.insert.decisions:
        if d.module in recomputed:
            assert f"output and the activation after it ({ops}) recomputed in the backward" in d.reason
    nodes = [n for n in rec.torch_graph.graph.nodes if "recompute" in n.meta]
    assert len({n.meta["ac_graph_id"] for n in nodes}) == (1 if recomputed else 0)  # one region per MLP
    assert not any(n.target is F.layer_norm for n in nodes)  # the norms before and after: not in it
    if recomputed:
        # the same gradients as with the activation saved (the forward quantizers round to
        # nearest, so the recomputed values are the forward's), and the linear layers' input
        # keeps its codes (passes/keep_codes.py: one per recomputed layer)
        _, grads_saved = step(False)
        for n in grads:
            assert torch.equal(grads[n], grads_saved[n]), n
        assert rec.aten_passes["joint"][0][1]["kept"] == len(recomputed)


# -- higher-order ops: torch.utils.checkpoint regions, and the others ---------------------------


class _AttnMlp(nn.Module):
    """Attention with dropout (quantized attention draws its mask from a seed) and a GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
        x = x + h.transpose(1, 2).reshape(b, t, d)
        return x + self.fc2(F.gelu(self.fc1(x)))


class _Checkpointed(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.b1, self.head, self.checkpointed = _AttnMlp(), nn.Linear(32, 32), checkpointed

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(self.b1, x, use_reentrant=False) if self.checkpointed else self.b1(x)
        return self.head(x)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_products_in_a_checkpoint_region_are_quantized_and_give_the_same_gradients(compiler):
    """torch.utils.checkpoint: dynamo puts the region's body in a higher-order op
    (``tag_activation_checkpoint``), whose products insert_qdq used to leave in float without a
    word. They are quantized like the others now, recorded with their region; the region
    recomputes them in the backward, and the gradients equal the uncheckpointed model's over two
    steps with the same seeds: the forward quantizers round to nearest, and the attention
    dropout's seed drawn in the region is saved (passes/keep_codes.py), so the recomputed
    attention has the forward's mask (with a seed drawn again the gradients would differ;
    AOTAutograd's own replay of the random state fails on our seed op). The reference runs with
    the eager inner compiler. With the eager one for both, bit for bit; inductor may order a float
    reduction differently (torch 2.11 did between two inductor graphs), which can move a
    stochastic rounding by one level, so there the difference must stay within 1% of the one
    that other rounding seeds make."""
    from fqt_compile.rng import rounding_generator

    torch.manual_seed(0)
    models = [_Checkpointed(False), _Checkpointed(True)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(2, 8, 32)

    def two_steps(model, seed):
        model.zero_grad(set_to_none=True)
        for step in range(2):
            torch.manual_seed(step)  # the dropout masks
            with rounding_generator(torch.Generator().manual_seed(seed + step)):
                model(x).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    # the uncheckpointed reference with the eager inner compiler (one inductor compile less)
    fqt_compile.compile(models[0], FQTConfig(compiler="eager"))
    fqt_compile.compile(models[1], FQTConfig(compiler=compiler))
    ref, checkpointed = two_steps(models[0], 10), two_steps(models[1], 10)
    other_seeds = two_steps(models[0], 20)
    for name in ref:
        if compiler == "eager":
            assert torch.equal(ref[name], checkpointed[name]), name
        else:
            # (plus float rounding, 1e-6 of the norm, for gradients no rounding reaches: head.bias)
            gap = (checkpointed[name] - ref[name]).norm()
            assert gap <= 0.01 * (other_seeds[name] - ref[name]).norm() + 1e-6 * ref[name].norm(), name

    (rec,) = fqt_compile.records(models[1])
    inside = [d for d in rec.insert.decisions if d.region]
    assert [d.module for d in inside] == ["b1.qkv", "b1", "b1.fc1", "b1.fc2"]
    assert all(d.quantized and d.node.startswith(f"{d.region}.") for d in inside)
    assert all("recomputed in the backward by its torch.utils.checkpoint region" in d.reason for d in inside)
    assert len(rec.insert.quantized) == 5
    # the region's seed (its attention dropout's) is saved, not drawn again
    assert rec.aten_passes["joint"][0][1]["seeds"] == 1
    body = rec.torch_graph.get_submodule(inside[0].region)
    assert sum(n.target in (fqt_linear, fqt_sdpa) for n in body.graph.nodes) == 4
    # every GEMM of the five products is lowered, those recomputed by the region included
    report = report_from_records([rec], model="_Checkpointed")
    assert report.totals["lowered"] == 1.0 and report.totals["coverage"] == 1.0
    assert [r.key for r in report.rows if r.region] == ["b1.qkv", "b1", "b1.fc1", "b1.fc2"]
    assert "Checkpoint regions (torch.utils.checkpoint): 4 quantized products in 1 region(s)" in str(report)


class _CustomFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class _WithCustomFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return _CustomFunction.apply(self.fc(x), self.w)


def test_products_inside_other_higher_order_ops_are_reported_in_full_precision(caplog):
    """A custom autograd.Function reaches the graph as ``autograd_function_apply`` with its
    forward and backward as bodies: fqt does not rewrite them, and says so per product (a
    decision, the report's rows, a warning in the log) instead of leaving them out."""
    model = _WithCustomFunction()
    with caplog.at_level("WARNING", logger="fqt_compile.passes.insert_qdq"):
        rec = compile_and_step(model, torch.randn(4, 16), FQTConfig(compiler="eager"))
    inside = [d for d in rec.insert.decisions if d.region]
    assert len(inside) == 3  # x @ w^T in the forward; g @ w and g^T @ x in the backward
    assert not any(d.quantized for d in inside)
    assert all(d.reason == "inside torch.ops.higher_order.autograd_function_apply, whose body fqt does not rewrite"
               for d in inside)
    assert [d.module for d in rec.insert.quantized] == ["fc"]
    assert sum("inside higher-order op autograd_function_apply" in r.getMessage() for r in caplog.records) == 3
    report = report_from_records([rec], model="m")
    rows = [r for r in report.rows if r.region]
    assert len(rows) == 3 and all(r.gemms["output"].status == "full_precision" for r in rows)
    assert report.totals["coverage"] < 1.0


class _UncoveredProducts(nn.Module):
    """Products that dynamo keeps as one call each and that fqt does not rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.bil = nn.Bilinear(16, 16, 8)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        x = self.fc(x)
        a = self.mha(x, x, x, need_weights=False)[0]
        b = torch.tensordot(x, self.w, dims=([2], [0]))
        c = torch.linalg.multi_dot([x[0], self.w, self.w])
        d = torch.addbmm(torch.zeros(4, 16), x.transpose(1, 2)[:, :4], x)
        e = torch.inner(x, x).sum() + torch.outer(x[0, 0], x[0, 1]).sum() + torch.mv(self.w, x[0, 0]).sum()
        return a.sum() + b.sum() + c.sum() + d.sum() + self.bil(x, x).sum() + e + x[0].mv(x[0, 0]).sum()


def test_products_dynamo_keeps_whole_are_listed_in_full_precision():
    """bilinear, tensordot, multi_dot, addbmm and the vector products were run in float with no
    decision at all; each is now a full-precision decision naming the op (and
    nn.MultiheadAttention, one F.multi_head_attention_forward call in dynamo's graph, is
    quantized: the tests below; tensordot too, as the einsum it is, addbmm, as one product
    over the batch and the contraction, and mv, as the product with a one-column matrix)."""
    rec = compile_and_step(_UncoveredProducts(), torch.randn(2, 4, 16), FQTConfig(compiler="eager"))
    assert [(d.module, d.op) for d in rec.insert.quantized] == [("fc", "linear"), ("mha", "multi_head_attention"),
                                                                ("", "tensordot"), ("", "addbmm"), ("", "mv"),
                                                                ("", "mv")]
    noted = Counter(d.op for d in rec.insert.skipped)
    assert noted == Counter({"linalg_multi_dot": 1, "bilinear": 1, "inner": 1, "outer": 1})
    reasons = {d.op: d.reason for d in rec.insert.skipped}
    assert reasons["inner"] == "full precision: inner (a vector product) is not covered"
    assert all(d.kind is None and "is not covered" in d.reason for d in rec.insert.skipped)


class _EinsumAttention(nn.Module):
    """Attention and a linear layer written with torch.einsum (the weight first in one of them),
    and einsums that are not one product."""

    def __init__(self, written_out: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.qkv = nn.Linear(16, 48)
        self.written_out = written_out

    def forward(self, x):
        b, t, e = x.shape
        if self.written_out:  # the same products with torch.matmul
            h = torch.matmul(x, self.w.t())
        else:
            h = torch.einsum("fd,bld->blf", self.w, x)
        q, k, v = (z.reshape(b, t, 2, 8).transpose(1, 2) for z in self.qkv(h).chunk(3, dim=-1))
        if self.written_out:
            p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1)
            return torch.matmul(p, v)
        p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k), dim=-1)
        return torch.einsum("bhij,bhjd->bhid", p, v)


def test_einsum_of_two_operands_is_quantized_like_its_matmul_form():
    """A two-operand torch.einsum that is one product (was full precision) becomes fqt_einsum:
    permutes and reshapes around one fqt_matmul, a parameter operand under the weight quantizer
    (put second where it came first). In QAT mode it computes what the same products written
    with torch.matmul do: the same forward bit for bit and the same gradients to float
    rounding. In FQT mode every GEMM lowers; einsums that are no single product stay in full
    precision with the reason."""
    torch.manual_seed(0)
    ein, ref = _EinsumAttention(), _EinsumAttention(written_out=True)
    ref.load_state_dict(ein.state_dict())
    x = torch.randn(2, 5, 16)
    for m in (ein, ref):
        fqt_compile.compile(m, FQTConfig(compiler="eager", mode="qat"))
        m(x).square().sum().backward()
    assert torch.equal(ein(x), ref(x))
    for n, p in ein.named_parameters():
        torch.testing.assert_close(p.grad, ref.get_parameter(n).grad, rtol=1e-5, atol=1e-6)
    decisions = fqt_compile.records(ein)[0].insert.decisions
    assert [(d.op, d.kind, d.quantized) for d in decisions if d.op == "einsum"] == [
        ("einsum", "linear", True), ("einsum", "matmul", True), ("einsum", "matmul", True)]

    torch._dynamo.reset()
    rec = compile_and_step(_EinsumAttention(), x, FQTConfig(compiler="eager"))
    report = report_from_records([rec], model="_EinsumAttention")
    assert report.totals["coverage"] == 1.0 and report.totals["lowered"] == 1.0

    def uncovered(x):
        return (torch.einsum("ij,jk,kl->il", x[0], x[0].t(), x[0]).sum() + torch.einsum("ii->i", x[0, :5, :5]).sum()
                + torch.einsum("bi,bi->b", x[0], x[0]).sum() + torch.einsum("ij,kl->ijkl", x[0], x[0]).sum())

    # symbolic_trace (fqt_compile.prepare), without example inputs: the letters give the ranks
    class Traceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            h = torch.einsum("fd,bld->blf", self.w, x)
            return torch.einsum("bid,bjd->bij", h, h) + torch.einsum("...d,...d->...", h, h).unsqueeze(-1)

    prepared = fqt_compile.prepare(Traceable(), FQTConfig(compiler="eager"))
    assert [(d.quantized, d.kind) for d in prepared.meta["fqt_insert"].decisions] == [
        (True, "linear"), (True, "matmul"), (False, "matmul")]
    assert prepared.meta["fqt_insert"].decisions[2].reason == (
        "einsum with an ellipsis on operands of unknown shapes (give example inputs)")
    prepared(x).sum().backward()

    torch._dynamo.reset()
    compiled = fqt_compile.compile(uncovered, FQTConfig(compiler="eager"))
    compiled(torch.randn(2, 5, 16))
    reasons = [d.reason for r in fqt_compile.records(compiled) for d in r.insert.decisions if d.op == "einsum"]
    assert reasons == ["einsum of 3 operands is not covered (two operands: one product)",
                       "einsum of 1 operand is not covered (two operands: one product)",
                       "einsum that is a vector product (no free index on either side) is not covered",
                       "einsum without a contracted index (an elementwise or outer product) is not covered"], reasons


@pytest.mark.parametrize("sa,sb,dims", [((2, 3, 4), (4, 5), 1), ((2, 3, 4), (4, 5), ([2], [0])),
                                         ((2, 3, 4), (3, 4, 5), 2), ((3, 4), (5, 3), ([0], [-1])),
                                         ((2, 3, 4), (4, 3), ([1, 2], [1, 0]))])
def test_tensordot_is_the_einsum_it_writes(sa, sb, dims):
    from fqt_compile.passes.insert_qdq import tensordot_equation

    torch.manual_seed(0)
    a, b = torch.randn(sa, dtype=torch.float64), torch.randn(sb, dtype=torch.float64)
    equation = tensordot_equation(len(sa), len(sb), dims)
    torch.testing.assert_close(torch.einsum(equation, a, b), torch.tensordot(a, b, dims))
    assert tensordot_equation(2, 2, torch.tensor([1])) is None  # dims as a tensor: not a constant


class _Upsampler(nn.Module):
    """A decoder's transposed convolutions: a module (stride 2, output_padding) and the functional
    form."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.w = nn.Parameter(torch.randn(6, 4, 3) / 8)

    def forward(self, x):
        y = torch.relu(self.up(x))  # (B, 6, 10, 10)
        return F.conv_transpose1d(y.flatten(2), self.w, stride=2)


def test_transposed_convolutions_are_quantized():
    """nn.ConvTranspose*d and F.conv_transpose*d (were full precision) become
    fqt_conv_transpose, under dynamo and under symbolic_trace: one row each, whose GEMMs are
    reported under the product's own names, and the output stays within 8-bit quantization
    error of the float model's (measured 0.6% of its largest entry; bound 3%)."""
    torch.manual_seed(0)
    model, x = _Upsampler(), torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        want = model(x)
    rec = compile_and_step(copy.deepcopy(model), x, FQTConfig(compiler="eager"))
    assert [(d.module, d.op, d.kind, d.quantized) for d in rec.insert.decisions if d.kind] == [
        ("up", "conv_transpose2d", "conv", True), ("", "conv_transpose1d", "conv", True)]
    report = report_from_records([rec], model="_Upsampler")
    # the transposed convolution's GEMMs under its own names (the model's input needs no gradient)
    assert report.row("up").gemms["grad_input"].status == "absent"
    assert all(s.status != "absent" for g, s in report.row("up").gemms.items() if g != "grad_input")
    assert all(s.status != "absent" for s in report.row("<root>").gemms.values())
    assert "(a transposed convolution's output GEMM, run as a convolution's grad_input GEMM)" in (
        report.row("up").gemms["output"].reason)
    prepared = fqt_compile.prepare(copy.deepcopy(model), FQTConfig(compiler="eager"))
    assert [(d.op, d.quantized) for d in prepared.meta["fqt_insert"].decisions if d.kind] == [
        ("conv_transpose2d", True), ("conv_transpose1d", True)]
    got = prepared(x)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    got.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prepared.parameters())


class _Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, key_padding_mask=None, attn_mask=None, is_causal=False):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                         need_weights=False)[0]


class _MhaWrittenOut(nn.Module):
    """_Mha's attention written with a packed linear layer and F.scaled_dot_product_attention."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (z.reshape(b, t, 2, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e))


def test_multihead_attention_is_quantized_like_its_written_out_form(compiler="eager"):
    """nn.MultiheadAttention reaches dynamo's graph as one F.multi_head_attention_forward call;
    insert_qdq replaces it by fqt_multi_head_attention (one row: the packed input projection,
    both attention products, the output projection). In QAT mode (exact gradients) it computes
    what the same attention written out with nn.Linear and F.scaled_dot_product_attention does:
    the same forward bit for bit and the same gradients to float rounding. In FQT mode all its
    GEMMs lower. (With inductor as the inner compiler the same held when this was written; the
    test keeps the eager one, as its parts, fqt_linear and fqt_sdpa, are tested under inductor.)"""
    torch.manual_seed(0)
    mha = _Mha()
    ref = _MhaWrittenOut(mha.attn)
    x = torch.randn(2, 4, 16)
    for m in (mha, ref):
        fqt_compile.compile(m, FQTConfig(compiler=compiler, mode="qat", sdpa="decompose"))
        m(x).square().sum().backward()
    assert torch.equal(mha(x), ref(x))
    torch.testing.assert_close(mha.attn.in_proj_weight.grad, ref.qkv.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mha.attn.out_proj.weight.grad, ref.out.weight.grad, rtol=1e-5, atol=1e-5)
    (d,) = fqt_compile.records(mha)[0].insert.decisions
    assert (d.module, d.op, d.kind, d.quantized) == ("attn", "multi_head_attention", "matmul", True)

    torch._dynamo.reset()
    rec = compile_and_step(_Mha(), x, FQTConfig(compiler=compiler))
    report = report_from_records([rec], model="_Mha")
    (row,) = report.rows
    assert row.quantized and all(s.status == "lowered" for g, s in row.gemms.items() if g != "grad_input")
    assert report.totals["lowered"] == 1.0


def test_multihead_attention_masks_follow_torch():
    """Boolean masks mean 'not attended' in nn.MultiheadAttention (the opposite of SDPA's), the
    key padding mask adds to the attention mask, and is_causal takes the causal attention: the
    quantized output stays within 8-bit quantization error of torch's float attention
    (measured below 0.02; bound 0.05), while reading any mask the wrong way moves it by more
    than 0.3 (asserted too, so the comparison can fail)."""
    torch.manual_seed(0)
    model = _Mha()
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    fqt_compile.compile(model, FQTConfig(compiler="eager"))
    cases = [dict(key_padding_mask=pad), dict(attn_mask=causal), dict(attn_mask=causal, is_causal=True),
             dict(key_padding_mask=pad, attn_mask=causal, is_causal=True),
             dict(attn_mask=torch.randn(5, 5)), dict(key_padding_mask=pad.float() * -1e4)]
    for kw in cases:
        with torch.no_grad():
            want = model.attn(x, x, x, need_weights=False, **kw)[0]  # the submodule itself: not compiled
            got = model(x, **kw)
            assert (got - want).abs().max() < 0.05, kw
            wrong = model.attn(x, x, x, need_weights=False)[0]  # no mask at all
            assert (wrong - want).abs().max() > 0.3, kw
    rec = fqt_compile.records(model)
    assert all(d.quantized for r in rec for d in r.insert.decisions)


class _MhaWithWeights(nn.Module):
    """nn.MultiheadAttention called as its default does (need_weights=True): (output, weights)."""

    def __init__(self, average: bool = True, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, **kw)
        self.average = average

    def forward(self, x, **kw):
        return self.attn(x, x, x, average_attn_weights=self.average, **kw)


class _MhaWithWeightsWrittenOut(nn.Module):
    """_MhaWithWeights written with nn.Linear and the attention's two torch.matmul products,
    returning the softmax probabilities as the weights."""

    def __init__(self, mha: nn.MultiheadAttention, average: bool) -> None:
        super().__init__()
        self.ref, self.average = _MhaWrittenOut(mha), average

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (z.reshape(b, t, 2, 8).transpose(1, 2) for z in self.ref.qkv(x).chunk(3, dim=-1))
        p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 8 ** -0.5, dim=-1)
        out = self.ref.out(torch.matmul(p, v).transpose(1, 2).reshape(b, t, e))
        return out, (p.mean(1) if self.average else p)


@pytest.mark.parametrize("average", [True, False])
def test_multihead_attention_with_weights_is_quantized_and_returns_them(average):
    """need_weights=True (nn.MultiheadAttention's default) was kept in float. Now the weights are
    the float probabilities that the quantized P @ V product rounds: in QAT mode the output and
    the weights equal, bit for bit, those of the attention written out with torch.matmul (whose
    products fqt quantizes alike), and so do the gradients through both to float rounding (the
    loss reads the weights too). Under FQT the output and the weights stay within 8-bit
    quantization error of torch's float attention with each kind of mask (measured below 0.02
    and 0.01; bounds 0.05 and 0.03), while the weights of an unmasked attention differ from the
    masked ones by more than 0.2 (asserted, so the comparison can fail)."""
    torch.manual_seed(0)
    mha = _MhaWithWeights(average)
    ref = _MhaWithWeightsWrittenOut(mha.attn, average)
    x = torch.randn(2, 5, 16)
    got = []
    for m in (mha, ref):
        fqt_compile.compile(m, FQTConfig(compiler="eager", mode="qat", sdpa="decompose"))
        out, w = m(x)
        (out.square().sum() + w.square().sum()).backward()
        got.append((out, w))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert got[0][1].shape == ((2, 5, 5) if average else (2, 2, 5, 5))
    torch.testing.assert_close(mha.attn.in_proj_weight.grad, ref.ref.qkv.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mha.attn.out_proj.weight.grad, ref.ref.out.weight.grad, rtol=1e-5, atol=1e-5)
    (d,) = fqt_compile.records(mha)[0].insert.decisions
    assert (d.op, d.quantized) == ("multi_head_attention", True)

    torch._dynamo.reset()
    model = _MhaWithWeights(average)
    fqt_compile.compile(model, FQTConfig(compiler="eager"))
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kw in [{}, dict(key_padding_mask=pad), dict(attn_mask=causal), dict(attn_mask=causal, is_causal=True),
               dict(attn_mask=torch.randn(5, 5))]:
        with torch.no_grad():
            want_out, want_w = model.attn(x, x, x, average_attn_weights=average, **kw)  # not compiled
            out, w = model(x, **kw)
        assert (out - want_out).abs().max() < 0.05 and (w - want_w).abs().max() < 0.03, kw
        if kw:
            assert (model(x)[1] - want_w).abs().max() > 0.2, kw
    assert all(d.quantized for r in fqt_compile.records(model) for d in r.insert.decisions)


def test_multihead_attention_recomputes_its_attention_under_sdpa_recompute():
    """config.sdpa="recompute" (the default) reaches nn.MultiheadAttention too (its probabilities
    were always kept): the attention inside fqt_multi_head_attention is a recompute region, so
    the backward recomputes the score product from the kept int8 codes of q, k, v and the
    dropout's seed, and the step is the one that keeps the probabilities, bit for bit (same
    seeds; attention dropout 0.1). The forward saves less."""
    got, saved = {}, {}
    for sdpa in ("recompute", "decompose"):
        torch.manual_seed(0)
        enc = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
        fqt_compile.compile(enc, FQTConfig(compiler="eager", sdpa=sdpa))
        x = torch.randn(2, 16, 32)
        torch.manual_seed(1)
        y = enc(x)
        y.square().mean().backward()
        (rec,) = fqt_compile.records(enc)
        got[sdpa] = [y.detach()] + [p.grad for p in enc.parameters()]
        bmms = sum(n.target is torch.ops.fqt.bmm_int8.default for n in rec.backward.graph.nodes)
        saved[sdpa] = sum(n.meta["val"].numel() * n.meta["val"].element_size()
                          for n in rec.forward.graph.find_nodes(op="output")[0].args[0][1:]
                          if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor))
        (d,) = [d for d in rec.insert.decisions if d.op == "multi_head_attention"]
        keep = dict(rec.aten_passes["joint"])["keep_codes"]
        if sdpa == "recompute":
            assert "recomputed in the backward" in d.reason and bmms == 5  # 4 gradient GEMMs + the scores again
            assert keep == {"kept": 3, "recomputed": 1, "seeds": 1}
        else:
            assert "probabilities kept" in d.reason and bmms == 4 and keep["recomputed"] == 0
        torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(got["recompute"], got["decompose"]))
    assert saved["recompute"] < 0.8 * saved["decompose"]


def test_multihead_attention_cases_left_in_full_precision_say_why():
    model = _Mha()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
    rec = compile_and_step(model, torch.randn(2, 4, 16), FQTConfig(compiler="eager"))
    (d,) = rec.insert.decisions
    assert not d.quantized and d.op == "multi_head_attention"
    assert d.reason == "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not covered"


def test_transformer_layers_are_quantized_throughout():
    """nn.TransformerEncoderLayer and nn.TransformerDecoderLayer call their attention with
    need_weights=False: every product is quantized (the decoder's cross-attention takes the
    packed key/value projection of the memory), they train, and the output stays within 8-bit
    quantization error of the float layer's (measured 0.4% of its largest entry; bound 3%)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    dec = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    x, mem = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        want = dec(x, mem)
    rec = compile_and_step(enc, x, FQTConfig(compiler="eager"))
    assert [(d.module, d.op, d.quantized) for d in rec.insert.decisions if d.kind] == [
        ("self_attn", "multi_head_attention", True), ("linear1", "linear", True), ("linear2", "linear", True)]
    fqt_compile.compile(dec, FQTConfig(compiler="eager"))
    y = dec(x, mem)
    y.square().sum().backward()
    assert (y - want).abs().max() <= 0.03 * want.abs().max()
    decisions = [d for r in fqt_compile.records(dec) for d in r.insert.decisions if d.kind]
    assert [(d.module, d.quantized) for d in decisions] == [
        ("self_attn", True), ("multihead_attn", True), ("linear1", True), ("linear2", True)]
    for layer in (enc, dec):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
