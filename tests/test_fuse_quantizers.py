"""passes/fuse_quantizers.py: a gradient's stochastic quantizers and column sums in one kernel.

What the pass makes of a real backward graph (an MLP of three linear layers: the two last
layers' output gradients each have a per-row Q_b1 and a per-column Q_b2 and a bias gradient;
the first layer's has only Q_b2, its input needing no gradient), what the fused graph computes
against the unfused one (same seeds, same codes: the weight gradients are equal bit for bit,
the bias gradients to float rounding), where the pass stays out, and the inspection report.
Eager inner compiler throughout: the pass runs on the aten graph before the inner compiler,
and the graph it leaves is the one recorded (``GraphRecord.backward``) either way."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fqt_compile
from fqt_compile import FQTConfig, GradKind, GradSpec, gelu_quant
from fqt_compile.inspect import gradient_quantizer_seeds, inspect
from fqt_compile.passes.fuse_quantizers import fuse_quantizers

from conftest import needs_inductor_torch, quantizer_entries

needs_kernel = pytest.mark.skipif(not gelu_quant.available(), reason=f"fused kernel {gelu_quant.status()}")

MULTI = torch.ops.fqt.sr_quantize_multi.default
SR = torch.ops.fqt.sr_quantize.default
NEW_SEED = torch.ops.fqt.new_seed.default
aten = torch.ops.aten


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _count(gm, target) -> int:
    return sum(n.target is target for n in gm.graph.nodes)


def _train_step(cfg: FQTConfig, seed: int = 5):
    model = _mlp()
    fqt_compile.compile(model, cfg)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)  # the quantizers' seed draws
    loss = model(x).square().mean()
    loss.backward()
    return model, loss.detach()


@pytest.fixture(scope="module")
def fused_and_unfused():
    fused = _train_step(FQTConfig(compiler="eager"))
    unfused = _train_step(FQTConfig(compiler="eager", fuse_quantizers=False))
    return fused, unfused


@needs_kernel
def test_each_gradient_with_two_quantizers_is_one_fused_op(fused_and_unfused):
    (model, _), (ref, _) = fused_and_unfused
    (rec,) = fqt_compile.records(model)
    (ref_rec,) = fqt_compile.records(ref)
    bw, ref_bw = rec.backward, ref_rec.backward
    # the third gradient (layer 0's, Q_b2 only) comes from ReLU's backward: inductor fuses that
    # quantizer into the kernel producing it, so it is not left to the C kernel
    assert dict(rec.aten_passes["backward"])["fuse_quantizers"] == {"fused": 2, "c_kernel": 0, "kernel": gelu_quant.status()}
    assert dict(rec.aten_passes["forward"])["fuse_quantizers"]["fused"] == 0
    assert _count(bw, MULTI) == 2 and _count(bw, SR) == 1 and _count(ref_bw, SR) == 5
    # the same quantizers (bits, granularity), with distinct seeds, in both graphs
    assert sorted(quantizer_entries(bw)) == sorted(quantizer_entries(ref_bw))
    seeds = gradient_quantizer_seeds(bw)
    assert len(seeds) == len(set(seeds)) == 5 and all(sd.target is NEW_SEED for sd in seeds)
    for op in (n for n in bw.graph.nodes if n.target is MULTI):
        assert op.args[3] == "row,column" and op.args[2] == [8, 8]
        g = op.args[0]
        assert g.meta["val"].dim() == 2 and not any(u.target is SR for u in g.users)
        # the bias gradient is the op's column sums: no sum over dim 0 of g is left
        assert not any(u.target is aten.sum.dim_IntList for u in g.users)
        assert any(u.target is operator.getitem and u.args[1] == 0 for u in op.users)


@needs_kernel
def test_gradients_equal_the_unfused_graph(fused_and_unfused):
    """Same seeds, same codes: every weight gradient (an integer GEMM of the codes and a float
    epilogue evaluated the same way) equals the unfused graph's bit for bit. Bias gradients are
    40-row column sums taken in another order: float rounding, at most 40 * 2^-24 of the sum of
    |terms|; 1e-5 relative to the largest entry is well above that."""
    (model, loss), (ref, ref_loss) = fused_and_unfused
    assert torch.equal(loss, ref_loss)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if name.endswith("weight"):
            assert torch.equal(p.grad, q.grad), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5 * q.grad.abs().max().item())


@needs_kernel
def test_another_seed_gives_other_codes():
    """The gradients depend on the draws (the equality above is not vacuous)."""
    a, _ = _train_step(FQTConfig(compiler="eager"), seed=5)
    b, _ = _train_step(FQTConfig(compiler="eager"), seed=6)
    assert not torch.equal(a[0].weight.grad, b[0].weight.grad)


@needs_kernel
def test_a_single_quantizer_is_left_to_inductor():
    """With an exact grad_weight (no Q_b2) each gradient has only Q_b1: nothing to fuse."""
    model, _ = _train_step(FQTConfig(compiler="eager", grad_weight=GradSpec(GradKind.NONE)))
    (rec,) = fqt_compile.records(model)
    assert dict(rec.aten_passes["backward"])["fuse_quantizers"]["fused"] == 0
    assert _count(rec.backward, MULTI) == 0 and _count(rec.backward, SR) == 2


@pytest.mark.parametrize("changes,why", [({"fuse_quantizers": False}, "fuse_quantizers=False"),
                                         ({"lower_int_gemm": False}, "lower_int_gemm=False (simulated graph)")])
def test_skips_say_why(changes, why):
    model, _ = _train_step(FQTConfig(compiler="eager", **changes))
    (rec,) = fqt_compile.records(model)
    res = dict(rec.aten_passes["backward"])["fuse_quantizers"]
    assert res["fused"] == 0 and res["skipped"] == why and _count(rec.backward, MULTI) == 0


def test_kernel_unavailable_skips(monkeypatch):
    monkeypatch.setattr(gelu_quant, "_load", lambda: (None, "off (test)"))
    gm = fx.symbolic_trace(nn.Linear(2, 2))
    res = fuse_quantizers(gm, FQTConfig())
    assert res == {"fused": 0, "kernel": "off (test)", "skipped": "kernel off (test)"}


def _hand_graph(seed_after: bool) -> fx.GraphModule:
    """g = x * 2 read by a row and a column quantizer; the second seed is a new_seed draw after
    g, or (seed_after) a value computed after g from an input, which the pass cannot move."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    s_in = graph.placeholder("s")
    x.meta["val"] = torch.randn(6, 20)
    s_in.meta["val"] = torch.tensor(1, dtype=torch.int64)
    g = graph.call_function(aten.mul.Tensor, (x, 2.0))
    g.meta["val"] = x.meta["val"] * 2
    s1 = graph.call_function(NEW_SEED, (torch.device("cpu"),))
    s2 = graph.call_function(aten.add.Tensor, (s_in, 1)) if seed_after else graph.call_function(NEW_SEED, (torch.device("cpu"),))
    outs = []
    for sd, gran in ((s1, "row"), (s2, "column")):
        sd.meta["val"] = torch.tensor(1, dtype=torch.int64)
        q = graph.call_function(SR, (g, sd, 8, gran))
        q.meta["val"] = torch.ops.fqt.sr_quantize(g.meta["val"], sd.meta["val"], 8, gran)
        for i in range(3):
            o = graph.call_function(operator.getitem, (q, i))
            o.meta["val"] = q.meta["val"][i]
            outs.append(o)
    graph.output(tuple(outs))
    return fx.GraphModule(nn.Module(), graph)


