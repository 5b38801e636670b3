"""passes/split_seeds.py: every stochastic quantizer of a compiled backward draws its own seed
(the CSE of AOTAutograd's min-cut partitioner merges the ``fqt::new_seed`` calls of the autograd
formulas into one)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fqt_compile
from fqt_compile import FQTConfig
from fqt_compile.inspect import gradient_quantizer_seeds
from fqt_compile.passes.split_seeds import split_seeds

from conftest import needs_inductor_torch

SEED = torch.ops.fqt.new_seed.default
SR = torch.ops.fqt.sr_quantize.default


def test_each_consumer_gets_a_seed_node_of_its_own():
    g = fx.Graph()
    x = g.placeholder("x")
    seed = g.call_function(SEED, (torch.device("cpu"),))
    outs = [g.call_function(SR, (x, seed, 8, gran)) for gran in ("row", "column", "row")]
    g.output(tuple(outs))
    gm = fx.GraphModule(nn.Module(), g)
    assert split_seeds(gm) == {"seeds": 3, "added": 2}
    seeds = [n.args[1] for n in gm.graph.nodes if n.target is SR]
    assert len(set(seeds)) == 3 and all(s.target is SEED for s in seeds)
    # each new seed node sits right before its consumer, so draws follow the graph order
    order = list(gm.graph.nodes)
    assert all(order.index(s) < order.index(u) for s, u in zip(seeds, [n for n in order if n.target is SR]))
    torch.manual_seed(0)
    codes = [c for c, _, _ in gm(torch.rand(4, 8))]
    assert not torch.equal(codes[0], codes[2])  # same quantizer, separate draws
    assert split_seeds(gm) == {"seeds": 3, "added": 0}  # idempotent


def _identity_layer_grads(compiler: str):
    """One 32 x 32 linear layer with W = I on the batch X = I, and a loss whose gradient G has
    the range [0, 1] in every row and every column. Then Q_w(W) = W and Q_f(X) = X exactly, so
    grad_X = Q_b1(G) (per row) and grad_W^T = Q_b2(G) (per column), and the two quantizers see
    the same ranges: with a shared seed (and the index-keyed draws) they would round every
    element alike and grad_X == grad_W^T exactly."""
    n = 32
    torch.manual_seed(0)
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
    g = torch.rand(n, n) * 0.98 + 0.01
    idx = torch.arange(n)
    g[idx, idx] = 0.0  # a 0 in every row and column
    g[idx, (idx + 1) % n] = 1.0  # and a 1
    model = fqt_compile.compile(lin, FQTConfig(compiler=compiler))
    x = torch.eye(n, requires_grad=True)
    (model(x) * g).sum().backward()
    return model, x.grad, lin.weight.grad.t(), g


def _draws_after_cse() -> int:
    """How many of two ``new_seed`` draws AOTAutograd's CSE keeps."""
    from torch._functorch.compile_utils import fx_graph_cse

    g = fx.Graph()
    x = g.placeholder("x")
    seeds = [g.call_function(SEED, (torch.device("cpu"),)) for _ in range(2)]
    for s in seeds:
        s.meta["val"] = torch.empty((), dtype=torch.int64)
    g.output(tuple(g.call_function(SR, (x, s, 8, "row")) for s in seeds))
    return sum(n.target is SEED for n in fx_graph_cse(g).nodes)


def _without_exemption(monkeypatch) -> None:
    from torch._functorch import compile_utils

    monkeypatch.setattr(compile_utils, "rand_ops", [op for op in compile_utils.rand_ops
                                                    if op is not torch.ops.fqt.new_seed])


def test_a_seed_the_backward_reads_too_is_left_alone():
    """fqt::dropout's seed is a forward output (the backward recomputes the mask from it): the
    forward's dropout must keep reading that very seed, so the pass leaves it as it is."""
    g = fx.Graph()
    x = g.placeholder("x")
    seed = g.call_function(SEED, (torch.device("cpu"),))
    y = g.call_function(torch.ops.fqt.dropout.default, (x, seed, 0.5))
    g.output((y, seed))
    gm = fx.GraphModule(nn.Module(), g)
    assert split_seeds(gm) == {"seeds": 1, "added": 0}
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    y, s = gm(x)
    assert torch.equal(y, torch.ops.fqt.dropout(x, s, 0.5))


def test_aot_cse_leaves_seed_draws_alone(monkeypatch):
    """rng registers fqt::new_seed with the random ops AOTAutograd's CSE skips (its list, not
    the op's tag, decides up to torch 2.14; 2.15 also skips impure nodes), so two draws stay
    two on any backend."""
    from fqt_compile import rng

    assert rng.CSE_EXEMPT
    assert _draws_after_cse() == 2
    _without_exemption(monkeypatch)
    assert _draws_after_cse() in (1, 2)  # 1: the merge that split_seeds undoes


CASES = [
    ("eager", False),
    pytest.param("inductor", False, marks=needs_inductor_torch),
    # without rng's CSE exemption the min-cut partitioner merges the draws (torch <= 2.14);
    # the pass splits them
    pytest.param("inductor", True, marks=needs_inductor_torch, id="inductor-merged"),
]


@pytest.mark.parametrize("compiler,merged", CASES)
def test_grad_input_and_grad_weight_quantizers_round_independently(compiler, merged, monkeypatch):
    if merged:
        _without_exemption(monkeypatch)
        merged = _draws_after_cse() == 1
    model, gx, gw_t, g = _identity_layer_grads(compiler)
    step = 1.0 / 255  # 8-bit ranges [0, 1]
    for est in (gx, gw_t):  # both are stochastic roundings of G to the grid
        assert (est - g).abs().max() < step * 1.001
        assert torch.allclose(est / step, (est / step).round(), atol=1e-3)
    # Independent draws disagree wherever the two roundings differ: each element rounds
    # differently with probability 2 f (1 - f) for its fractional level f (1/3 on average over
    # uniform f, so ~340 of 1024 elements); with the seeds merged it is 0. 100 is > 10 standard
    # deviations below the expectation (binomial sd ~ 15).
    differ = int(((gx - gw_t).abs() > step / 2).sum())
    assert differ > 100, differ
    rec = fqt_compile.records(model)[0]
    results = dict(rec.aten_passes["backward"])
    # G's two quantizers (fqt::sr_quantize nodes, or one fqt::sr_quantize_multi with both)
    seeds = gradient_quantizer_seeds(rec.backward)
    assert len(seeds) == 2 and len(set(seeds)) == 2
    assert results["split_seeds"] == {"seeds": 2, "added": 1 if merged else 0}
