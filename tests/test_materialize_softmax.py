"""passes/materialize_softmax.py: a softmax recomputed in an inductor backward
(config.sdpa="recompute") is stored once, through inductor's force_stride_order prim, instead
of being inlined into every kernel that reads it; the values do not change."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile
from fqt_compile import FQTConfig
from fqt_compile.backend import FQTBackend
from fqt_compile.models import TransformerBlock
from fqt_compile.passes.materialize_softmax import materialize_softmax, softmax_outputs

from conftest import needs_inductor_torch


def _softmax_read_twice(x):
    # the decomposed softmax AOTAutograd hands inductor, read by two consumers
    e = (x - x.amax(-1, keepdim=True)).exp()
    p = e / e.sum(-1, keepdim=True)
    return p * 2, (p * x).sum(-1)


def _prim_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.prims.inductor_force_stride_order.default]


def test_pass_wraps_a_softmax_read_twice_and_keeps_the_values():
    x = torch.randn(3, 5, 7)
    gm = make_fx(_softmax_read_twice)(x)
    ref = gm(x)
    (p,) = softmax_outputs(gm)
    assert materialize_softmax(gm, FQTConfig(), "backward") == {"softmax": 1}
    (stored,) = _prim_nodes(gm)
    assert stored.args == (p, [35, 7, 1]) and stored.meta["fqt_materialized"] == p.name
    assert list(p.users) == [stored] and len(stored.users) == 2  # every reader goes through it
    for a, b in zip(gm(x), ref):
        assert torch.equal(a, b)


def test_pass_leaves_other_graphs_alone():
    x = torch.randn(3, 5, 7)
    cases = [
        (_softmax_read_twice, FQTConfig(), "forward", {"skipped": "forward graph (only backward graphs recompute a softmax)"}),
        (_softmax_read_twice, FQTConfig(compiler="eager"), "backward",
         {"skipped": "eager inner compiler (nothing inlines the softmax)"}),
        (lambda x: torch.softmax(x, -1) * 2, FQTConfig(), "backward", {"softmax": 0}),  # one reader
        (lambda x: (x - x.amax(-1, keepdim=True)).exp() / 3 + x, FQTConfig(), "backward", {"softmax": 0}),
    ]
    for fn, cfg, kind, expected in cases:
        gm = make_fx(fn)(x)
        assert materialize_softmax(gm, cfg, kind) == expected
        assert not _prim_nodes(gm)


def _recompute_step(with_pass: bool):
    passes = FQTBackend.aten_passes
    if not with_pass:
        FQTBackend.aten_passes = [p for p in passes if p[0] != "materialize_softmax"]
    try:
        torch.manual_seed(0)
        m = TransformerBlock(32, 4)
        fqt_compile.compile(m, FQTConfig(sdpa="recompute"))
        x = torch.randn(2, 64, 32)
        torch.manual_seed(1)
        y = m(x)
        y.square().mean().backward()
    finally:
        FQTBackend.aten_passes = passes
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, fqt_compile.records(m)[0]


@needs_inductor_torch
def test_recomputed_attention_stores_its_softmax_once_with_identical_gradients():
    """On inductor with sdpa="recompute" the backward graph holds the recomputed softmax; the
    pass wraps it (its readers: the quantizer of P for dV and the softmax backward) and the
    output and gradients are bit-equal to a compile without the pass (same seeds, same
    draws; P is the same expression, evaluated once)."""
    y1, g1, rec = _recompute_step(True)
    assert dict(rec.aten_passes["backward"])["materialize_softmax"] == {"softmax": 1}
    assert dict(rec.aten_passes["forward"])["materialize_softmax"]["skipped"].startswith("forward graph")
    (stored,) = _prim_nodes(rec.backward)
    assert len(stored.users) >= 2 and not softmax_outputs(rec.backward)  # P itself has one reader left
    y0, g0, rec0 = _recompute_step(False)
    assert not _prim_nodes(rec0.backward)
    assert torch.equal(y0, y1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