@needs_kernel
@pytest.mark.parametrize("seed_after", [False, True])
def test_hand_built_graph(seed_after):
    """Fused where both seeds are draws (the op's results equal the quantizers' on the same
    seeds); left exactly as it was where a seed is not a movable draw."""
    gm = _hand_graph(seed_after)
    before = gm.code
    x, s = torch.randn(6, 20), torch.tensor(3, dtype=torch.int64)
    torch.manual_seed(0)
    ref = gm(x, s)
    res = fuse_quantizers(gm, FQTConfig())
    if seed_after:
        assert res["fused"] == 0 and gm.code == before
        return
    assert res["fused"] == 1 and _count(gm, MULTI) == 1 and _count(gm, SR) == 0
    torch.manual_seed(0)
    out = gm(x, s)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@needs_kernel
def test_dynamic_batch_runs_at_other_batch_sizes():
    model = _mlp()
    fqt_compile.compile(model, FQTConfig(compiler="eager"), dynamic=True)
    for n in (24, 40):
        model(torch.randn(n, 32)).square().mean().backward()
    rec = fqt_compile.records(model)[-1]
    assert _count(rec.backward, MULTI) == 2


@needs_kernel
def test_inspection_report_counts_the_fused_ops(fused_and_unfused):
    x = torch.randn(40, 32)
    fused = inspect(_mlp(), x, FQTConfig(compiler="eager"))
    unfused = inspect(_mlp(), x, FQTConfig(compiler="eager", fuse_quantizers=False))
    assert fused.totals["fused_quantizers"] == 2 and unfused.totals["fused_quantizers"] == 0
    assert fused.totals["stochastic_quantizers"] == unfused.totals["stochastic_quantizers"] == 5
    assert fused.totals["seeds"] == 5
    (line,) = [ln for ln in fused.format().splitlines() if ln.startswith("Fused kernels:")]
    assert "2 gradient's stochastic quantizers + column sums (fqt::sr_quantize_multi)" in line


