"""passes.lower_int_gemm: the lowered graph computes what the simulated graph computes.

Each pattern runs the same model twice, lowering on and off (``lower_int_gemm``), from the same
seed: the codes are identical, the integer GEMM is exact, so outputs and gradients agree to
float rounding. Tolerance: relative 1e-5 of the tensor's scale (float32 epilogue vs a float32
matmul of dequantized codes, both accumulating ~K products with ~1e-7 relative rounding each).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile
from fqt_compile import FQTConfig, ForwardSpec, GradSpec
from fqt_compile.gemm import int32_safe_k
from fqt_compile.models import MLP, SmallCNN, TransformerBlock
from fqt_compile.passes.lower_int_gemm import LowerResult, lower_int_gemm

from test_insert_qdq import fqt_counts
from conftest import CONV_DIRECT, CPU_CONV_INT_MM, CPU_CONV_OUTPUT, CPU_INT_MM, needs_inductor_torch


def _lowering(rec, kind) -> LowerResult:
    (name, res), = [(n, r) for n, r in rec.aten_passes[kind] if n == "lower_int_gemm"]
    return res


def _run(model, x, cfg, seed=5):
    fqt_compile.compile(model, cfg)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, fqt_compile.records(model)[-1]


def _close(a, b, what):
    scale = b.abs().max().clamp(min=1e-12)
    assert ((a - b).abs().max() / scale) < 1e-5, f"{what}: max rel diff {((a - b).abs().max() / scale):.3g}"


def _lowered_vs_simulated(base, x, cfg, what=""):
    """Run copies of ``base`` with lowering on and off from the same seed; assert the output
    and every gradient agree; return both records (lowered, simulated)."""
    out_l, g_l, rec_l = _run(copy.deepcopy(base), x, cfg)
    gx_l, x.grad = x.grad, None
    out_s, g_s, rec_s = _run(copy.deepcopy(base), x, dataclasses.replace(cfg, lower_int_gemm=False))
    _close(out_l, out_s, f"{what} output")
    _close(gx_l, x.grad, f"{what} grad_input")
    for n in g_s:
        _close(g_l[n], g_s[n], f"{what} {n}")
    return rec_l, rec_s


class Bmm(nn.Module):
    """One batched product: (2, 8, 16) @ (2, 16, 12)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(2, 16, 12))

    def forward(self, x):
        return torch.matmul(x, self.p)


