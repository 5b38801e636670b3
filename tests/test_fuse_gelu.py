"""passes/fuse_gelu.py, GELU's backward: which graph forms the matchers recognise (the aten op of
the eager inner compiler, the decomposition inductor's tracing leaves; ``_split_bias``), what the
pass makes of a real GPT's backward graph with either inner compiler (one
``fqt::gelu_backward_sr_quantize`` per block reading fc2's int32 grad_input product, the bias
gradient taken from the op, the same quantizers and seed draws), what the fused graph computes
(the op's results against the nodes it replaced, on the same inputs; a whole training step
against the unfused one), where the pass stays out, and the inspection report.

Compiled models are shared through the module-scoped ``gpt_step`` fixture (one compile per
configuration); the eager inner compiler is used wherever inductor adds nothing, and the one
inductor compile (20-45 s on 2 busy cores: inductor's FX graph cache is bypassed for these
graphs) is a 1-block GPT."""

from __future__ import annotations

import operator

from typing import Any, NamedTuple

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compile
from fqt_compile import FQTBackend, FQTConfig, gelu_quant
from fqt_compile.backend import GraphRecord
from fqt_compile.config import InnerCompiler
from fqt_compile.inspect import inspect
from fqt_compile.models import GPT
from fqt_compile.passes.epilogue import match_epilogue
from fqt_compile.passes.fuse_gelu import _gelu_backward_args, _split_bias
from fqt_compile.sr_fused import MAX_EPILOGUE_TERMS

from conftest import needs_inductor_torch, quantizer_entries

needs_kernel = pytest.mark.skipif(not gelu_quant.available(), reason=f"fused GELU kernel {gelu_quant.status()}")

aten = torch.ops.aten
GELU_BWD = torch.ops.fqt.gelu_backward_sr_quantize.default
SR = torch.ops.fqt.sr_quantize.default
NEW_SEED = torch.ops.fqt.new_seed.default
INT_GEMMS = ("aten._int_mm", "fqt.int_mm_amx")  # the 2-D integer GEMMs lower_int_gemm emits on CPU

# the test GPT: 3 x 16 = 48 tokens, so that fc2's grad_input GEMM (48, 32, 64) differs in shape
# from every other GEMM of the backward (fc2's grad_weight would be (32, 32, 64) at 32 tokens)
VOCAB, D_MODEL, N_HEADS, D_FF, BATCH, SEQ = 32, 32, 2, 64, 3, 16
TOKENS = BATCH * SEQ


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def _ops(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is GELU_BWD]


def _pass_result(rec: GraphRecord, kind: str) -> dict[str, Any]:
    return dict(rec.aten_passes[kind])["fuse_gelu"]


def _output(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (list, tuple)) else out


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


# -- the matchers ---------------------------------------------------------------------------


def _decomposition(source: str | None):
    if source is None:
        return None
    if source == "torch._decomp":
        from torch._decomp.decompositions import gelu_backward

        return gelu_backward
    from torch._inductor.decomposition import select_decomp_table  # what the backend's inductor path traces with

    return select_decomp_table()[aten.gelu_backward.default]


def _traced_backward(decomposition: str | None = None, approximate: str = "none") -> fx.GraphModule:
    """``aten.gelu_backward(g, h, approximate)`` as an aten graph, with the decomposition of
    ``decomposition`` (None: the aten op itself)."""
    fn = _decomposition(decomposition)
    table = {aten.gelu_backward.default: fn} if fn is not None else None
    return make_fx(lambda g, h: aten.gelu_backward(g, h, approximate=approximate), decomposition_table=table)(
        torch.randn(4, 8), torch.randn(4, 8)
    )


@pytest.mark.parametrize("decomposition", [None, "torch._decomp", "inductor"])
def test_traced_exact_gelu_backward_is_matched(decomposition):
    """Both forms the pass meets -- the aten op (eager inner compiler) and its decomposition
    (torch._decomp's, and the entry of inductor's table the backend traces with) -- give back
    (g, h) in that order."""
    gm = _traced_backward(decomposition)
    g, h = _placeholders(gm)
    if decomposition is not None:
        assert _count(gm, aten.erf.default) == 1 and _count(gm, aten.gelu_backward.default) == 0, gm.code
    assert _gelu_backward_args(_output(gm)) == (g, h), gm.code


@pytest.mark.parametrize("decomposition", [None, "torch._decomp", "inductor"])
def test_tanh_gelu_backward_is_not_matched(decomposition):
    """approximate="tanh" has another derivative: neither its aten op nor its decomposition
    matches (the kernel computes the erf-based one)."""
    gm = _traced_backward(decomposition, approximate="tanh")
    assert _gelu_backward_args(_output(gm)) is None, gm.code


