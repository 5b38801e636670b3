"""passes/fuse_softmax.py: which softmax + quantizer patterns become the fused ops, in both graph
forms (aten ops of the eager inner compiler, inductor's decomposition), what the fused graphs
compute, and where the pass stays out."""

from __future__ import annotations

import operator

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


def _rewritten_softmax(s, scale, generation, dim=-1):
    """softmax(s * scale) as inductor's joint-graph pass ``mul_softmax_pattern`` rewrites it
    before fuse_softmax sees the graph (torch/_inductor/fx_passes/joint_graph.py), written out:
    up to torch 2.12 ``exp((y - amax(y)) * scale)`` with ``y = s * 1``; from 2.13 on a ``where``
    between that and the plain form of ``s * scale``, on whether a row is finite."""
    y = s * 1
    stable = (y - torch.amax(y, dim, True)) * scale
    if generation == "2.13":
        x = s * scale
        stable = torch.where(torch.all(torch.isfinite(x), dim, True), stable, x - torch.amax(x, dim, True))
    e = torch.exp(stable)
    return e / torch.sum(e, dim, True)


@pytest.mark.parametrize("generation", ["2.5", "2.13"])
@pytest.mark.parametrize("dim,expected", [(-1, True), (1, False)])
def test_scaled_softmax_as_inductor_rewrites_it_is_matched(generation, dim, expected):
    """Attention scores without a mask reach softmax as ``s * scale``, which inductor rewrites
    (both generations of the rewrite): the pass sees softmax(s * scale), ``(s, scale)``; found
    because an unmasked attention's forward softmax was never fused under inductor."""
    gm = _traced(lambda t: _rewritten_softmax(t, 0.25, generation, dim), torch.randn(2, 3, 5))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    got = _softmax_input(_output(gm))
    if not expected:
        assert got is None
    elif generation == "2.5":
        (y, k) = got
        assert y.target is aten.mul.Tensor and y.args == (placeholder, 1) and k == 0.25
    else:
        assert got.target is aten.mul.Tensor and got.args == (placeholder, 0.25)


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("dim,expected", [(-1, True), (1, False)])
def test_softmax_backward_patterns(decompose, dim, expected):
    g, p = torch.randn(2, 3, 5), torch.softmax(torch.randn(2, 3, 5), -1)
    gm = _traced(lambda a, b: aten._softmax_backward_data(a, b, dim, torch.float32), g, p, decompose=decompose)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert (_softmax_backward_args(_output(gm)) == (ph[0], ph[1])) is expected, gm.code


def _block_grads(compiler, seed=0, dropout=0.0, **cfg):
    torch.manual_seed(seed)
    m = TransformerBlock(32, 4, dropout=dropout)
    x = torch.randn(2, 64, 32)
    # fuse_quantizers off: the fuse_softmax=False graphs compared against keep their stochastic
    # quantizers as fqt::sr_quantize nodes (tests/test_fuse_quantizers.py); attention saved
    # unless a test asks for sdpa="recompute" (the default), which the tests compare against it
    fqt_compile.compile(m, FQTConfig(compiler=compiler, **{"fuse_quantizers": False, "sdpa": "decompose", **cfg}))
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
@pytest.mark.parametrize("sdpa", ["decompose", "recompute"])
def test_inspection_report_counts_the_fused_kernels_and_their_quantizers(sdpa):
    # the recompute policy (the default) runs the forward softmax kernel again in the backward
    forward = 1 + (sdpa == "recompute")
    cfg = FQTConfig(compiler="eager", sdpa=sdpa)
    torch.manual_seed(0)
    report = inspect(TransformerBlock(32, 4), torch.randn(2, 16, 32), cfg)
    t = report.totals
    assert t["fused_softmax"] == forward and t["fused_softmax_backward"] == 1
    assert t["stochastic_quantizers"] == t["seeds"] > 2  # the fused op's two quantizers counted
    assert f"Fused kernels: {forward} softmax + quantizer of its output" in report.format()
    assert t["fused_softmax_dropout"] == 0 and "dropout" not in report.format()
    torch.manual_seed(0)
    report = inspect(TransformerBlock(32, 4, dropout=0.1), torch.randn(2, 16, 32), cfg)
    assert report.totals["fused_softmax_dropout"] == forward + 1  # forward kernel(s) and backward kernel
    assert f"{forward + 1} of the softmax kernels draw the attention dropout's mask inside" in report.format()


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
def test_recompute_policy_is_fused_forward_recompute_and_backward():
    """sdpa='recompute' with the fused kernels available: insert_qdq keeps the mask as an added
    bias (masked_fill's backward would zero the masked entries after softmax's backward, a
    pattern the pass does not fuse), so the forward softmax, its recomputation in the backward
    and softmax's backward are all fused; the recomputed probabilities are the forward's (the
    same kernel on the same int32 scores), so output and gradients equal the decompose policy's
    bit for bit."""
    y_d, g_d, _ = _block_grads("eager")
    y_r, g_r, rec = _block_grads("eager", sdpa="recompute")
    (call,) = [n for n in rec.torch_graph.graph.nodes if n.target is fqt_compile.functional.fqt_sdpa]
    assert call.kwargs["mask_as_bias"] is True
    assert _pass_result(rec, "forward")["fused"] == 1
    res = _pass_result(rec, "backward")
    assert res["fused"] == 1 and res["fused_backward"] == 1  # the recomputed forward + the backward
    assert _count(rec.backward, FWD) == 1 and _count(rec.backward, BWD) == 1
    assert torch.equal(y_d, y_r)
    for n in g_d:
        assert torch.equal(g_d[n], g_r[n]), n