class MatVec(nn.Module):
    """A matrix-vector product with a vector weight: x @ w, w of 24."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24))

    def forward(self, x):
        return (x @ self.w).reshape(-1, 4)  # (9, 4): the test weights the output's last dim


FORWARD = {
    "affine8": ForwardSpec(8),
    "symmetric8": ForwardSpec(8, symmetric=True),
    "affine4": ForwardSpec(4, zero_aligned=False),
    "symmetric4": ForwardSpec(4, symmetric=True),
}


@pytest.mark.parametrize("fwd", sorted(FORWARD))
@pytest.mark.parametrize("gi_kind, gw_kind", [("ptq", "ptq"), ("psq", "column"), ("bhq", "column"), ("hadamard", "psq"), ("column", "bhq")])
@pytest.mark.parametrize("model", ["linear", "bmm", "matvec"])
def test_lowered_equals_simulated_with_the_same_draws(model, gi_kind, gw_kind, fwd):
    """One product per graph, so both runs see the same upstream gradient G and draw the same
    codes; in a deeper network a float-rounding difference upstream can move a stochastic
    rounding decision by one level, which is not what this test is about."""
    bits = FORWARD[fwd].bits
    torch.manual_seed(0)
    if model == "linear":
        base, x = nn.Linear(24, 40), torch.randn(12, 24, requires_grad=True)
    elif model == "matvec":  # x @ w with a vector weight: N = 1, and grad_input's K = 1
        base, x = MatVec(), torch.randn(3, 12, 24, requires_grad=True)
    else:
        base, x = Bmm(), torch.randn(2, 8, 16, requires_grad=True)
    cfg = FQTConfig(
        input=FORWARD[fwd], weight=FORWARD[fwd], grad_input=GradSpec(gi_kind, bits),
        grad_weight=GradSpec(gw_kind, bits), compiler="eager",
    )  # fmt: skip
    rec_l, rec_s = _lowered_vs_simulated(base, x, cfg)
    fw, bw = _lowering(rec_l, "forward"), _lowering(rec_l, "backward")
    assert fw.lowered and len(fw.lowered) == len(fw.decisions), "every output GEMM lowers"
    by_gemm = {(d.gemm, model): {d.lowered} for d in bw.decisions}
    # grad_input: per-row / per-tensor Q_b1 lowers (BHQ/Hadamard apply their inverse to the
    # result) except in batched products, where the transform mixes batch entries; per-column
    # Q_b1 puts a scale on the contracted axis.
    gi_mm = {"ptq": True, "psq": True, "bhq": True, "hadamard": True, "column": False}[gi_kind]
    gi_bmm = gi_mm and gi_kind not in ("bhq", "hadamard")
    if model in ("linear", "matvec"):  # a matrix-vector product's G has one column: one scale
        assert by_gemm[("grad_input", model)] == {gi_mm or model == "matvec"}
    # grad_weight: per-tensor / per-column Q_b2 lowers; per-row (psq) scales the contracted
    # axis; BHQ's inverse mixes it.
    gw = {"ptq": True, "column": True, "psq": False, "bhq": False}[gw_kind]
    assert by_gemm[("grad_weight", model)] == {gw}
    if model == "bmm":
        assert by_gemm[("grad_input", "bmm")] == {gi_bmm}
    assert all(not d.lowered for d in _lowering(rec_s, "backward").decisions)
    for d in bw.simulated:
        assert d.reason and d.kernel == "simulated"


def test_lowered_gemm_counts_in_training_graphs():
    torch.manual_seed(0)
    saved = {"sdpa": "decompose", "recompute_mlp": False}
    cases = [
        (MLP(64, 32, 10, depth=2), torch.randn(8, 64), {}, (3, 5), (0, 0)),
        (SmallCNN(width=8), torch.randn(4, 1, 8, 8), {}, (1, 2), (4, 7)),  # convs reported simulated (8 channels)
        (TransformerBlock(32, 4), torch.randn(2, 8, 32), saved, (6, 12), (0, 0)),
        # the default recomputes the score GEMM and fc1's in the backward: two more, lowered too
        (TransformerBlock(32, 4), torch.randn(2, 8, 32), {}, (6, 14), (0, 0)),
    ]
    for model, x, changes, (fw_low, bw_low), (fw_sim, bw_sim) in cases:
        _, _, rec = _run(model, x, FQTConfig.recipe("psq8", compiler="eager", **changes))
        fw, bw = _lowering(rec, "forward"), _lowering(rec, "backward")
        assert (len(fw.lowered), len(bw.lowered)) == (fw_low, bw_low), type(model).__name__
        assert (len(fw.simulated), len(bw.simulated)) == (fw_sim, bw_sim), type(model).__name__
        c_fw, c_bw = fqt_counts(rec.forward), fqt_counts(rec.backward)
        assert c_fw["qmm"] == 0 and c_bw["qmm"] == 0
        assert c_fw["int_gemm"] + c_fw["int_mm"] == fw_low
        assert c_bw["int_gemm"] + c_bw["int_mm"] == bw_low
    conv = next(d for d in _lowering(rec, "forward").decisions if d.module == "qkv")
    assert conv.kernel == CPU_INT_MM and conv.mkn == (16, 32, 96)


# Convolutions (im2col): geometries that exercise padding corrections, strides (a zero-dilated
# gradient for grad_input, with a skipped tail row), asymmetric kernels, dilation and 1-D.
CONVS = {
    "2d_s2_tail": (lambda: nn.Conv2d(8, 6, 3, padding=1, stride=2), (3, 8, 10, 10)),
    "2d_asym": (lambda: nn.Conv2d(8, 6, (2, 3), padding=(0, 3), stride=(2, 1)), (3, 8, 7, 6)),
    "1d_dilated": (lambda: nn.Conv1d(8, 6, 3, padding=2, dilation=2), (3, 8, 11)),
    "1x1": (lambda: nn.Conv2d(8, 6, 1, bias=False), (3, 8, 5, 5)),
}


@pytest.mark.parametrize("direct", [False, True], ids=["im2col", "direct"])
@pytest.mark.parametrize("fwd", sorted(FORWARD))
@pytest.mark.parametrize("gi_kind, gw_kind", [("ptq", "ptq"), ("psq", "column"), ("bhq", "ptq"), ("column", "psq")])
def test_conv_lowered_equals_simulated_with_the_same_draws(gi_kind, gw_kind, fwd, direct, monkeypatch):
    """The lowering of all three conv GEMMs against the float convolution on the same codes:
    im2col + integer GEMM, and oneDNN's direct int8 convolution for the output GEMM and a
    stride-1 grad_input, each with the same epilogue. The im2col speed rule is switched off so
    that these small shapes lower (it is tested below); tolerance as for the products above."""
    import fqt_compile.passes.lower_int_gemm as lig

    if direct and not CONV_DIRECT:
        pytest.skip("oneDNN's int8 convolution is not exact on this CPU (gemm.conv_int8_available)")
    monkeypatch.setattr(lig, "CONV_RULE", False)
    bits = FORWARD[fwd].bits
    cfg = FQTConfig(
        input=FORWARD[fwd], weight=FORWARD[fwd], grad_input=GradSpec(gi_kind, bits),
        grad_weight=GradSpec(gw_kind, bits), compiler="eager", direct_conv=direct,
    )  # fmt: skip
    for name, (make, shape) in CONVS.items():
        torch.manual_seed(0)
        base, x = make(), torch.randn(*shape, requires_grad=True)
        rec_l, _ = _lowered_vs_simulated(base, x, cfg, name)
        got = {d.gemm: d for k in ("forward", "backward") for d in _lowering(rec_l, k).decisions}
        assert got["output"].kernel == ("fqt.conv_int8" if direct else CPU_CONV_INT_MM), name
        # grad_input: per-sample / per-tensor Q_b1 (BHQ: its inverse mixes samples, which the
        # per-sample transposed convolution commutes with); per-column scales the out-channels
        assert got["grad_input"].lowered == (gi_kind != "column"), name
        if got["grad_input"].lowered:  # a strided one runs as its phases' stride-1 output GEMMs
            kernel = "fqt.conv_int8" if direct else CPU_CONV_INT_MM
            strided = name in ("2d_s2_tail", "2d_asym")
            assert got["grad_input"].kernel == ("phases+" if strided else "") + kernel, name
        # grad_weight contracts over samples and positions: only a per-tensor Q_b2 lowers
        assert got["grad_weight"].lowered == (gw_kind == "ptq"), name
        for d in got.values():
            assert d.lowered or "contracted axis" in d.reason, (name, d.reason)


TRANSPOSED_CONVS = {
    "2d_s2_outpad": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (3, 8, 5, 5)),
    "1d_dilated": (lambda: nn.ConvTranspose1d(8, 6, 3, padding=2, dilation=2), (3, 8, 9)),
    "1x1": (lambda: nn.ConvTranspose2d(8, 6, 1, bias=False), (3, 8, 5, 5)),
}


@pytest.mark.parametrize("weight", ["tensor", "channel"])
@pytest.mark.parametrize("gi_kind, gw_kind", [("ptq", "ptq"), ("psq", "column")])
def test_conv_transpose_lowered_equals_simulated_with_the_same_draws(gi_kind, gw_kind, weight, monkeypatch):
    """A transposed convolution's GEMMs are a convolution's with the roles exchanged: its output
    runs as a grad_input GEMM (its phases' stride-1 convolutions where strided, else im2col or
    the direct convolution), its grad_input as an output GEMM, its grad_weight as a grad_weight
    GEMM with the input in the gradient's place. Lowered against simulated with the same draws
    (the im2col speed rule off), per-tensor and per-output-channel (symmetric, folded into
    grad_input's gradient) weights; the tags name the product's GEMMs, and a GEMM that stays
    simulated says which scale is on the contracted axis."""
    import fqt_compile.passes.lower_int_gemm as lig

    monkeypatch.setattr(lig, "CONV_RULE", False)
    cfg = FQTConfig(weight=ForwardSpec(8, weight, symmetric=weight == "channel"), grad_input=GradSpec(gi_kind, 8),
                    grad_weight=GradSpec(gw_kind, 8), compiler="eager")
    for name, (make, shape) in TRANSPOSED_CONVS.items():
        torch.manual_seed(0)
        base, x = make(), torch.randn(*shape, requires_grad=True)
        rec_l, _ = _lowered_vs_simulated(base, x, cfg, name)
        got = {d.gemm: d for k in ("forward", "backward") for d in _lowering(rec_l, k).decisions}
        assert set(got) == {"output", "grad_input", "grad_weight"} and all(d.module == "[transposed]" for d in got.values())
        # output: the weight's per-output-channel scales are the GEMM's columns
        assert got["output"].lowered, (name, got["output"].reason)
        # grad_input contracts over the output channels: per-channel (symmetric) weights fold
        # their scales into the gradient before Q_b1, as a convolution's do, and lower
        assert got["grad_input"].lowered, (name, got["grad_input"].reason)
        # grad_weight contracts over samples and positions: only a per-tensor Q_b2 lowers
        assert got["grad_weight"].lowered == (gw_kind == "ptq"), (name, got["grad_weight"].reason)
        for d in got.values():
            assert d.lowered or ("contracted axis" in d.reason and "transposed convolution" in d.reason), d.reason


STRIDED = {  # name: (module, input shape, phases with kernel taps)
    "k3_s2_tail": (lambda: nn.Conv2d(8, 6, 3, padding=1, stride=2), (3, 8, 10, 10), 4),
    "k2_s3": (lambda: nn.Conv2d(8, 6, 2, stride=3), (3, 8, 11, 10), 4),  # 5 of 9 phases get no tap
    "k4_s2_p3": (lambda: nn.Conv2d(8, 6, 4, padding=3, stride=2), (3, 8, 9, 12), 4),  # padding past the taps
    "1d_k5_s2": (lambda: nn.Conv1d(8, 6, 5, padding=2, stride=2), (3, 8, 13), 2),
    "s13_dil21": (lambda: nn.Conv2d(8, 6, 3, padding=(2, 1), stride=(1, 3), dilation=(2, 1)), (3, 8, 9, 13), 3),
    "1x1_s2": (lambda: nn.Conv2d(8, 6, 1, stride=2), (3, 8, 9, 9), 1),
    "transposed_outpad": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (3, 8, 5, 5), 4),
}


@pytest.mark.parametrize("direct", [False, True], ids=["im2col", "direct"])
def test_strided_grad_input_runs_as_its_phase_convolutions(direct, monkeypatch):
    """A strided grad_input (and so a strided transposed convolution's output) runs as one
    stride-1 output GEMM per output phase of the input, on the gradient as it is (no zeros
    inserted): each phase's integer convolution is in the graph, none of the zero-dilated
    kind, and the result equals the simulated one from the same draws (tolerance as above)
    over tails, kernels narrower than the stride, padding past the taps, 1-D, a stride along
    one dim with dilation along the other, and output_padding."""
    import fqt_compile.passes.lower_int_gemm as lig

    if direct and not CONV_DIRECT:
        pytest.skip("oneDNN's int8 convolution is not exact on this CPU (gemm.conv_int8_available)")
    monkeypatch.setattr(lig, "CONV_RULE", False)  # these small shapes lower (the rule: below)
    cfg = FQTConfig(grad_input=GradSpec("psq", 8), grad_weight=GradSpec("ptq", 8), compiler="eager", direct_conv=direct)
    kernel = "fqt.conv_int8" if direct else CPU_CONV_INT_MM
    for name, (make, shape, n_phases) in STRIDED.items():
        torch.manual_seed(0)
        base, x = make(), torch.randn(*shape, requires_grad=True)
        rec, _ = _lowered_vs_simulated(base, x, cfg, name)
        transposed = isinstance(base, nn.ConvTranspose2d)
        kind = "forward" if transposed else "backward"
        (d,) = [d for d in _lowering(rec, kind).decisions if d.gemm == ("output" if transposed else "grad_input")]
        assert d.lowered and d.kernel == "phases+" + kernel, (name, d.kernel, d.reason)
        assert f"{n_phases} stride-1 phase convolution" in d.reason, (name, d.reason)
        gm = getattr(rec, kind)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert torch.ops.fqt.qconv_grad_input.default not in targets, name
        int_convs = targets.count(torch.ops.fqt.conv_int8.default) + targets.count(torch.ops.fqt.mm_int8.default)
        # the phases, plus the graph's other lowered conv GEMM (grad_weight; the transposed
        # convolution's forward has only its output)
        assert int_convs == n_phases + (0 if transposed else 1), (name, int_convs)


def test_strided_grad_input_phases_follow_the_rule():
    """With the measured rules on, a strided grad_input lowers as its phases when every phase
    lowers by the output GEMM's rule and the phases are large enough to repay their fixed
    costs (64 channels, 32 x 64 x 64 inputs: 315M multiply-adds per phase); otherwise it stays
    the float convolution, its graph as it was, and the reason names the phase that would not
    lower (16 channels: N = 16) or the phases' size (64 channels on 2 x 8 x 8). A strided
    1 x 1 kernel's one phase takes im2col."""
    cfg = FQTConfig(grad_input=GradSpec("psq", 8), grad_weight=GradSpec("ptq", 8), compiler="eager")
    for ch, shape, why in ((64, (32, 64, 64, 64), None), (16, (2, 16, 8, 8), "of which phase [0, 0]"),
                           (64, (2, 64, 8, 8), "multiply-adds each on average (< 150M)")):
        torch.manual_seed(0)
        base, x = nn.Conv2d(ch, ch, 3, padding=1, stride=2), torch.randn(*shape, requires_grad=True)
        rec, _ = _lowered_vs_simulated(base, x, cfg, f"{ch} channels")
        (d,) = [d for d in _lowering(rec, "backward").decisions if d.gemm == "grad_input"]
        assert d.lowered == (why is None), (ch, d.reason)
        targets = [n.target for n in rec.backward.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.fqt.qconv_grad_input.default) == (0 if why is None else 1)
        assert torch.ops.fqt.qconv.default not in targets  # no phase left behind
        if why is None:
            assert d.kernel == "phases+" + CPU_CONV_OUTPUT and "4 stride-1 phase convolutions" in d.reason, d.reason
        else:
            assert d.reason.startswith("convolution: stride [2, 2], run as 4 stride-1 phase convolutions"), d.reason
            assert why in d.reason, d.reason
    # a strided 1 x 1 kernel (a ResNet shortcut): one phase, a 1 x 1 convolution of the gradient
    # as it is, which takes im2col (its columns are the gradient) as a 1 x 1 kernel's grad_input does
    base, x = nn.Conv2d(128, 256, 1, stride=2, bias=False), torch.randn(32, 128, 32, 32, requires_grad=True)
    rec, _ = _lowered_vs_simulated(base, x, cfg, "1x1 stride 2")
    (d,) = [d for d in _lowering(rec, "backward").decisions if d.gemm == "grad_input"]
    assert d.kernel == "phases+" + CPU_CONV_INT_MM and "1 stride-1 phase convolution;" in d.reason, d.reason


def test_conv_rule_follows_the_measurements():
    """benchmarks/bench_conv.py (benchmarks/results/conv.json): the rule lowers exactly the
    GEMMs it measured faster, and keeps the float convolution where it measured a loss."""
    from fqt_compile.passes.lower_int_gemm import _conv_rule, _direct_rule

    lowers = lambda gemm, mkn, stride=1: _conv_rule(gemm, mkn, [stride, stride]) is None  # noqa: E731
    assert not lowers("output", (100352, 9, 32))  # a 1-channel stem: 6-10x slower
    assert not lowers("output", (100352, 288, 32))  # N = 32: a tie
    assert lowers("output", (25088, 288, 64))  # stride-2, 64 channels: 0.57x
    assert not lowers("output", (100352, 576, 64))  # 56 MiB of columns at N = 64: 1.0-1.4x
    assert lowers("output", (6272, 2304, 256)) and lowers("output", (6272, 256, 1024))
    assert not lowers("grad_input", (25088, 576, 32), stride=2)  # zero-dilated gradient: 3.9x (now phases)
    assert lowers("grad_input", (6272, 2304, 256))
    assert not lowers("grad_weight", (8, 100352, 72)) and not lowers("grad_weight", (32, 100352, 9))
    assert lowers("grad_weight", (32, 100352, 288))
    # oneDNN's direct int8 convolution (benchmarks/results/conv_zen5_s17_direct.json)
    direct = lambda mkn: _direct_rule(mkn) is None  # noqa: E731
    assert not direct((100352, 9, 32))  # the stem: 2.2x
    assert not direct((100352, 144, 16)) and not direct((100352, 72, 8))  # 0.7-1.2x
    assert direct((100352, 288, 32)) and direct((100352, 576, 64))  # 0.68-0.80x, 0.52-0.59x
    assert direct((6272, 2304, 256)) and direct((6272, 256, 1024))


@pytest.mark.parametrize("direct", [False, True], ids=["im2col", "direct"])
def test_conv_training_graph_lowers_where_the_rule_says(direct):
    """A 64-channel conv (rule: all three GEMMs lower with per-tensor Q_b2; the output and
    grad_input as oneDNN's direct int8 convolution where it runs) next to a 1-channel stem
    (rules: float), default compiler path counts and reasons."""
    if direct and not CONV_DIRECT:
        pytest.skip("oneDNN's int8 convolution is not exact on this CPU (gemm.conv_int8_available)")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 64, 3, padding=1)
            self.body = nn.Conv2d(64, 64, 3, padding=1)

        def forward(self, x):
            return self.body(torch.relu(self.stem(x)))

    torch.manual_seed(0)
    _, _, rec = _run(Net(), torch.randn(2, 1, 8, 8), FQTConfig.recipe("ptq8", compiler="eager", direct_conv=direct))
    got = {(d.module, d.gemm): d for k in ("forward", "backward") for d in _lowering(rec, k).decisions}
    body = {("body", "output"), ("body", "grad_input"), ("body", "grad_weight")}
    assert {k for k, d in got.items() if d.lowered} == body
    assert got[("body", "output")].mkn == (128, 576, 64) and got[("body", "grad_input")].mkn == (128, 576, 64)
    assert got[("body", "grad_weight")].mkn == (64, 128, 576)
    conv = "fqt.conv_int8" if direct else CPU_CONV_INT_MM
    assert [got[("body", g)].kernel for g in ("output", "grad_input")] == [conv, conv]
    assert got[("body", "grad_weight")].kernel == CPU_CONV_INT_MM  # contracts over samples: im2col
    assert "K=9 < 64" in got[("stem", "output")].reason
    assert ("direct int8 convolution" in got[("stem", "output")].reason) == direct
    assert ("stem", "grad_input") not in got  # the input needs no gradient
    c_fw, c_bw = fqt_counts(rec.forward), fqt_counts(rec.backward)
    assert (c_fw["int_gemm"], c_fw["qconv"], c_fw["conv_int8"]) == (1, 1, 1 if direct else 0)
    assert (c_bw["int_gemm"], c_bw["qconv_grad_weight"], c_bw["qconv_grad_input"]) == (2, 1, 0)
    assert c_bw["conv_int8"] == (1 if direct else 0)


def test_a_1x1_convolutions_grad_input_takes_im2col_and_its_output_the_direct_convolution():
    """For a 1x1 kernel the grad_input columns are the gradient itself; im2col + integer GEMM
    measured faster there than oneDNN's direct convolution, which keeps the output GEMM."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 4, requires_grad=True)
    _, _, rec = _run(nn.Conv2d(64, 64, 1), x, FQTConfig.recipe("ptq8", compiler="eager"))
    got = {d.gemm: d for k in ("forward", "backward") for d in _lowering(rec, k).decisions}
    assert got["output"].kernel == CPU_CONV_OUTPUT
    assert got["grad_input"].kernel == CPU_CONV_INT_MM and got["grad_input"].mkn == (32, 64, 64)


def test_per_channel_weights_keep_grad_input_simulated_with_reason():
    torch.manual_seed(0)
    cfg = FQTConfig(weight=ForwardSpec(8, "channel"), compiler="eager")
    _, _, rec = _run(MLP(16, 16, 4, depth=1), torch.randn(4, 16), cfg)
    fw, bw = _lowering(rec, "forward"), _lowering(rec, "backward")
    assert len(fw.lowered) == 2  # per-output-channel scale is on N of the output GEMM
    gi = [d for d in bw.decisions if d.gemm == "grad_input"]
    assert gi and not any(d.lowered for d in gi)
    assert "b_scale varies along the contracted axis K" in gi[0].reason


@pytest.mark.parametrize("gi_kind", ["ptq", "psq", "bhq"])
def test_per_channel_symmetric_weights_fold_into_q_b1_and_lower(gi_kind, monkeypatch):
    """DESIGN.md section 4: with per-channel symmetric weights W~ = diag(s) C, grad_input is
    Q_b1(G diag(s)) @ C, with no scale left on the contracted axis: it lowers (linear and
    conv), and the lowered graph equals the simulated one (both fold)."""
    import fqt_compile.passes.lower_int_gemm as lig

    monkeypatch.setattr(lig, "CONV_RULE", False)
    w_spec = ForwardSpec(8, "channel", symmetric=True)
    cfg = FQTConfig(weight=w_spec, grad_input=GradSpec(gi_kind, 8), grad_weight=GradSpec("ptq", 8), compiler="eager")
    for make, shape in ((lambda: nn.Linear(24, 40), (12, 24)), (lambda: nn.Conv2d(8, 6, 3, padding=1), (3, 8, 6, 6))):
        torch.manual_seed(0)
        base, x = make(), torch.randn(*shape, requires_grad=True)
        rec_l, _ = _lowered_vs_simulated(base, x, cfg)
        gi = [d for d in _lowering(rec_l, "backward").decisions if d.gemm == "grad_input"]
        assert gi and all(d.lowered for d in gi), [d.reason for d in gi]


def _qmm_graph(a, b, a_bits=8, b_bits=8):
    one, zero = torch.ones(()), torch.zeros(())

    def f(a, b):
        return torch.ops.fqt.qmm(a, one * 0.5, zero + 0.25, b, one * 2.0, zero - 1.0, a_bits, b_bits, "m:output")

    return make_fx(f, tracing_mode="fake")(a, b)


def test_int32_overflow_is_split_and_exact():
    """K * 128 * 128 > 2^31 - 1: a single int32 accumulation would wrap. The pass uses
    fqt::int_mm, which sums int32-safe chunks; the result matches a float64 reference."""
    k = int32_safe_k(8, 8) + 1000
    assert k * 128 * 128 > 2**31 - 1
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((k, 3), -128, dtype=torch.int8)
    gm = _qmm_graph(a, b)
    res = lower_int_gemm(gm, FQTConfig())
    (d,) = res.decisions
    assert d.lowered and d.kernel == "fqt.int_mm" and "int32-safe chunks" in d.reason
    ref = ((a.double() * 0.5 + 0.25) @ (b.double() * 2.0 - 1.0)).float()
    torch.testing.assert_close(gm(a, b), ref, rtol=1e-6, atol=0)
    wrapped = torch._int_mm(a[:, :k], b).double()  # what one int32 accumulation gives
    assert not torch.allclose(wrapped, a.double() @ b.double())


def test_a_conv_beyond_onednns_exact_range_lowers_through_im2col(monkeypatch):
    """K = C*kh*kw above gemm.CONV_INT8_MAX_K: oneDNN's sums of shifted (uint8) codes could
    leave int32, so the direct int8 convolution is not used; im2col + an integer GEMM (whose
    own int32-safe K is larger) lowers it (speed rules off, as above), and the result equals
    the simulated one."""
    import fqt_compile.passes.lower_int_gemm as lig
    from fqt_compile.gemm import CONV_INT8_MAX_K

    monkeypatch.setattr(lig, "CONV_RULE", False)
    c = CONV_INT8_MAX_K // 9 + 1
    torch.manual_seed(0)
    base, x = nn.Conv2d(c, 2, 3, padding=1, bias=False), torch.randn(1, c, 2, 2, requires_grad=True)
    assert c * 9 > CONV_INT8_MAX_K and c * 9 <= int32_safe_k(8, 8)
    cfg = FQTConfig(grad_weight=GradSpec("ptq", 8), compiler="eager")
    rec_l, _ = _lowered_vs_simulated(base, x, cfg, "K beyond oneDNN's range")
    (d,) = _lowering(rec_l, "forward").decisions
    assert d.lowered and d.kernel == CPU_CONV_INT_MM and d.mkn == (4, c * 9, 2), d


def test_int_mm_chunks_are_exact():
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (5, 37), dtype=torch.int8)
    b = torch.randint(-128, 128, (37, 6), dtype=torch.int8)
    exact = (a.long() @ b.long()).float()
    for max_k in (1, 7, 37, 1000):
        assert torch.equal(torch.ops.fqt.int_mm(a, b, max_k), exact)
    a3, b3 = a.reshape(1, 5, 37).repeat(3, 1, 1), b.reshape(1, 37, 6).repeat(3, 1, 1)
    assert torch.equal(torch.ops.fqt.int_mm(a3, b3, 10), exact.expand(3, 5, 6))
    with pytest.raises(RuntimeError, match="contraction sizes differ"):
        torch.ops.fqt.int_mm(a, a, 8)
    # the batched int32-out kernel, on row-major and on transposed operands
    i32 = (a.long() @ b.long()).to(torch.int32)
    assert torch.equal(torch.ops.fqt.bmm_int8(a3, b3), i32.expand(3, 5, 6))
    assert torch.equal(torch.ops.fqt.bmm_int8(b3.transpose(1, 2), a3.transpose(1, 2)), i32.t().expand(3, 6, 5))


def test_mm_int8_takes_unflattened_operands():
    """fqt::mm_int8 (a lowered convolution's GEMM): exact int32 products of its operands'
    row-major flattenings (M, K) and (K, N), given 2-D, transposed, or before flattening (the
    im2col copy (B, Ho, Wo, kh, kw, C) of the columns)."""
    from torch.library import opcheck

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (2, 3, 4, 3, 3, 5), dtype=torch.int8, generator=g)  # (24, 45)
    b = torch.randint(-128, 128, (45, 7), dtype=torch.int8, generator=g)
    a2 = a.reshape(24, 45)
    exact = (a2.long() @ b.long()).to(torch.int32)
    assert torch.equal(torch.ops.fqt.mm_int8(a2, b, 45), exact)
    assert torch.equal(torch.ops.fqt.mm_int8(a, b, 45), exact)
    assert torch.equal(torch.ops.fqt.mm_int8(a, b.reshape(5, 9, 7), 45), exact)
    assert torch.equal(torch.ops.fqt.mm_int8(a2.t().contiguous().t(), b.t().contiguous().t(), 45), exact)
    c = torch.randint(-128, 128, (7, 24), dtype=torch.int8, generator=g)  # (7, 24) @ a as (24, 45)
    assert torch.equal(torch.ops.fqt.mm_int8(c, a, 24), (c.long() @ a2.long()).to(torch.int32))
    with pytest.raises(RuntimeError, match="does not flatten"):
        torch.ops.fqt.mm_int8(a, b[:44], 45)
    with pytest.raises(RuntimeError, match="does not flatten"):
        torch.ops.fqt.mm_int8(a, b, 7)
    opcheck(torch.ops.fqt.mm_int8.default, (a, b, 45))


def test_small_k_uses_aten_int_mm_and_symmetric_offsets_drop_corrections():
    a = torch.randint(-8, 8, (4, 16), dtype=torch.int8)
    b = torch.randint(-8, 8, (16, 5), dtype=torch.int8)
    gm = _qmm_graph(a, b, 4, 4)
    (d,) = lower_int_gemm(gm, FQTConfig()).decisions
    assert d.kernel == CPU_INT_MM
    ref = (a.float() * 0.5 + 0.25) @ (b.float() * 2.0 - 1.0)
    torch.testing.assert_close(gm(a, b), ref)
    # a symmetric forward quantizer: its offset is zero and the correction terms vanish
    x = torch.randn(6, 16)

    def f(x, b):
        ca, sa, oa = torch.ops.fqt.quantize(x, 8, "symmetric", "tensor", 0)
        return torch.ops.fqt.qmm(ca, sa, oa, b, sa, oa, 8, 8, "m:output")

    gm2 = make_fx(f, tracing_mode="fake")(x, b)
    lower_int_gemm(gm2, FQTConfig())
    targets = [str(n.target) for n in gm2.graph.nodes]
    assert "aten.sum.dim_IntList" not in targets
    ca, sa, _ = torch.ops.fqt.quantize(x, 8, "symmetric", "tensor", 0)
    torch.testing.assert_close(gm2(x, b), (ca.float() * sa) @ (b.float() * sa))


@needs_inductor_torch
def test_inductor_partitioner_saves_int8_codes_for_backward():
    """The backward keeps int8 codes (+ scalar scales) of the operands, not float copies: the
    forward graph's saved outputs are int8 for every quantized operand (inductor's min-cut
    partitioner; conv and linear)."""

    class ConvLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(64, 64, 3, padding=1)  # large enough for the im2col rule
            self.fc = nn.Linear(64 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    m = ConvLinear()
    ref = copy.deepcopy(m)
    x = torch.randn(4, 64, 6, 6, requires_grad=True)
    fqt_compile.compile(m, FQTConfig.recipe("psq8"))
    out = m(x)
    out.sum().backward()
    rec = fqt_compile.records(m)[0]
    # the conv GEMMs lowered under inductor (im2col of the int8 codes) compute what the
    # simulated float convolution computes (the forward is deterministic)
    fw, bw = _lowering(rec, "forward"), _lowering(rec, "backward")
    assert {d.module: d.kernel for d in fw.decisions} == {"conv": CPU_CONV_OUTPUT, "fc": CPU_INT_MM}
    assert sorted(d.module for d in bw.lowered if d.gemm == "grad_input") == ["conv", "fc"]
    fqt_compile.compile(ref, FQTConfig.recipe("psq8", compiler="eager", lower_int_gemm=False))
    _close(out.detach(), ref(x).detach(), "inductor lowered vs eager simulated output")
    out = next(n for n in rec.forward.graph.nodes if n.op == "output")
    saved = [a.meta["val"] for a in out.args[0][1:] if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    big = [t for t in saved if t.numel() > 64]  # skip scalars (scales, offsets, seeds)
    assert big and all(t.dtype == torch.int8 for t in big), [(t.dtype, tuple(t.shape)) for t in big]
    # conv input, conv weight, fc input, fc weight, and the ReLU's 0/1 mask (an int8 tensor
    # through the backend's threshold_backward decomposition, tests/test_backend.py)
    assert len(big) == 5


# (input shape, weight shape, stride, padding, dilation): padding corrections, strides (a
# zero-dilated gradient with a skipped tail for grad_input), an asymmetric kernel with a pad
# wider than it (negative pads in grad_input), 1-D with dilation. Three geometries: the cold
# inductor compile of this graph is ~1 min on 2 cores.
_INDUCTOR_CONVS = [
    ((2, 3, 10, 10), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1]),
    ((2, 3, 7, 6), (4, 3, 2, 3), [2, 1], [0, 3], [1, 1]),
    ((2, 3, 11), (4, 3, 3), [1], [2], [2]),
    ((2, 3, 11, 10), (4, 3, 2, 2), [3, 3], [0, 0], [1, 1]),  # phases no tap reaches: zeros
    ((2, 3, 13), (4, 3, 3), [2], [2], [2]),  # stride with dilation: the zero-dilated gradient
]


def _conv_gemms(*ts):
    fqt, seed, outs = torch.ops.fqt, torch.tensor(5), []
    for i, (_, _, st, pd, dl) in enumerate(_INDUCTOR_CONVS):
        x, w = ts[2 * i], ts[2 * i + 1]
        xq = fqt.quantize(x, 8, "affine_zero", "tensor", 0)
        wq = fqt.quantize(w, 8, "affine_zero", "tensor", 0)
        y = fqt.qconv(*xq, *wq, 8, 8, st, pd, dl, 1, "m:output")
        g = torch.sin(y).reshape(y.shape[0], -1)
        rows = [y.shape[0]] + [1] * (y.dim() - 1)
        gc, gs, go = fqt.sr_quantize(g, seed, 8, "row")  # PSQ: grad_input
        tc, ts_, to = fqt.sr_quantize(g, seed, 8, "tensor")  # PTQ: grad_weight
        outs += [
            y,
            fqt.qconv_grad_input(gc.reshape(y.shape), gs.reshape(rows), go.reshape(rows), *wq, 8, 8, list(x.shape),
                                 st, pd, dl, 1, "m:grad_input"),
            fqt.qconv_grad_weight(tc.reshape(y.shape), ts_, to, *xq, 8, 8, list(w.shape), st, pd, dl, 1,
                                  "m:grad_weight"),
        ]  # fmt: skip
    return outs


@needs_inductor_torch
def test_conv_lowering_compiles_with_inductor_and_matches(monkeypatch):
    """The lowered conv graphs (unfold with steps, negative pads, the flipped kernel, a strided
    grad_input's phases and their interleaving, the zero-dilated gradient) through inductor's
    code generation: same values as the ops."""
    from torch._inductor.compile_fx import compile_fx_inner

    from fqt_compile.passes.decompose_fqt import decompose_fqt
    import fqt_compile.passes.lower_int_gemm as lig

    monkeypatch.setattr(lig, "CONV_RULE", False)
    torch.manual_seed(0)
    args = [torch.randn(s) for x_s, w_s, *_ in _INDUCTOR_CONVS for s in (x_s, w_s)]
    gm = make_fx(_conv_gemms, tracing_mode="fake")(*args)
    ref = gm(*args)
    res = lig.lower_int_gemm(gm, FQTConfig())
    assert len(res.lowered) == len(res.decisions) == 3 * len(_INDUCTOR_CONVS)
    phased = [d.kernel.startswith("phases+") for d in res.decisions if d.gemm == "grad_input"]
    assert phased == [True, True, False, True, False], phased
    compiled = compile_fx_inner(decompose_fqt(gm)[0], args)
    for a, b in zip(ref, compiled(list(args))):
        _close(b, a, f"inductor {tuple(a.shape)}")


@needs_inductor_torch
def test_inductor_hands_the_batched_gemm_row_major_operands(monkeypatch):
    """The lowering writes a row-major copy of a transposed batched operand (attention's P^T in
    the backward) for ``fqt::bmm_int8``. Without a layout tag on the op, inductor kept that copy
    in its input's transposed layout (an in-place no-op kernel), and the op made the copy itself
    in eager code (15-18 ms of a one-block GPT step); with ``needs_contiguous_strides`` (or
    ``needs_fixed_stride_order``) every operand arrives contiguous. Where the AMX kernel takes
    the batched products (it reads strided operands itself) there is nothing to check."""
    from fqt_compile import gemm

    seen = []
    real = gemm._bmm_int32
    monkeypatch.setattr(gemm, "_bmm_int32", lambda a, b: (seen.append((a.is_contiguous(), b.is_contiguous())), real(a, b))[1])
    torch.manual_seed(0)
    m = TransformerBlock(32, 4)
    fqt_compile.compile(m, FQTConfig())
    m(torch.randn(2, 64, 32)).square().mean().backward()
    kernels = [d.kernel for r in fqt_compile.records(m) for res in (r.aten_passes.get("backward") or [])
               if res[0] == "lower_int_gemm" for d in res[1].decisions]
    if "fqt.bmm_int8" not in kernels:
        pytest.skip(f"no fqt::bmm_int8 in the backward here (kernels: {sorted(set(kernels))})")
    assert len(seen) >= 4 and all(a and b for a, b in seen), seen


@needs_inductor_torch
def test_inductor_hands_the_conv_gemm_row_major_columns(monkeypatch):
    """A lowered convolution's GEMM runs as ``fqt::mm_int8``, whose layout tag makes inductor
    write the im2col columns row-major, as the lowering traced them. With ``aten._int_mm``
    (no stride requirement) inductor chose the layout its reads favour: for an NCHW input the
    (B*L, K) columns came out column-major, built by a scalar gather with an integer division
    per index (26 ms against 2 ms for the CNN benchmark's stride-2 convolution)."""
    from fqt_compile import gemm

    seen = []
    real = gemm._int_mm_2d
    monkeypatch.setattr(gemm, "_int_mm_2d", lambda a, b: (seen.append((a.is_contiguous(), b.is_contiguous())), real(a, b))[1])
    torch.manual_seed(0)
    m = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 64, 3, stride=2, padding=1))  # output GEMM 50 x 72 x 64
    fqt_compile.compile(m, FQTConfig(direct_conv=False))  # the im2col path (CPUs without VNNI)
    m(torch.randn(2, 8, 10, 10)).square().mean().backward()
    rec = fqt_compile.records(m)[0]
    fw = _lowering(rec, "forward")
    assert [d.kernel for d in fw.decisions] == [CPU_CONV_INT_MM], fw.decisions
    assert seen == [(True, True)]
    # the columns reach the op unflattened, (B, Ho, Wo, kh, kw, C): inductor writes that copy
    # in a 6-D loop (a (B*L, K) one costs an integer division per index); K = 3 * 3 * 8
    (mm,) = [n for n in rec.forward.graph.nodes if n.target is torch.ops.fqt.mm_int8.default]
    assert tuple(mm.args[0].meta["val"].shape) == (2, 5, 5, 3, 3, 8) and mm.args[2] == 72