@pytest.mark.parametrize("tail,kwargs,expected", [
    ((), {}, True),
    ((), {"approximate": "none"}, True),
    (("none",), {}, True),
    ((), {"approximate": "tanh"}, False),
    (("tanh",), {}, False),
])  # fmt: skip
def test_aten_gelu_backward_approximate_as_kwarg_or_positional(tail, kwargs, expected):
    """The aten op's ``approximate`` is read whether it is a keyword, positional, or absent."""
    graph = fx.Graph()
    g, h = graph.placeholder("g"), graph.placeholder("h")
    ds = graph.call_function(aten.gelu_backward.default, (g, h, *tail), kwargs)
    assert (_gelu_backward_args(ds) == (g, h)) is expected


def _binary_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.mul.Tensor, aten.add.Tensor)]


def test_decomposition_matches_with_operands_in_either_order():
    """Multiplications and additions are matched in either operand order: each mul/add of the
    decomposition with its operands swapped, one at a time and all at once, still gives (g, h)."""
    gm = _traced_backward("inductor")
    g, h = _placeholders(gm)
    nodes = _binary_nodes(gm)
    assert len(nodes) == 9  # 7 mul + 2 add: the decomposition the pass's docstring describes
    for n in nodes:
        n.args = n.args[::-1]
        assert _gelu_backward_args(_output(gm)) == (g, h), n.format_node()
        n.args = n.args[::-1]
    for n in nodes:
        n.args = n.args[::-1]
    assert _gelu_backward_args(_output(gm)) == (g, h), gm.code


def test_decomposition_with_a_wrong_constant_is_not_matched():
    """Each numeric constant of the decomposition (1/sqrt 2, 1, 0.5, -0.5, 1/sqrt(2 pi)) is
    checked: changed by one part in 10^6 (the matcher allows 10^-12), the graph no longer matches."""
    gm = _traced_backward("inductor")
    changed = 0
    for n in gm.graph.nodes:
        for i, a in enumerate(n.args):
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                args = list(n.args)
                args[i] = a * (1 + 1e-6) if a else 1e-6
                n.args = tuple(args)
                assert _gelu_backward_args(_output(gm)) is None, n.format_node()
                args[i] = a
                n.args = tuple(args)
                changed += 1
    assert changed == 5
    assert _gelu_backward_args(_output(gm)) is not None  # restored


def test_decomposition_of_another_tensor_or_function_is_not_matched():
    """Near misses in structure: ``h`` replaced by ``g`` in any one place (cdf, pdf, the square,
    the factor h of h * pdf), or erf/exp swapped for another function: no match."""
    gm = _traced_backward("inductor")
    g, h = _placeholders(gm)
    uses = [(n, i) for n in gm.graph.nodes for i, a in enumerate(n.args) if a is h]
    assert len(uses) == 4  # h * 1/sqrt 2, h * h (twice), h * pdf
    for n, i in uses:
        n.update_arg(i, g)
        assert _gelu_backward_args(_output(gm)) is None, n.format_node()
        n.update_arg(i, h)
    for target, other in ((aten.erf.default, aten.tanh.default), (aten.exp.default, aten.sigmoid.default)):
        (n,) = [n for n in gm.graph.nodes if n.target is target]
        n.target = other
        assert _gelu_backward_args(_output(gm)) is None, n.format_node()
        n.target = target
    assert _gelu_backward_args(_output(gm)) == (g, h)


_D = 8


@pytest.mark.parametrize("fn", [
    lambda x, b: (x + b).view(-1, _D),
    lambda x, b: (b + x).reshape(-1, _D),
    lambda x, b: x + b,
], ids=["view(x+b)", "reshape(b+x)", "x+b"])  # fmt: skip
def test_split_bias_finds_x_and_bias(fn):
    """``h = [view](add(x, bias))`` with a (D,) bias, either operand order: (x, bias)."""
    gm = make_fx(fn)(torch.randn(2, 3, _D), torch.randn(_D))
    x, b = _placeholders(gm)
    assert _split_bias(_output(gm), _D) == (x, b), gm.code


