"""passes.decompose_fqt: the inlined aten form computes exactly what the fqt ops compute."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile  # noqa: F401  (registers the ops)
from fqt_compile.passes.decompose_fqt import decompose_fqt
from conftest import needs_inductor_torch

fqt = torch.ops.fqt


def _program(x, g, seed):
    outs = []
    for scheme in ("affine", "affine_zero", "symmetric"):
        for bits in (4, 8):
            c, s, o = fqt.quantize(x, bits, scheme, "tensor", 0)
            outs += [c, s, o, fqt.dequantize(c, s, o, torch.float32)]
    for gran in ("tensor", "row", "column"):
        for bits in (2, 5, 8):
            c, s, o = fqt.sr_quantize(g, seed, bits, gran)
            outs += [c, s, o, fqt.dequantize(c, s, o, torch.bfloat16)]
    return outs


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_inlined_graph_is_exactly_the_op_library(tracing_mode):
    torch.manual_seed(0)
    x = torch.randn(7, 5) * 3
    g = torch.randn(33, 19) * torch.logspace(-3, 1, 33)[:, None]
    g[3] = 0.25  # a constant row: scale 0, the value comes back exactly
    g[5] = 0.0
    seed = torch.tensor(123456789012345, dtype=torch.int64)
    gm = make_fx(_program, tracing_mode=tracing_mode)(x, g, seed)
    fused, counts = decompose_fqt(gm)
    assert counts == {"quantize": 6, "dequantize": 15, "sr_quantize": 9}
    # only the generator's column index stays an fqt op: on the CPU with a static size below
    # 2**31 elements (rng's fqt::column_index: a loaded index vector, not a built one)
    left = [str(n.target) for n in fused.graph.nodes if str(n.target).startswith("fqt.")]
    assert left == (["fqt.column_index.default"] * 9 if tracing_mode == "fake" else [])
    for a, b in zip(gm(x, g, seed), fused(x, g, seed)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    assert torch.zeros(()) in fused(torch.zeros(4, 4), g, seed)[1]  # all-zero input: scale 0
    # a symbolic graph stays symbolic: other shapes run
    if tracing_mode == "symbolic":
        x2, g2 = torch.randn(4, 9), torch.randn(12, 3)
        for a, b in zip(gm(x2, g2, seed), fused(x2, g2, seed)):
            assert torch.equal(a, b)


def test_column_ranges_reduce_in_row_blocks_with_the_same_result():
    # Emitter.column_minmax: (N, D) -> (N/16, 16, D) -> min over the block, then over blocks;
    # exact (min/max do not round). Not used for an N that 16 does not divide, a symbolic N
    # or a non-contiguous operand (covered by the test above with N = 33).
    from fqt_compile.passes.decompose_fqt import COLUMN_BLOCK

    g = torch.randn(64, 19) * torch.logspace(-3, 1, 19)
    g[:, 4] = 0.5  # a constant column: scale 0
    seed = torch.tensor(77)
    for make in (lambda t: t, lambda t: t.t().contiguous().t()):  # contiguous, then strided
        gg = make(g)
        gm = make_fx(lambda t, s: fqt.sr_quantize(t, s, 8, "column"), tracing_mode="fake")(gg, seed)
        fused, _ = decompose_fqt(gm)
        views = [n for n in fused.graph.nodes if n.target == torch.ops.aten.view.default]
        assert len(views) == (1 if gg.is_contiguous() else 0)
        if views:
            assert list(views[0].args[1]) == [64 // COLUMN_BLOCK, COLUMN_BLOCK, 19]
        for a, b in zip(gm(gg, seed), fused(gg, seed)):
            assert torch.equal(a, b)


def _without_lowering(gm) -> set[str]:
    """The call targets of ``gm`` inductor has no lowering for, other than getitem,
    ``fqt::column_index``, ``fqt::mm_int8`` and ``fqt::conv_int8`` (a lowered convolution's
    GEMM: im2col's, or the direct one on VNNI/AMX CPUs), which run as extern calls (custom ops without a decomposition; the fallback of each enters
    ``lowerings`` once inductor has compiled a graph holding it)."""
    from torch._inductor.lowering import lowerings

    return {
        str(n.target) for n in gm.graph.nodes
        if n.op == "call_function" and n.target not in lowerings and "getitem" not in str(n.target)
        and n.target not in (fqt.column_index.default, fqt.mm_int8.default, fqt.conv_int8.default)
    }  # fmt: skip


def test_every_emitted_op_has_an_inductor_lowering():
    """Inductor refuses ops that it would have decomposed but has no lowering for (it asserts
    'both a fallback and a decomp'); everything decompose_fqt emits must lower directly."""
    for mode in ("symbolic", "fake"):
        gm = make_fx(_program, tracing_mode=mode)(torch.randn(7, 5), torch.randn(9, 4), torch.tensor(3))
        fused, _ = decompose_fqt(gm)
        missing = _without_lowering(fused)
        assert not missing, missing


def _sr_program(g, h, seed):
    return [t for x in (g, h) for gran in ("tensor", "row", "column") for bits in (4, 8)
            for t in fqt.sr_quantize(x, seed, bits, gran)]  # fmt: skip


@needs_inductor_torch
@pytest.mark.parametrize("simdlen", [None, 1], ids=["vectorized", "scalar"])
def test_inductor_code_quantizes_exactly_like_the_op_library(simdlen):
    """Inductor's C++ for the inlined stochastic quantizers gives the op library's codes,
    scales and offsets bit for bit, with its vector code and with scalar code only
    (``cpp.simdlen=1``). Scalar code matters twice: it writes the generator's wrapping int32
    multiplies as signed C++ multiplies (overflow is undefined behaviour; the vector
    intrinsics wrap), and it computes ranges and scales in another order. On torch 2.5 these
    inputs (g drawn after a (2, 100) draw) gave a column scale that differed in the last bit
    and with it one code (126 for 127, g[31, 4], 8 bits per-column), in both code generators;
    with torch 2.11, 2.13 and 2.15 everything matched (why the backend needs MIN_INDUCTOR_TORCH)."""
    from torch._inductor.compile_fx import compile_fx_inner

    torch.manual_seed(0)
    torch.randn(2, 100)
    g = torch.randn(33, 19) * torch.logspace(-3, 1, 33)[:, None]
    h = torch.randn(7, 1000)  # rows longer than a vector, with a tail of 8
    seed = torch.tensor(2**40 + 17, dtype=torch.int64)
    gm = make_fx(_sr_program, tracing_mode="fake")(g, h, seed)
    fused, _ = decompose_fqt(gm)
    assert sum(n.target is fqt.column_index.default for n in fused.graph.nodes) == 12
    with torch._inductor.config.patch({"cpp.simdlen": simdlen}):
        compiled = compile_fx_inner(fused, [g, h, seed])
    for a, b in zip(_sr_program(g, h, seed), compiled([g, h, seed])):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _conv_program(x, w, g, seed):
    """The three conv GEMM ops on codes (stride 2, padding 1): left simulated, decompose_fqt
    writes each as dequantize + the float convolution."""
    conv = ([2, 2], [1, 1], [1, 1], 1)
    xc = fqt.quantize(x, 8, "affine_zero", "tensor", 0)
    wc = fqt.quantize(w, 8, "affine_zero", "tensor", 0)
    gc, gs, go = fqt.sr_quantize(g.reshape(g.shape[0], -1), seed, 8, "row")  # PSQ, for grad_input
    gq = (gc.reshape(g.shape), gs.reshape(-1, 1, 1, 1), go.reshape(-1, 1, 1, 1))
    tc, ts, to = fqt.sr_quantize(g.reshape(g.shape[0], -1), seed, 8, "tensor")  # PTQ, for grad_weight
    return [
        fqt.qconv(*xc, *wc, 8, 8, *conv, "m:output"),
        fqt.qconv_grad_input(*gq, *wc, 8, 8, list(x.shape), *conv, "m:grad_input"),
        fqt.qconv_grad_weight(tc.reshape(g.shape), ts, to, *xc, 8, 8, list(w.shape), *conv, "m:grad_weight"),
    ]


@pytest.mark.parametrize("lower", [False, True])
def test_conv_gemms_decompose_or_lower_into_inductor_lowerable_ops(lower, monkeypatch):
    """Simulated conv GEMMs become dequantize + aten convolution (same values as the ops);
    lowered ones (im2col, the padding corrections, the flipped kernel of grad_input) are built
    only from ops inductor lowers directly."""
    import fqt_compile.passes.lower_int_gemm as lig
    from fqt_compile import FQTConfig

    monkeypatch.setattr(lig, "CONV_RULE", False)
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 7, 7), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 4, 4), torch.tensor(11))
    gm = make_fx(_conv_program, tracing_mode="fake")(*args)
    ref = gm(*args)
    res = lig.lower_int_gemm(gm, FQTConfig(lower_int_gemm=lower))
    assert [d.lowered for d in res.decisions] == [lower] * 3, [d.reason for d in res.decisions]
    fused, counts = decompose_fqt(gm)
    if not lower:
        assert counts["qconv"] == counts["qconv_grad_input"] == counts["qconv_grad_weight"] == 1
    missing = _without_lowering(fused)
    assert not missing, missing
    for a, b in zip(ref, fused(*args)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def _dropout_program(a, b, seed):
    return [fqt.dropout(a, seed, 0.3), fqt.dropout(b, seed, 0.1), fqt.dropout(b, seed, 1.0)]


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_inlined_dropout_is_exactly_the_op(tracing_mode):
    """fqt::dropout inlined: the same counter-based mask (the draws of the row-major index, on
    a 4-D tensor through an (N, D) view of the index) and the same scaling; a symbolic shape
    leaves the op a call."""
    a, b = torch.randn(2, 3, 16, 24), torch.randn(40, 7)
    seed = torch.tensor(2**40 + 5, dtype=torch.int64)
    gm = make_fx(_dropout_program, tracing_mode=tracing_mode)(a, b, seed)
    fused, counts = decompose_fqt(gm)
    left = [n for n in fused.graph.nodes if n.target is fqt.dropout.default]
    assert (counts, len(left)) == (({"dropout": 3}, 0) if tracing_mode == "fake" else ({}, 3))
    assert _without_lowering(fused) == (set() if tracing_mode == "fake" else {"fqt.dropout.default"})
    for x, y in zip(gm(a, b, seed), fused(a, b, seed)):
        assert torch.equal(x, y)


@needs_inductor_torch
def test_inductor_code_drops_exactly_like_the_op():
    from torch._inductor.compile_fx import compile_fx_inner

    a, b = torch.randn(2, 3, 16, 24), torch.randn(40, 7)
    seed = torch.tensor(99, dtype=torch.int64)
    fused, _ = decompose_fqt(make_fx(_dropout_program, tracing_mode="fake")(a, b, seed))
    compiled = compile_fx_inner(fused, [a, b, seed])
    for x, y in zip(_dropout_program(a, b, seed), compiled([a, b, seed])):
        assert torch.equal(x, y)
