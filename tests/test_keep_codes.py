"""passes.keep_codes: recompute regions keep the int8 codes of their input quantizers.

The end-to-end checks of what this changes in the saved bytes (exactly the probability codes
and GELU's float input drop; q, k, v and fc1's input stay as codes) and that the gradients stay
bit-identical are in tests/test_backend.py (the recompute tests, eager inner compiler)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

import fqt_compile
from fqt_compile import FQTConfig
from fqt_compile.models import TransformerBlock
from fqt_compile.passes.keep_codes import FQT_AC_ID_BASE, KeepCodesJointPass, activation_inputs, keep_codes

from conftest import needs_inductor_torch

aten = torch.ops.aten
QUANTIZE = torch.ops.fqt.quantize.default
MUST_RECOMPUTE, MUST_SAVE = CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.MUST_SAVE


def _quantize(g: fx.Graph, x: fx.Node, tag: dict) -> tuple[fx.Node, list[fx.Node]]:
    q = g.call_function(QUANTIZE, (x, 8, "affine", "tensor", -1))
    outs = [g.call_function(operator.getitem, (q, i)) for i in range(3)]
    for n in (q, *outs):
        n.meta.update(tag)
    return q, outs


def _joint_like_graph():
    """A forward fragment as AOTAutograd hands it to the partitioner: y = x * 2 outside any
    region; in one fqt region (ac id >= FQT_AC_ID_BASE) quantizers of y through a view, of a
    parameter, of relu(y) (computed in the region), and a dropout of relu(y) with a seed drawn
    in the region; in a user's checkpoint region (ac id 1) a quantizer of y."""
    g = fx.Graph()
    w, x = g.placeholder("w"), g.placeholder("x")
    y = g.call_function(aten.mul.Tensor, (x, 2))
    fqt = {"recompute": MUST_RECOMPUTE, "ac_graph_id": FQT_AC_ID_BASE + 3}
    user = {"recompute": MUST_RECOMPUTE, "ac_graph_id": 1}
    t = g.call_function(aten.t.default, (y,))
    t.meta.update(fqt)
    r = g.call_function(aten.relu.default, (y,))
    r.meta.update(fqt)
    nodes = {"view": _quantize(g, t, fqt), "param": _quantize(g, w, fqt), "inner": _quantize(g, r, fqt),
             "user": _quantize(g, y, user)}
    seed = g.call_function(torch.ops.fqt.new_seed.default, (torch.device("cpu"),))  # a dropout's seed
    seed.meta.update(fqt)
    drop = g.call_function(torch.ops.fqt.dropout.default, (r, seed, 0.5))
    drop.meta.update(fqt)
    nodes["seed"] = (seed, [])
    g.output((*(outs[0] for _, outs in nodes.values() if outs), drop))
    return g, nodes


def test_keep_codes_saves_only_quantizers_of_values_from_outside_the_region_and_seeds():
    g, nodes = _joint_like_graph()
    assert keep_codes(g) == {"kept": 1, "recomputed": 2, "seeds": 1}
    assert nodes["seed"][0].meta["recompute"] is MUST_SAVE  # drawn again, it would change the mask
    q, outs = nodes["view"]  # y, through the region's own transpose: kept, with its outputs
    assert all(n.meta["recompute"] is MUST_SAVE for n in (q, *outs))
    assert q.meta["ac_graph_id"] == FQT_AC_ID_BASE + 3
    for name in ("param", "inner", "user"):  # a parameter; a value the region computes; a user's region
        q, outs = nodes[name]
        assert all(n.meta["recompute"] is MUST_RECOMPUTE for n in (q, *outs)), name
    assert keep_codes(g) == {"kept": 0, "recomputed": 2, "seeds": 0}  # a second run changes nothing
    assert nodes["view"][0].meta["recompute"] is MUST_SAVE


def test_keep_codes_leaves_graphs_without_fqt_regions_alone():
    g, nodes = _joint_like_graph()
    for q, outs in nodes.values():
        for n in (q, *outs):
            n.meta.pop("recompute")
    for n in g.nodes:
        n.meta.pop("recompute", None)
    assert keep_codes(g) == {"kept": 0, "recomputed": 0, "seeds": 0}
    assert not any("recompute" in n.meta for q, outs in nodes.values() for n in (q, *outs))


