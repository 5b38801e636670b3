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
from fqt_compile.passes.keep_codes import FQT_AC_ID_BASE, KeepCodesJointPass, keep_codes

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
    fqt_compile.compile(m, FQTConfig(recompute_mlp=True, fuse_gelu=False))
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