def _lone_quantizer_graph() -> fx.GraphModule:
    """Four lone row quantizers: of the input x (in memory), of x * 2 (elementwise: inductor
    fuses the quantizer into it), of x @ w (a GEMM's output) and of a contiguous view of it."""
    graph = fx.Graph()
    x, w, s = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("s")
    x.meta["val"], w.meta["val"] = torch.randn(32, 24), torch.randn(24, 40)
    s.meta["val"] = torch.tensor(1, dtype=torch.int64)

    def call(target, *args):
        n = graph.call_function(target, args)
        n.meta["val"] = target(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
        return n

    mm = call(aten.mm.default, x, w)
    outs = []
    for i, g in enumerate((x, call(aten.mul.Tensor, x, 2.0), mm, call(aten.view.default, mm, [64, 20]))):
        q = call(SR, g, call(aten.add.Tensor, s, i), 8, "row")
        outs += [call(operator.getitem, q, k) for k in range(3)]
    graph.output(tuple(outs))
    return fx.GraphModule(nn.Module(), graph)


@needs_kernel
@needs_inductor_torch  # torch 2.5's inductor rounds some scales differently in the last bit (test_decompose_fqt.py)
def test_a_lone_quantizer_of_a_tensor_in_memory_runs_the_c_kernel():
    """fuse_quantizers marks the quantizers whose input inductor reads from memory anyway (an
    input, a GEMM's output, a contiguous view of it); decompose_fqt leaves those calls of the
    op's C kernel and inlines the other; inductor's compiled graph gives the reference's codes,
    scales and offsets bit for bit."""
    from torch._inductor.compile_fx import compile_fx_inner

    from fqt_compile.passes.decompose_fqt import C_KERNEL, decompose_fqt

    gm = _lone_quantizer_graph()
    res = fuse_quantizers(gm, FQTConfig())
    assert res["fused"] == 0 and res["c_kernel"] == 3
    marked = [bool(n.meta.get(C_KERNEL)) for n in gm.graph.nodes if n.target is SR]
    assert marked == [True, False, True, True]
    inlined, counts = decompose_fqt(gm)
    assert counts == {"sr_quantize_c_kernel": 3, "sr_quantize": 1} and _count(inlined, SR) == 3
    args = [torch.randn(32, 24) * torch.logspace(-2, 1, 24), torch.randn(24, 40), torch.tensor(2**40 + 7)]
    compiled = compile_fx_inner(inlined, args)
    ref = _lone_quantizer_graph()
    for a, b in zip(ref(*args), compiled(args)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_kernel
def test_the_incoming_gradient_of_a_compiled_module_is_quantized_by_the_c_kernel(monkeypatch):
    """The loss computed outside the compiled module: the last layer's output gradient is a
    graph input. With an exact grad_weight it has one quantizer (Q_b1), left to the C kernel;
    the report counts it. The gradients equal a step's whose fqt::sr_quantize runs the Python
    reference (kernel off)."""
    cfg = FQTConfig(compiler="eager", grad_weight=GradSpec(GradKind.NONE))
    model, _ = _train_step(cfg)
    with monkeypatch.context() as m:
        m.setattr(gelu_quant, "sr_quantize_kernel", lambda *args: None)
        ref, _ = _train_step(cfg)
    (rec,) = fqt_compile.records(model)
    assert dict(rec.aten_passes["backward"])["fuse_quantizers"]["c_kernel"] == 1
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    report = inspect(_mlp(), torch.randn(40, 32), cfg)
    assert report.totals["c_kernel_quantizers"] == 1
    assert any(ln.startswith("C quantize kernels: 1 stochastic") for ln in report.format().splitlines())
