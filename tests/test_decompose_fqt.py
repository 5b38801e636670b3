"""passes.decompose_fqt: the inlined aten form computes exactly what the fqt ops compute."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile  # noqa: F401  (registers the ops)
from fqt_compile.passes.decompose_fqt import decompose_fqt

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
    assert not any(str(n.target).startswith("fqt.") for n in fused.graph.nodes)
    for a, b in zip(gm(x, g, seed), fused(x, g, seed)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    assert torch.zeros(()) in fused(torch.zeros(4, 4), g, seed)[1]  # all-zero input: scale 0
    # a symbolic graph stays symbolic: other shapes run
    if tracing_mode == "symbolic":
        x2, g2 = torch.randn(4, 9), torch.randn(12, 3)
        for a, b in zip(gm(x2, g2, seed), fused(x2, g2, seed)):
            assert torch.equal(a, b)


def test_every_emitted_op_has_an_inductor_lowering():
    """Inductor refuses ops that it would have decomposed but has no lowering for (it asserts
    'both a fallback and a decomp'); everything decompose_fqt emits must lower directly."""
    from torch._inductor.lowering import lowerings

    gm = make_fx(_program, tracing_mode="symbolic")(torch.randn(7, 5), torch.randn(9, 4), torch.tensor(3))
    fused, _ = decompose_fqt(gm)
    missing = {
        str(n.target) for n in fused.graph.nodes
        if n.op == "call_function" and n.target not in lowerings and "getitem" not in str(n.target)
    }  # fmt: skip
    assert not missing, missing
