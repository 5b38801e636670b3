"""passes/fuse_softmax.py: which softmax + quantizer patterns become the fused ops, in both graph
forms (aten ops of the eager inner compiler, inductor's decomposition), what the fused graphs
compute, and where the pass stays out."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile
from fqt_compile import FQTConfig, softmax_quant
from fqt_compile.inspect import inspect
from fqt_compile.models import TransformerBlock
from fqt_compile.passes.fuse_softmax import _softmax_backward_args, _softmax_input

from conftest import needs_inductor_torch

needs_kernel = pytest.mark.skipif(not softmax_quant.available(), reason=f"fused softmax kernel {softmax_quant.status()}")

aten = torch.ops.aten
FWD, BWD = torch.ops.fqt.softmax_quantize.default, torch.ops.fqt.softmax_backward_sr_quantize.default


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def _traced(fn, *args, decompose=False):
    """``fn`` as an aten graph; ``decompose``: with inductor's decompositions of softmax and its
    backward (what the backend's inductor path traces with)."""
    table = None
    if decompose:
        from torch._inductor.decomposition import select_decomp_table

        full = select_decomp_table()
        table = {op: full[op] for op in (aten._softmax.default, aten._softmax_backward_data.default)}
    return make_fx(fn, decomposition_table=table)(*args)


def _output(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("dim,expected", [(-1, True), (2, True), (1, False)])
def test_softmax_patterns_match_the_last_dimension_only(decompose, dim, expected):
    gm = _traced(lambda t: torch.softmax(t, dim), torch.randn(2, 3, 5), decompose=decompose)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert (_softmax_input(_output(gm)) is placeholder) is expected, gm.code


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("dim,expected", [(-1, True), (1, False)])
def test_softmax_backward_patterns(decompose, dim, expected):
    g, p = torch.randn(2, 3, 5), torch.softmax(torch.randn(2, 3, 5), -1)
    gm = _traced(lambda a, b: aten._softmax_backward_data(a, b, dim, torch.float32), g, p, decompose=decompose)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert (_softmax_backward_args(_output(gm)) == (ph[0], ph[1])) is expected, gm.code


def _block_grads(compiler, seed=0, **cfg):
    torch.manual_seed(seed)
    m = TransformerBlock(32, 4)
    x = torch.randn(2, 64, 32)
    fqt_compile.compile(m, FQTConfig(compiler=compiler, **cfg))
    torch.manual_seed(1)
    y = m(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, fqt_compile.records(m)[0]


def _pass_result(rec, kind):
    return dict(rec.aten_passes[kind])["fuse_softmax"]


def _assert_close_grads(g_a, g_b):
    """Fused vs unfused graphs (or inductor vs eager): the same quantizers with the same seeds
    (the pass keeps the order of seed draws), on values that differ by float rounding only, so
    a code differs only where a value sits within rounding error of a level boundary, and then
    by one level. Tolerance: 2e-2 of each tensor's largest entry (measured differences below
    it); a change of seeds fails it (test_a_different_seed_is_outside_the_tolerance)."""
    for n in g_a:
        scale = g_a[n].abs().max().item()
        torch.testing.assert_close(g_b[n], g_a[n], rtol=0, atol=2e-2 * scale, msg=n)


@needs_kernel
def test_eager_graphs_are_fused_and_compute_the_same_step():
    y_u, g_u, rec_u = _block_grads("eager", fuse_softmax=False)
    y_f, g_f, rec_f = _block_grads("eager")
    assert _pass_result(rec_u, "forward")["skipped"] == "fuse_softmax=False"
    assert _pass_result(rec_f, "forward")["fused"] == 1 and _pass_result(rec_f, "backward")["fused_backward"] == 1
    assert _count(rec_f.forward, FWD) == 1 and _count(rec_f.forward, aten._softmax.default) == 0
    assert _count(rec_f.backward, BWD) == 1 and _count(rec_f.backward, aten._softmax_backward_data.default) == 0
    (bwd,) = [n for n in rec_f.backward.graph.nodes if n.target is BWD]
    assert bwd.args[3] and bwd.args[4] == [8, 8] and bwd.args[5] == "row,column"  # Q_b1 = PSQ, Q_b2 = column
    # every other stochastic quantizer of the backward is still an sr_quantize node
    sr = torch.ops.fqt.sr_quantize.default
    assert _count(rec_u.backward, sr) == _count(rec_f.backward, sr) + 2
    _assert_close_grads({"y": y_u, **g_u}, {"y": y_f, **g_f})


@needs_kernel
def test_a_different_seed_is_outside_the_tolerance():
    """The check of the tolerance above: the same fused step with other seeds fails it."""
    _, g_a, _ = _block_grads("eager")
    torch.manual_seed(0)
    m = TransformerBlock(32, 4)
    x = torch.randn(2, 64, 32)
    fqt_compile.compile(m, FQTConfig(compiler="eager"))
    torch.manual_seed(2)
    m(x).square().mean().backward()
    with pytest.raises(AssertionError):
        _assert_close_grads(g_a, {n: p.grad for n, p in m.named_parameters()})


@needs_kernel
def test_inspection_report_counts_the_fused_kernels_and_their_quantizers():
    torch.manual_seed(0)
    report = inspect(TransformerBlock(32, 4), torch.randn(2, 16, 32), FQTConfig(compiler="eager"))
    t = report.totals
    assert t["fused_softmax"] == 1 and t["fused_softmax_backward"] == 1
    assert t["stochastic_quantizers"] == t["seeds"] > 2  # the fused op's two quantizers counted
    assert "Fused kernels: 1 softmax + quantizer of its output" in report.format()


@needs_kernel
def test_bhq_gradient_keeps_its_own_quantizer_and_fuses_the_column_one():
    """With Q_b1 = BHQ the softmax gradient also feeds the BHQ transform: the fused op fuses the
    column quantizer (Q_b2) and hands its ds to the BHQ nodes, which come after it."""
    y_f, g_f, rec = _block_grads("eager", grad_input=fqt_compile.GradSpec("bhq", 5))
    (bwd,) = [n for n in rec.backward.graph.nodes if n.target is BWD]
    assert bwd.args[5] == "column"
    assert any(u.args[1] == 0 for u in bwd.users)  # ds used (by the BHQ transform)
    for g in g_f.values():
        assert torch.isfinite(g).all()


def test_pass_stays_out_of_simulated_graphs():
    _, _, rec = _block_grads("eager", lower_int_gemm=False)
    res = _pass_result(rec, "forward")
    assert res["fused"] == 0 and "simulated" in res["skipped"]
    assert _count(rec.forward, FWD) == 0


@needs_kernel
def test_recompute_backward_keeps_aten_softmax_backward():
    """sdpa='recompute' masks with masked_fill: its backward zeroes the masked entries after
    softmax's backward, a pattern the pass does not fuse; the recomputed forward softmax is fused."""
    _, _, rec = _block_grads("eager", sdpa="recompute")
    res = _pass_result(rec, "backward")
    assert res["fused"] == 1 and res["fused_backward"] == 0


@needs_kernel
@needs_inductor_torch
def test_inductor_graphs_are_fused_from_the_decomposed_softmax():
    """Inductor's tracing decomposes softmax and its backward: the pass matches those forms too,
    and the compiled step agrees with the eager-compiled fused step."""
    y_e, g_e, _ = _block_grads("eager")
    y_i, g_i, rec = _block_grads("inductor")
    assert _pass_result(rec, "forward")["fused"] == 1 and _pass_result(rec, "backward")["fused_backward"] == 1
    assert _count(rec.forward, aten.exp.default) == 0  # the softmax is gone from the graph
    _assert_close_grads({"y": y_e, **g_e}, {"y": y_i, **g_i})