@needs_kernel
def test_attention_dropout_is_drawn_inside_both_kernels():
    """Attention dropout (fqt::dropout on P, and on dP in the backward) goes into the fused ops:
    the forward kernel quantizes dropout(P) and returns P for the backward, the backward kernel
    drops dP out before softmax's backward; no fqt::dropout node is left, and the seed the
    forward draws is the one the backward reads. The step equals the unfused graphs' to the
    tolerance above (same seeds, drawn in the same order), and sdpa="recompute" recomputes the
    same mask: output and gradients bit for bit the fused decompose policy's."""
    drop = torch.ops.fqt.dropout.default
    y_u, g_u, rec_u = _block_grads("eager", dropout=0.2, fuse_softmax=False)
    y_f, g_f, rec = _block_grads("eager", dropout=0.2)
    assert _count(rec_u.forward, drop) == 1 and _count(rec_u.backward, drop) == 1
    assert _count(rec.forward, drop) == 0 and _count(rec.backward, drop) == 0
    (fwd,) = [n for n in rec.forward.graph.nodes if n.target is FWD]
    (bwd,) = [n for n in rec.backward.graph.nodes if n.target is BWD]
    seed = fwd.args[7]
    assert seed.target is torch.ops.fqt.new_seed.default and fwd.args[8] == 0.2
    assert bwd.args[8].op == "placeholder" and bwd.args[9] == 0.2 and bwd.args[0].meta["val"].dtype == torch.int32
    fwd_out = next(n for n in rec.forward.graph.nodes if n.op == "output").args[0]
    assert seed in fwd_out  # saved for the backward
    _assert_close_grads({"y": y_u, **g_u}, {"y": y_f, **g_f})
    y_r, g_r, rec_r = _block_grads("eager", dropout=0.2, sdpa="recompute")
    assert _pass_result(rec_r, "backward")["fused"] == 1 and _count(rec_r.backward, drop) == 0
    assert torch.equal(y_f, y_r)
    for n in g_f:
        assert torch.equal(g_f[n], g_r[n]), n