def test_a_graph_input_that_is_an_earlier_graphs_activation_keeps_its_codes():
    """After a graph break a region may quantize a graph input that an earlier graph computed:
    its codes are saved like those of a value computed in this graph (saved as a float, the
    activation would be kept alive by this backward alone), while a parameter or the batch is
    quantized again. The primals are told apart by the backend's example inputs; when their
    count does not match (deduplicated or aliased inputs), every input is quantized again."""
    fqt = {"recompute": MUST_RECOMPUTE, "ac_graph_id": FQT_AC_ID_BASE + 5}

    def graph():
        g = fx.Graph()
        w, x, h = (g.placeholder(f"primals_{i}") for i in (1, 2, 3))
        g.placeholder("tangents_1")
        quantizers = {name: _quantize(g, v, fqt) for name, v in (("w", w), ("x", x), ("h", h))}
        g.output(tuple(outs[0] for _, outs in quantizers.values()))
        return g, quantizers

    leaf = nn_param = torch.nn.Parameter(torch.randn(2))
    activation = torch.randn(2, requires_grad=True) * 2
    assert activation_inputs([nn_param, torch.randn(2), activation, 3]) == (2,)
    assert activation_inputs([leaf, torch.randn(2, requires_grad=True)]) == ()

    g, quantizers = graph()
    assert keep_codes(g, activation_inputs([nn_param, torch.randn(2), activation]), 3) == {
        "kept": 1, "recomputed": 2, "seeds": 0}
    assert quantizers["h"][0].meta["recompute"] is MUST_SAVE
    assert all(quantizers[n][0].meta["recompute"] is MUST_RECOMPUTE for n in ("w", "x"))
    g, quantizers = graph()
    assert keep_codes(g, (2,), 4) == {"kept": 0, "recomputed": 3, "seeds": 0}  # count mismatch
    g, _ = graph()
    results = []
    KeepCodesJointPass(None, results.append, [nn_param, torch.randn(2), activation])(g)
    assert results == [{"kept": 1, "recomputed": 2, "seeds": 0}]


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=needs_inductor_torch)])
def test_attention_after_a_graph_break_keeps_the_codes_of_q_k_v(compiler):
    """q, k, v computed by one graph and attended to by the next (a graph break between them),
    with sdpa='recompute': the second graph's backward keeps their int8 codes, not the float
    tensors, and the gradients are those of the default policy, which saves the probabilities
    (same seed, same draws). Before, the graph input was quantized again in the backward and
    its float tensor saved."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x):
            B, L, _ = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, 4, 8).permute(2, 0, 3, 1, 4)
            torch._dynamo.graph_break()
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(o.transpose(1, 2).reshape(B, L, 32))

    x = torch.randn(2, 16, 32)
    grads = {}
    for sdpa in ("decompose", "recompute"):
        torch.manual_seed(0)
        m = Split()
        fqt_compile.compile(m, FQTConfig(sdpa=sdpa, compiler=compiler))
        torch.manual_seed(1)
        m(x).square().mean().backward()
        grads[sdpa] = [p.grad for p in m.parameters()]
        recs = fqt_compile.records(m)
        assert len(recs) == 2
        attention = recs[1]
        if sdpa == "recompute":
            assert attention.aten_passes["joint"] == [("keep_codes", {"kept": 3, "recomputed": 1, "seeds": 0})]
            saved = [n.meta["val"] for n in attention.backward.graph.nodes if n.op == "placeholder"]
            qkv_shape = (2, 4, 16, 8)
            assert not any(v.dtype == torch.float32 and tuple(v.shape) == qkv_shape for v in saved
                           if isinstance(v, torch.Tensor))
            assert sum(1 for v in saved if isinstance(v, torch.Tensor) and v.dtype == torch.int8
                       and tuple(v.shape) in (qkv_shape, (2, 4, 8, 16))) == 3  # k's codes as k^T
    # bit for bit with the eager inner compiler; inductor fuses the two policies' graphs
    # differently (another float summation order): float32 rounding
    tol = dict(rtol=0, atol=0) if compiler == "eager" else {}
    for a, b in zip(grads["decompose"], grads["recompute"]):
        torch.testing.assert_close(a, b, **tol)


def test_joint_pass_chains_what_was_set_and_ids_itself():
    g, _ = _joint_like_graph()
    seen, results = [], []
    p = KeepCodesJointPass([lambda graph: seen.append(graph)], results.append)
    p(g)
    assert seen == [g] and results == [{"kept": 1, "recomputed": 2, "seeds": 1}]
    assert KeepCodesJointPass().uuid() is not None
    assert KeepCodesJointPass(lambda graph: None).uuid() is None  # a plain callable: no cache key
    if hasattr(torch._inductor, "custom_graph_pass"):
        from torch._inductor.custom_graph_pass import CustomGraphPass

        class Named(CustomGraphPass):
            def __call__(self, graph):
                pass

            def uuid(self):
                return "named-v1"

        assert KeepCodesJointPass(Named()).uuid()[1:] == ("named-v1",)


@needs_inductor_torch
def test_inductor_runs_the_pass_before_the_partition_and_a_users_joint_pass():
    """Under inductor the backend installs the pass as joint_custom_pre_pass, then runs a pass
    the user set there. With recompute_mlp the backward quantizes fc1's weight again (from the
    parameter) but not fc1's input: its codes were saved (one fqt::quantize in the backward
    graph, not two). Inductor's FX graph cache is off so that the compile really runs.
    (``config.patch``, not pytest's monkeypatch: pytest >= 9 undoes a module attribute it did
    not find in the module's ``__dict__`` with delattr, which hides a torch config entry for
    the rest of the session.)"""
    calls = []
    torch.manual_seed(0)
    m = TransformerBlock(32, 4)
    fqt_compile.compile(m, FQTConfig(sdpa="decompose", recompute_mlp=True, fuse_gelu=False))
    with torch._inductor.config.patch(joint_custom_pre_pass=lambda graph: calls.append(graph), fx_graph_cache=False):
        m(torch.randn(2, 16, 32)).square().mean().backward()
    (rec,) = fqt_compile.records(m)
    assert rec.aten_passes["joint"] == [("keep_codes", {"kept": 1, "recomputed": 1, "seeds": 0})]
    assert len(calls) == 1
    quantizers = [n for n in rec.backward.graph.nodes if n.target is QUANTIZE]
    assert len(quantizers) == 1 and quantizers[0].args[0].op == "placeholder"
    assert torch.all(torch.isfinite(m.fc1.weight.grad)) and m.fc1.weight.grad.abs().sum() > 0


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