@pytest.mark.parametrize("fn,d", [
    (lambda x, b: x.view(-1, _D), _D),  # no add
    (lambda x, b: (x + x).view(-1, _D), _D),  # no 1-D operand
    (lambda x, b: (x + b[:1]).view(-1, _D), _D),  # a 1-element (broadcast) operand, not (D,)
    (lambda x, b: (x + 1.0).view(-1, _D), _D),  # a scalar
    (lambda x, b: (x.double() + b.double()).view(-1, _D), _D),  # float64
    (lambda x, b: (x + b).view(-1, _D), _D // 2),  # D is not the bias's length
], ids=["view", "x+x", "bias[:1]", "scalar", "float64", "other-d"])  # fmt: skip
def test_split_bias_returns_h_without_a_bias(fn, d):
    """Anything else is ``(h, None)``: the kernel then reads ``h`` as it is."""
    gm = make_fx(fn)(torch.randn(2, 3, _D), torch.randn(_D))
    h = _output(gm)
    assert _split_bias(h, d) == (h, None), gm.code


# -- real compiled graphs -------------------------------------------------------------------


class Step(NamedTuple):
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    record: GraphRecord


def _keep_backward_inputs(gm: fx.GraphModule, cfg: FQTConfig, kind: str) -> int:
    """An aten pass run last: the eager inner compiler calls ``gm.forward``; for the backward
    graph that becomes a wrapper keeping a copy of each call's inputs in
    ``gm.meta["test_inputs"]`` (for :func:`_values`). Changes nothing in the graph."""
    if kind != "backward" or cfg.compiler is not InnerCompiler.EAGER:
        return 0
    calls = gm.meta.setdefault("test_inputs", [])
    if hasattr(gm, "real_recompile"):  # a lazy GraphModule: its forward would call gm.forward again
        gm.real_recompile()
    forward = type(gm).forward.__get__(gm)

    def keep(*args):
        calls.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return forward(*args)

    gm.forward = keep
    return 1


class _Backend(FQTBackend):
    """The fqt backend, keeping the backward graph's inputs."""

    aten_passes = FQTBackend.aten_passes + [("keep_inputs", _keep_backward_inputs)]


def _gpt_step(compiler: str, n_layers: int, backend_cls: type[FQTBackend] = _Backend, **cfg) -> Step:
    """One training step (forward, cross-entropy, backward) of a tiny GPT compiled by
    ``backend_cls(FQTConfig(compiler=compiler, **cfg))``: same init, data and quantizer seeds
    for every configuration."""
    torch._dynamo.reset()  # a fresh dynamo cache: the model compiles with this backend (no recompile limit)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, n_layers=n_layers, max_len=SEQ, d_ff=D_FF)
    idx, tgt = torch.randint(0, VOCAB, (2, BATCH, SEQ))
    # fuse_quantizers off: it would take the stochastic quantizers that the fuse_gelu=False
    # graphs compared against keep as fqt::sr_quantize nodes (tests/test_fuse_quantizers.py)
    backend = backend_cls(FQTConfig(compiler=compiler, **{"fuse_quantizers": False, **cfg}))
    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(1)  # the stochastic quantizers' seeds
    loss = F.cross_entropy(compiled(idx).flatten(0, 1), tgt.flatten())
    loss.backward()
    assert len(backend.records) == 1  # one graph, compiled by this backend
    return Step(loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, backend.records[0])


def _values(gm: fx.GraphModule, inputs: list[Any], seed: int = 7) -> dict[str, Any]:
    """Every node's value (by name) when ``gm`` runs on ``inputs``, the seed draws starting
    from ``torch.manual_seed(seed)``."""
    vals: dict[str, Any] = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            vals[n.name] = out = super().run_node(n)
            return out

    torch.manual_seed(seed)
    with torch.no_grad():
        Keep(gm).run(*inputs)
    return vals


@pytest.fixture(scope="module")
def gpt_step():
    """``gpt_step(compiler="eager", n_layers=2, **cfg)``: :func:`_gpt_step`, compiled once per
    configuration for the whole module."""
    cache: dict[Any, Step] = {}

    def get(compiler: str = "eager", n_layers: int = 2, **cfg) -> Step:
        key = (compiler, n_layers, tuple(sorted(cfg.items())))
        if key not in cache:
            cache[key] = _gpt_step(compiler, n_layers, **cfg)
        return cache[key]

    return get


def _fc2_grad_input_decisions(rec: GraphRecord):
    lower = dict(rec.aten_passes["backward"])["lower_int_gemm"]
    return [d for d in lower.decisions if d.module.endswith(".fc2") and d.gemm == "grad_input"]


def _bias_sums(gm) -> list[fx.Node]:
    """``sum(x, [0])`` nodes over a float32 (tokens, d_ff) tensor: fc1's bias gradient."""
    out = []
    for n in gm.graph.nodes:
        if n.target is aten.sum.dim_IntList and list(n.args[1]) == [0] and not n.kwargs and len(n.args) == 2:
            v = n.args[0].meta.get("val")
            if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and tuple(v.shape) == (TOKENS, D_FF):
                out.append(n)
    return out


def _lowered_float_results(gm, decisions) -> list[fx.Node]:
    """The nodes holding the float result (epilogue) of the GEMMs of ``decisions``."""
    tags = {d.tag for d in decisions}
    return [n for n in gm.graph.nodes if getattr(n.meta.get("fqt_lowering"), "tag", None) in tags]


def _assert_fused_graph(rec: GraphRecord, n_layers: int) -> None:
    """What the pass must have made of a GPT's backward graph (either inner compiler)."""
    bwd = rec.backward
    assert _pass_result(rec, "backward")["fused_backward"] == n_layers
    assert "skipped" not in _pass_result(rec, "backward")
    ops = _ops(bwd)
    assert len(ops) == n_layers, bwd.code
    # GELU's backward is gone, in aten form and in decomposed form
    assert _count(bwd, aten.gelu_backward.default) == 0 and _count(bwd, aten.erf.default) == 0, bwd.code
    decisions = _fc2_grad_input_decisions(rec)
    assert len(decisions) == n_layers and all(d.lowered for d in decisions)
    m, k, n = decisions[0].mkn
    assert (m, k, n) == (TOKENS, D_MODEL, D_FF)
    # fc2's grad_input GEMM's float result is never computed: the op reads its int32 product
    assert not _lowered_float_results(bwd, decisions)
    accs = {op.args[0] for op in ops}
    assert len(accs) == n_layers
    for op in ops:
        acc, x, bias, seeds, bits, grans, rows, cols = op.args
        assert any(str(acc.target).startswith(d.kernel) for d in decisions) and str(acc.target).startswith(INT_GEMMS)
        av = acc.meta["val"]
        assert av.dtype == torch.int32 and tuple(av.shape) == (m, n)
        assert tuple(acc.args[0].meta["val"].shape) == (m, k) and tuple(acc.args[1].meta["val"].shape) == (k, n)
        # acc * sA * sB + rowsum(cA) * sA * oB + colsum(B~) * oA: both operands are affine
        assert len(rows) == len(cols) == 3 <= MAX_EPILOGUE_TERMS
        assert x.meta["val"].numel() == m * n and x.meta["val"].shape[-1] == n
        # Q_b1 = PSQ (per row) and Q_b2 = per column, 8 bits, each with its own seed draw
        assert bits == [8, 8] and grans == "row,column"
        assert all(s.target is NEW_SEED for s in seeds) and len(set(seeds)) == 2
        # the bias gradient is the op's output 1 and a graph output; ds (output 0) has no reader
        outs = {u.args[1]: u for u in op.users}
        assert 0 not in outs and sorted(outs) == list(range(1, 8))
        assert any(u.op == "output" for u in outs[1].users)
    assert not _bias_sums(bwd)


@needs_kernel
def test_eager_backward_graph_has_one_fused_op_per_block(gpt_step):
    """Eager inner compiler, 2 blocks: one op per block, reading fc2's grad_input int32 product
    (the very node the unfused graph's fc2 epilogue reads), the bias-gradient sums replaced by the
    op's output, the same quantizers (in the same order) and seed draws as with fuse_gelu=False."""
    fused, unfused = gpt_step(), gpt_step(fuse_gelu=False)
    _assert_fused_graph(fused.record, 2)
    ub = unfused.record.backward
    assert _count(ub, aten.gelu_backward.default) == 2 and len(_bias_sums(ub)) == 2
    # the int32 products the op reads are those of fc2's grad_input GEMMs (same passes before fuse_gelu)
    fc2 = _lowered_float_results(ub, _fc2_grad_input_decisions(unfused.record))
    assert len(fc2) == 2
    assert {match_epilogue(n).acc.name for n in fc2} == {op.args[0].name for op in _ops(fused.record.backward)}
    assert quantizer_entries(fused.record.backward) == quantizer_entries(ub)
    assert _count(fused.record.backward, NEW_SEED) == _count(ub, NEW_SEED)
    assert _count(fused.record.backward, aten._int_mm.default) == _count(ub, aten._int_mm.default)
    # the forward graph has no GELU backward: the backward part of the pass finds nothing there
    assert _pass_result(fused.record, "forward")["fused_backward"] == 0


@needs_kernel
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_forward_gelu_and_its_quantizer_are_one_fused_op(gpt_step, compiler):
    """Forward graphs (eager: aten.gelu; inductor: its erf decomposition): one
    fqt::gelu_quantize per block, reading fc1's float result and the bias parameter apart, no
    GELU or erf left, the same forward quantizers (bits, per-tensor) as with fuse_gelu=False;
    the op's codes feed fc2's integer GEMM."""
    n_layers = 2 if compiler == "eager" else 1
    fused = gpt_step(compiler, n_layers=n_layers) if compiler == "inductor" else gpt_step()
    unfused = gpt_step(n_layers=n_layers, fuse_gelu=False)
    fw = fused.record.forward
    ops = [n for n in fw.graph.nodes if n.target is torch.ops.fqt.gelu_quantize.default]
    assert len(ops) == n_layers and _pass_result(fused.record, "forward")["fused"] == n_layers
    assert _count(fw, aten.gelu.default) == 0 and _count(fw, aten.erf.default) == 0
    assert _count(unfused.record.forward, aten.gelu.default) == n_layers
    assert sorted(quantizer_entries(fw)) == sorted(quantizer_entries(unfused.record.forward))
    for op in ops:
        x, bias, bits, scheme = op.args
        assert x.meta["val"].dtype == torch.float32 and x.meta["val"].shape[-1] == D_FF
        assert bias is not None and bias.op == "placeholder" and tuple(bias.meta["val"].shape) == (D_FF,)
        # codes (output 0, possibly through views) reach an integer GEMM
        todo, seen_gemm = list(op.users), False
        while todo:
            n = todo.pop()
            seen_gemm |= any(p in str(n.target) for p in INT_GEMMS)
            todo.extend(u for u in n.users if n.target is not operator.getitem or n.args[1] == 0)
        assert seen_gemm


@needs_kernel
def test_recomputed_mlp_passes_the_bias_to_the_op(gpt_step):
    """recompute_mlp=True recomputes fc1's output ``add(x, bias)`` in the backward graph: the
    op takes x and the (d_ff,) bias parameter separately (``_split_bias`` on a real graph)."""
    rec = gpt_step(n_layers=1, recompute_mlp=True).record
    _assert_fused_graph(rec, 1)
    for op in _ops(rec.backward):
        bias = op.args[2]
        assert bias is not None and bias.op == "placeholder" and tuple(bias.meta["val"].shape) == (D_FF,)


@needs_kernel
def test_bhq_gradient_fuses_the_column_quantizer_and_hands_ds_to_bhq(gpt_step):
    """With Q_b1 = BHQ the GELU gradient also feeds the BHQ transform: the op takes the column
    quantizer (Q_b2) only and its ds output (0) is read; g is BHQ's inverse, not an epilogue."""
    rec = gpt_step(n_layers=1, grad_input=fqt_compile.GradSpec("bhq", 5)).record
    assert _pass_result(rec, "backward")["fused_backward"] == 1
    (op,) = _ops(rec.backward)
    g, _, _, seeds, bits, grans, rows, cols = op.args
    assert grans == "column" and bits == [8] and len(seeds) == 1
    assert g.meta["val"].dtype == torch.float32 and rows == [] and cols == []
    assert any(u.args[1] == 0 and u.users for u in op.users)  # ds read (by the BHQ transform)
    assert not _bias_sums(rec.backward)


NUMBER_CONFIGS = pytest.mark.parametrize(
    "cfg", [{}, {"recompute_mlp": True}, {"grad_input": fqt_compile.GradSpec("bhq", 5)}],
    ids=["default", "recompute_mlp", "bhq5"],
)


def _layers(cfg: dict) -> int:
    return 2 if not cfg else 1


def _quantizers_of(op: fx.Node, unfused: fx.GraphModule) -> list[fx.Node]:
    """The ``sr_quantize`` nodes of the unfused graph that ``op`` replaces: those drawing the
    seeds ``op`` takes (the passes before fuse_gelu name their nodes alike), in ``op``'s order."""
    by_seed = {n.args[1].name: n for n in unfused.graph.nodes if n.target is SR}
    return [by_seed[sd.name] for sd in op.args[3]]


#: The op's results vs the unfused graph's on the same inputs (tests below). ``ds``: gelu' within
#: 2.1e-7 absolute of the exact value (gelu_quant's docstring) times |g|, plus g computed from the
#: int32 product with the epilogue's products in another order (a few float32 roundings):
#: measured <= 2e-7 of max|ds|, as the bias gradient (column sums in another order); allowed 1e-5.
#: Scales and offsets come from ds's row/column ranges: scales measured <= 3e-7 relative, allowed
#: 1e-5; offsets measured <= 4e-5 of a level (their scale), allowed 1e-3 (a level boundary moved
#: by that much changes a code with probability 1e-3). Codes: the same seeds give the same
#: uniform draws, so a code can differ only where ds lies within that rounding of a level
#: boundary, and then by one level: measured none of 2 x 2 x 3072 here; allowed 1% of the
#: entries (a changed seed changes ~30%: test_swapped_seeds_are_outside_the_tolerances).
DS_TOL, OFFSET_LEVELS, CODE_FRACTION = 1e-5, 1e-3, 1e-2


def _code_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of the codes that differ; AssertionError if one differs by more than a level."""
    d = a.int() - b.int()
    assert d.abs().max() <= 1, f"codes differ by {d.abs().max().item()} levels"
    return (d != 0).float().mean().item()


def _assert_op_reproduces_unfused(op: fx.Node, unfused: fx.GraphModule, vf: dict, vu: dict) -> None:
    out = vf[op.name]
    qs = _quantizers_of(op, unfused)
    assert [q.args[2] for q in qs] == op.args[4] and ",".join(q.args[3] for q in qs) == op.args[5]
    x2 = qs[0].args[0]
    assert all(q.args[0] is x2 for q in qs)
    ds = vu[x2.name]
    torch.testing.assert_close(out[0], ds, rtol=0, atol=DS_TOL * ds.abs().max().item())
    (bias_sum,) = [u for u in x2.users if u.target is aten.sum.dim_IntList]
    db = vu[bias_sum.name]
    torch.testing.assert_close(out[1], db, rtol=0, atol=DS_TOL * db.abs().max().item())
    for k, q in enumerate(qs):
        codes, scale, offset = out[2 + 3 * k: 5 + 3 * k]
        ref_codes, ref_scale, ref_offset = vu[q.name]
        torch.testing.assert_close(scale, ref_scale, rtol=DS_TOL, atol=0)
        # in levels of the quantizer: an offset is ds's row/column minimum, whose error is that of
        # gelu' (absolute, not relative: large relative to a minimum near 0)
        off_levels = ((offset - ref_offset).abs() / ref_scale).max().item()
        assert off_levels <= OFFSET_LEVELS, (q.format_node(), off_levels)
        assert _code_mismatch(codes, ref_codes) <= CODE_FRACTION, q.format_node()


@needs_kernel
@NUMBER_CONFIGS
def test_fused_op_reproduces_the_unfused_quantizers_on_the_same_inputs(gpt_step, cfg):
    """The fused and the unfused backward graph run on the same inputs (the unfused step's,
    replayed with the same seed draws): each op's ds, bias gradient and quantizer outputs equal
    those of the aten GELU backward, column sum and sr_quantize nodes it replaced, to float
    rounding (DS_TOL, CODE_FRACTION: see their comment). recompute_mlp covers the op's bias
    input, BHQ the op with the column quantizer only."""
    n_layers = _layers(cfg)
    fused, unfused = gpt_step(n_layers=n_layers, **cfg), gpt_step(n_layers=n_layers, fuse_gelu=False, **cfg)
    fb, ub = fused.record.backward, unfused.record.backward
    assert [n.name for n in _placeholders(fb)] == [n.name for n in _placeholders(ub)]
    (inputs,) = ub.meta["test_inputs"]
    vf, vu = _values(fb, inputs), _values(ub, inputs)
    ops = _ops(fb)
    assert len(ops) == n_layers
    for op in ops:
        _assert_op_reproduces_unfused(op, ub, vf, vu)


#: Fused vs unfused training steps, per gradient tensor: ||fused - unfused|| <= GRAD_TOL
#: ||unfused|| (Frobenius). Besides the op (above), the forward part of the pass computes GELU
#: in a kernel (fqt::gelu_quantize), so the two steps' values differ by float rounding (the
#: backward graphs' inputs differ in the last bits from the first block's fc2 input on), and a
#: quantizer's code then differs where a value lies within rounding of a boundary, by one level:
#: measured differences up to 3.6e-4 from a few such codes (<= 3e-6 in the gradients no such
#: code reaches). One code moved by one level moves the gradients it reaches by up to 2e-3
#: (measured by adding 1 to one code of the op's per-row quantizer), so GRAD_TOL = 5e-3 admits
#: a couple of them; a changed quantizer seed moves every code it rounds, and the gradients
#: downstream by 2e-3 to 1.8e-2 (17 of the 23 gradients reached above 5e-3) and fails it
#: (test_swapped_seeds_are_outside_the_tolerances). The loss: 1e-5 relative (measured equal).
GRAD_TOL, LOSS_RTOL = 5e-3, 1e-5


def _mismatches(a: Step, b: Step) -> list[str]:
    """Names of the gradients of ``b`` (and "loss") off ``a``'s by more than the tolerances."""
    out = [name for name, ref in a.grads.items() if (b.grads[name] - ref).norm() > GRAD_TOL * ref.norm()]
    if (b.loss - a.loss).abs() > LOSS_RTOL * a.loss.abs():
        out.append("loss")
    return out


@needs_kernel
@NUMBER_CONFIGS
def test_fused_step_computes_the_unfused_step(gpt_step, cfg):
    """Loss and every parameter gradient of the fused training step equal the fuse_gelu=False
    step's (same init, data and seeds) within GRAD_TOL / LOSS_RTOL (see their comment)."""
    n_layers = _layers(cfg)
    fused, unfused = gpt_step(n_layers=n_layers, **cfg), gpt_step(n_layers=n_layers, fuse_gelu=False, **cfg)
    assert _pass_result(fused.record, "backward")["fused_backward"] == n_layers
    assert _mismatches(unfused, fused) == []


@needs_kernel
def test_recomputed_mlp_with_bhq_gradient_runs_fused():
    """recompute_mlp=True (the bias split off fc1's recomputed output) with Q_b1 = BHQ (g is BHQ's
    inverse, a float (B, T, d_ff) tensor, not an int32 product): the fused step must run and
    compute the unfused one. (Found by this file's first version: the op required g of x's
    shape, and g has h's (B, T, d_ff) shape when h = view(add(x, bias)).)"""
    cfg = {"recompute_mlp": True, "grad_input": fqt_compile.GradSpec("bhq", 5)}
    fused = _gpt_step("eager", 1, **cfg)
    assert _pass_result(fused.record, "backward")["fused_backward"] == 1
    assert _mismatches(_gpt_step("eager", 1, fuse_gelu=False, **cfg), fused) == []


def _swap_first_op_seeds(gm: fx.GraphModule, cfg: FQTConfig, kind: str) -> int:
    """An aten pass after fuse_gelu: the first fused op (the last block's) gets its two
    quantizers' seeds the other way round."""
    ops = _ops(gm)
    if ops:
        args = list(ops[0].args)
        args[3] = args[3][::-1]
        ops[0].args = tuple(args)
        gm.recompile()
    return len(ops[:1])


class _SwappedSeedsBackend(_Backend):
    """The fqt backend with :func:`_swap_first_op_seeds` after fuse_gelu (inputs kept)."""

    aten_passes = FQTBackend.aten_passes + [
        ("swap_seeds", _swap_first_op_seeds), ("keep_inputs", _keep_backward_inputs),
    ]


@needs_kernel
def test_swapped_seeds_are_outside_the_tolerances(gpt_step):
    """The check of the tolerances above: the fused step whose last block's op has its two
    quantizers' seeds the other way round (a pass that lost track of the draw order). On the
    same inputs its codes differ from the unfused quantizers' in far more than CODE_FRACTION of
    the entries; in the training step, the gradients those quantizers reach fail GRAD_TOL:
    fc1.weight of that block (its column quantizer's codes feed fc1's grad_weight GEMM) and most
    of those further down, and none before the op (head, ln, the last block's fc2) nor its fc1
    bias (the column sums of ds, not quantized). The forward is untouched."""
    fused, unfused = gpt_step(), gpt_step(fuse_gelu=False)
    swapped = _gpt_step("eager", 2, backend_cls=_SwappedSeedsBackend)
    assert dict(swapped.record.aten_passes["backward"])["swap_seeds"] == 1
    assert torch.equal(swapped.loss, fused.loss)

    ub = unfused.record.backward
    (inputs,) = ub.meta["test_inputs"]
    op = _ops(swapped.record.backward)[0]
    vs, vu = _values(swapped.record.backward, inputs), _values(ub, inputs)
    out = vs[op.name]
    qs = _quantizers_of(op, ub)[::-1]  # the unfused quantizers, in the op's original order
    fractions = [_code_mismatch(out[2 + 3 * k], vu[q.name][0]) for k, q in enumerate(qs)]
    assert min(fractions) > 10 * CODE_FRACTION, fractions

    mismatched = set(_mismatches(fused, swapped))
    before = {"head.weight", "head.bias", "ln.weight", "ln.bias", "blocks.1.fc2.weight", "blocks.1.fc2.bias",
              "blocks.1.fc1.bias"}
    reached = set(fused.grads) - before
    assert "blocks.1.fc1.weight" in mismatched and mismatched <= reached
    assert len(mismatched) > len(reached) / 2, sorted(reached - mismatched)


@needs_kernel
@needs_inductor_torch
def test_inductor_backward_graph_is_fused_from_the_decomposition(gpt_step):
    """Inductor's tracing decomposes GELU's backward (erf, exp, ...): the pass matches that form
    in a real inductor backward graph (1 block), with the bias parameter split off fc1's output,
    and the quantizers are those of the eager unfused graph. The compiled step agrees with the
    eager fused one: inductor computes every quantizer's input with other roundings, so codes
    near a boundary differ throughout (not only the op's), measured <= 7.6e-3 per gradient
    (Frobenius, relative) and 2.5e-5 in the loss; allowed 3e-2 and 1e-4. A dropped bias (the op
    computing gelu'(x) for gelu'(x + bias)) moves fc1's and ln2's gradients by 9e-2 to 1.1e-1
    (measured with recompute_mlp on the eager compiler), outside."""
    ind = gpt_step("inductor", n_layers=1)
    rec = ind.record
    _assert_fused_graph(rec, 1)
    (op,) = _ops(rec.backward)
    bias = op.args[2]
    assert bias is not None and bias.op == "placeholder" and tuple(bias.meta["val"].shape) == (D_FF,)
    unfused = gpt_step(n_layers=1, fuse_gelu=False).record.backward
    assert sorted(quantizer_entries(rec.backward)) == sorted(quantizer_entries(unfused))
    eager = gpt_step(n_layers=1)
    torch.testing.assert_close(ind.loss, eager.loss, rtol=1e-4, atol=0)
    for name, ref in eager.grads.items():
        assert (ind.grads[name] - ref).norm() <= 3e-2 * ref.norm(), name


# -- where the pass stays out ---------------------------------------------------------------


def _assert_not_fused(rec: GraphRecord, skipped: str, n_layers: int) -> None:
    for kind in ("forward", "backward"):
        res = _pass_result(rec, kind)
        assert res["fused_backward"] == 0 and res["skipped"] == skipped, res
    assert not _ops(rec.backward)
    assert _count(rec.backward, aten.gelu_backward.default) == n_layers


def test_fuse_gelu_false_leaves_the_graph(gpt_step):
    """FQTConfig(fuse_gelu=False): the pass does not run, and says so."""
    _assert_not_fused(gpt_step(fuse_gelu=False).record, "fuse_gelu=False", 2)


def test_pass_stays_out_of_simulated_graphs(gpt_step):
    """lower_int_gemm=False: no int32 products to read; the pass does not run, and says so."""
    _assert_not_fused(gpt_step(n_layers=1, lower_int_gemm=False).record, "lower_int_gemm=False (simulated graph)", 1)


def test_pass_stays_out_without_the_kernel(monkeypatch):
    """FQT_FUSED_GELU=0 (the kernel's switch, read when it is loaded: ``_load`` uncached here)
    turns the kernel off and with it the pass, which says why."""
    monkeypatch.setenv("FQT_FUSED_GELU", "0")
    monkeypatch.setattr(gelu_quant, "_load", gelu_quant._load.__wrapped__)
    assert not gelu_quant.available() and gelu_quant.status() == "off (FQT_FUSED_GELU=0)"
    step = _gpt_step("eager", 1)
    _assert_not_fused(step.record, "kernel off (FQT_FUSED_GELU=0)", 1)


# -- the inspection report ------------------------------------------------------------------


@needs_kernel
def test_inspection_report_counts_the_fused_gelu_backward():
    """fqt_compile.inspect counts one fused GELU backward per block, prints it on the "Fused
    kernels:" line, and counts the op's quantizers and seeds as the unfused graph's."""

    def report(**cfg):
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, n_layers=2, max_len=SEQ, d_ff=D_FF)
        return inspect(model, torch.randint(0, VOCAB, (BATCH, SEQ)), FQTConfig(fuse_quantizers=False, **cfg))

    fused, unfused = report(), report(fuse_gelu=False)
    assert fused.totals["fused_gelu_backward"] == 2 and unfused.totals["fused_gelu_backward"] == 0
    for key in ("stochastic_quantizers", "seeds"):
        assert fused.totals[key] == unfused.totals[key] > 2
    assert fused.totals["stochastic_quantizers"] == fused.totals["seeds"]  # one seed per quantizer
    (line,) = [l for l in fused.format().splitlines() if l.startswith("Fused kernels:")]
    assert "2 GELU backward + bias gradient + its stochastic quantizers (fqt::gelu_backward_sr_quantize)" in line
    assert all("0 GELU backward" in l for l in unfused.format().splitlines() if l.startswith("Fused kernels:"))