@needs_kernel
@pytest.mark.parametrize("shape,fused", [((2, 4, 64, 64), True), ((8, 16, 4096, 4096), False)])
def test_dropout_fuses_below_2_31_elements_only(shape, fused):
    """The kernels draw the dropout mask at 32-bit flat indices: attention probabilities of
    2**31 elements or more (8 x 16 heads at 4096 tokens) keep fqt::dropout, which draws at
    64-bit ones, and so the unfused softmax and quantizer around it (shapes traced with fake
    tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fqt_compile.passes.fuse_softmax import fuse_softmax

    def fn(x, seed):
        a = torch.ops.fqt.dropout(torch.softmax(x, -1), seed, 0.1)
        return torch.ops.fqt.quantize(a, 8, "affine_zero", "tensor", -1)

    with FakeTensorMode():
        args = (torch.empty(shape), torch.empty((), dtype=torch.int64))
        gm = make_fx(fn)(*args)
    assert fuse_softmax(gm, FQTConfig())["fused"] == int(fused)
    assert _count(gm, FWD) == int(fused) and _count(gm, torch.ops.fqt.dropout.default) == int(not fused)
    if fused:
        (node,) = [n for n in gm.graph.nodes if n.target is FWD]
        assert node.args[8] == 0.1


@needs_kernel
@needs_inductor_torch
def test_inductor_graphs_are_fused_from_the_decomposed_softmax():
    """Inductor's tracing decomposes softmax and its backward: the pass matches those forms too,
    and the compiled step agrees with the eager-compiled fused step."""
    y_e, g_e, _ = _block_grads("eager")
    y_i, g_i, rec = _block_grads("inductor")
    assert _pass_result(rec, "forward")["fused"] == 1 and _pass_result(rec, "backward")["fused_backward"] == 1
    assert _count(rec.forward, aten.exp.default) == 0  # the softmax is gone from the graph
    # both fused ops read int32 products (QK^T and dP) with their epilogue terms instead of float
    # scores / gradients; the forward one also takes the 1/sqrt(d) scale and the causal mask
    (fwd,) = [n for n in rec.forward.graph.nodes if n.target is FWD]
    (bwd,) = [n for n in rec.backward.graph.nodes if n.target is BWD]
    for op, rows in ((fwd, fwd.args[5]), (bwd, bwd.args[6])):
        assert op.args[0].meta["val"].dtype == torch.int32 and 1 <= len(rows) <= 4
    assert fwd.args[3] == pytest.approx(8 ** -0.5) and fwd.args[4] is not None  # head dim 32 / 4
    mask = fwd.args[4].meta["val"]
    assert tuple(mask.shape)[-2:] == (64, 64) and mask.dtype == torch.float32
    _assert_close_grads({"y": y_e, **g_e}, {"y": y_i, **g_i})


class _UnmaskedAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (z.reshape(b, t, 4, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e))


@needs_kernel
@needs_inductor_torch
def test_unmasked_attention_is_fused_under_inductor():
    """Without a mask the scores reach softmax as ``s * scale``, which inductor's joint-graph
    pass rewrites before ours run: the forward softmax was left unfused under inductor (fused
    under the eager inner compiler). Now the fused op takes the int32 scores and the scale as
    with a mask, and the step agrees with the eager-compiled one."""
    results = []
    for compiler in ("eager", "inductor"):
        torch.manual_seed(0)
        m, x = _UnmaskedAttention(), torch.randn(2, 16, 32)
        fqt_compile.compile(m, FQTConfig(compiler=compiler, sdpa="decompose", fuse_quantizers=False))
        torch.manual_seed(1)
        y = m(x)
        y.square().mean().backward()
        rec = fqt_compile.records(m)[0]
        assert _pass_result(rec, "forward")["fused"] == 1, compiler
        (fwd,) = [n for n in rec.forward.graph.nodes if n.target is FWD]
        assert fwd.args[0].meta["val"].dtype == torch.int32 and fwd.args[3] == pytest.approx(8 ** -0.5)
        assert _count(rec.forward, aten.exp.default) == 0
        results.append({"y": y.detach(), **{n: p.grad.clone() for n, p in m.named_parameters()}})
        torch._dynamo.reset()
    _assert_close_grads(*results)


@needs_kernel
def test_dynamic_batch_graphs_are_fused_and_run_at_other_batch_sizes():
    """dynamic=True: the fused ops whose outputs need a view back to their readers' shape only
    take that form where the view can be written (a raw symbolic size in a graph argument does
    not run: found by tests/test_export.py, fqt_compile.passes.fused_sr.view_shape); otherwise
    they take the float input. Both softmax kernels and both GELU kernels are in the graph, and
    steps at two other batch sizes run."""
    torch.manual_seed(0)
    m = TransformerBlock(32, 4)
    fqt_compile.compile(m, FQTConfig(compiler="eager"), dynamic=True)
    for b in (2, 3, 5):
        m(torch.randn(b, 64, 32)).square().mean().backward()
    (rec,) = [r for r in fqt_compile.records(m) if r.backward is not None and _count(r.forward, FWD)]
    assert rec.forward.graph.find_nodes(op="placeholder")  # sanity: a real graph
    assert _count(rec.forward, FWD) == 1 and _count(rec.backward, BWD) == 1
    assert _count(rec.forward, torch.ops.fqt.gelu_quantize.default) == 1
    assert _count(rec.backward, torch.ops.fqt.gelu_backward_sr_quantize.default) == 1
    # batch and sequence are both symbolic here (dynamic=True): a view could not give the op's
    # (B H, L, L) outputs back their (B, H, L, L) shape, so the softmax op reads the float scores
    # (_absorb_scores declines), and the GELU op reads h = x + bias whole (not x and the bias)
    (fwd,) = [n for n in rec.forward.graph.nodes if n.target is FWD]
    assert fwd.args[0].meta["val"].dtype == torch.float32 and fwd.args[5] == []
    (gelu,) = [n for n in rec.forward.graph.nodes if n.target is torch.ops.fqt.gelu_quantize.default]
    assert gelu.args[1] is None


@needs_kernel
def test_symbolic_batch_only_keeps_the_int32_forms_with_views_of_minus_one():
    """Only the batch symbolic (torch._dynamo.mark_dynamic on dim 0): the softmax op reads the
    QK^T int32 product and its outputs are viewed back with -1 for the batch; the GELU op takes
    x and the bias apart, its codes viewed back likewise."""
    torch.manual_seed(0)
    m = TransformerBlock(32, 4)
    fqt_compile.compile(m, FQTConfig(compiler="eager"))
    for b in (2, 3):
        x = torch.randn(b, 64, 32)
        torch._dynamo.mark_dynamic(x, 0)
        m(x).square().mean().backward()
    (rec,) = [r for r in fqt_compile.records(m) if r.backward is not None and _count(r.forward, FWD)]
    (fwd,) = [n for n in rec.forward.graph.nodes if n.target is FWD]
    assert fwd.args[0].meta["val"].dtype == torch.int32
    views = [n for n in rec.forward.graph.nodes if n.target is aten.view.default and n.args[0].target is operator.getitem
             and n.args[0].args[0].target is FWD]
    assert len(views) == 2 and all(v.args[1][0] == -1 and all(isinstance(d, int) for d in v.args[1]) for v in views)
    (gelu,) = [n for n in rec.forward.graph.nodes if n.target is torch.ops.fqt.gelu_quantize.default]
    assert gelu.args[1] is not None


class _MaskedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, 2, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (1, 8, 8), (8, 8)])
def test_a_mask_with_leading_ones_is_fused(shape):
    """A float mask of shape (1, 1, Lq, L) or (1, Lq, L) on 4-D scores: the fused kernel gets
    it as (Lq, L) (the lowered product is (B H, Lq, L)). It failed at run time before the
    twentieth session ("mask (1, 1, 5, 5) must broadcast ..."); now the step is the unfused
    one to the tolerance above."""
    x, mask = torch.randn(2, 8, 16), torch.randn(shape)
    out = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        m = _MaskedAttention()
        fqt_compile.compile(m, FQTConfig(compiler="eager", sdpa="decompose", fuse_softmax=fuse, fuse_quantizers=False))
        torch.manual_seed(1)
        y = m(x, mask)
        y.square().mean().backward()
        out[fuse] = {"y": y.detach(), **{n: p.grad for n, p in m.named_parameters()}}
        rec = fqt_compile.records(m)[0]
        assert _count(rec.forward, FWD) == (1 if fuse else 0)
    _assert_close_grads(out[False], out[True])


@needs_kernel
def test_dropped_probabilities_with_other_readers_are_fused():
    """nn.MultiheadAttention returning its weights, with attention dropout: the dropped
    probabilities are read by the quantized P @ V and by the returned weights. The softmax and
    its quantizer are fused all the same (they were not: the pass wanted the dropout read by the
    quantizer only), the dropout stays for the weights on the fused op's P (the same
    counter-based mask), and the step agrees with the unfused one (same seeds)."""
    results, graphs = [], []
    for fuse in (True, False):
        torch.manual_seed(0)
        m = torch.nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True)
        fqt_compile.compile(m, FQTConfig(compiler="eager", fuse_softmax=fuse, fuse_quantizers=False))
        x = torch.randn(2, 16, 32)
        torch.manual_seed(1)
        out, w = m(x, x, x)
        (out.square().mean() + w.square().sum()).backward()
        results.append({"out": out.detach(), "w": w.detach(), **{n: p.grad.clone() for n, p in m.named_parameters()}})
        graphs.append(fqt_compile.records(m)[0])
        torch._dynamo.reset()
    rec = graphs[0]
    assert _pass_result(rec, "forward")["fused"] == 1
    (fwd,) = [n for n in rec.forward.graph.nodes if n.target is FWD]
    assert fwd.args[8] == 0.2  # the dropout is in the kernel
    (drop,) = [n for n in rec.forward.graph.nodes if n.target is torch.ops.fqt.dropout.default]
    src = drop.args[0]
    while src.target is not FWD:  # the op's P, through its getitem and a view back to (B, H, L, S)
        assert src.target in (operator.getitem, aten.view.default), src.target
        src = src.args[0]
    assert src is fwd and drop.args[1] is fwd.args[7]  # with the op's seed
    # the same mask: the kernel's P equals torch's softmax to float rounding (its own exp)
    torch.testing.assert_close(results[0]["w"], results[1]["w"], rtol=1e-5, atol=1e-7)
    _assert_close_grads(results[1], results[0])
