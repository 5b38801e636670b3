"""passes/epilogue.py: reading a lowered GEMM's scale epilogue back from an aten graph.

``lower_int_gemm._lower`` writes the float result of an integer GEMM as
``acc_f32 * sA * sB [+ rows * sA * oB] [+ cols * oA]``; :func:`match_epilogue` must give back
the int32 product and each term's factors split into a row side and a column side, such that
``acc * prod(rows[0]) * prod(cols[0]) + sum_t prod(rows[t]) * prod(cols[t])`` is the float
result (what the fused C kernels compute, ``sr_fused.epilogue_reference``), and return None
for anything it cannot express that way; :func:`emit_terms` puts each side's product into the
graph.

Three groups of tests:

* real graphs: small models compiled by the fqt backend (eager inner compiler); every int32
  GEMM epilogue of the post-pass aten forward/backward graphs is matched, and the match is
  evaluated on the values the graph computes in a real training step (a ``torch.fx.Interpreter``
  that keeps every node's value);
* hand-built graphs (``torch.fx.Graph``, ``meta["val"]`` real or fake tensors) for the shapes
  the matcher must reject;
* :func:`emit_terms` on both.

Numeric tolerance (``_assert_epilogue_value``): the reference multiplies the factors in another
order than the graph does, so the two differ by float32 rounding only: about 10 roundings
(<= 4 factors and <= 4 terms), each at most 2^-24 ~ 6e-8 of the largest summand, i.e. < 1e-6
of the largest term's magnitude. The check allows 1e-5 of it (10x margin); a missing or
misplaced term is off by O(1) of it (``test_the_numeric_check_detects_a_dropped_term``).
"""

from __future__ import annotations

import operator

import contextlib
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fqt_compile import FQTConfig, ForwardSpec, amx, softmax_quant
from fqt_compile.backend import FQTBackend, GraphRecord
from fqt_compile.models import GPT, MLP
from fqt_compile.passes.epilogue import EpilogueMatch, emit_terms, match_epilogue
from fqt_compile.sr_fused import MAX_EPILOGUE_TERMS, epilogue_reference

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default
f32 = torch.float32

#: lower_int_gemm's kernels whose result is the int32 product (cast to float32 in the graph);
#: "fqt.int_mm" (dynamic or very large K) returns float32 itself
INT32_KERNELS = ("aten._int_mm", "fqt.mm_int8", "fqt.bmm_int8", "fqt.int_mm_amx")
RTOL = 1e-5  # of the largest term's magnitude; see the module docstring


# ---------------------------------------------------------------------------------------------
# real graphs: compile, step once, keep every node's value
# ---------------------------------------------------------------------------------------------


class _Values(fx.Interpreter):
    """Runs a graph module node by node and keeps each node's value in ``store``."""

    def __init__(self, gm: fx.GraphModule, store: dict[fx.Node, Any]) -> None:
        super().__init__(gm)
        self.store = store

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.store[n] = value
        return value


@dataclass
class Compiled:
    record: GraphRecord
    values: dict[str, dict[fx.Node, Any]]  # kind -> node -> value in the training step
    # kind -> (match, emitted row products, emitted column products), with emit=True only
    emitted: dict[str, list[tuple[EpilogueMatch, list[fx.Node], list[fx.Node]]]] = field(default_factory=dict)

    def graph(self, kind: str) -> fx.GraphModule:
        return getattr(self.record, kind)


def _step(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], cfg: FQTConfig, *, emit: bool = False,
          dynamic: bool | None = None, fusions: bool = False) -> Compiled:
    """Compile ``model`` with an FQTBackend whose compiled graphs run through :class:`_Values`
    (so their node values are kept), and run one forward/backward step. Without ``fusions``
    the backend's ``fuse_*`` passes are left out: the graphs are then the ones those passes
    (match_epilogue's users) receive from lower_int_gemm, with every epilogue in place (a fusion
    consumes the epilogue it takes). ``emit``: an extra aten pass, after the backend's own,
    calls emit_terms on every matched epilogue (before its output node), so that the emitted
    nodes are evaluated in the step too."""
    values: dict[str, dict[fx.Node, Any]] = {}
    emitted: dict[str, list[tuple[EpilogueMatch, list[fx.Node], list[fx.Node]]]] = {}

    def emit_pass(gm: fx.GraphModule, cfg: FQTConfig, kind: str) -> None:
        fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])
        found = emitted.setdefault(kind, [])
        for n in list(gm.graph.nodes):
            ep = match_epilogue(n) if "fqt_lowering" in n.meta else None
            if ep is not None:
                with gm.graph.inserting_before(n):
                    found.append((ep, *emit_terms(gm.graph, ep, fake_mode)))
        gm.graph.lint()

    def interpret(gm: fx.GraphModule, cfg: FQTConfig, kind: str) -> None:
        store = values.setdefault(kind, {})
        # the eager inner compiler calls gm.forward, read after the passes ran
        gm.forward = lambda *args: _Values(gm, store).run(*args)

    backend = FQTBackend(cfg)
    passes = [(name, fn) for name, fn in FQTBackend.aten_passes if fusions or not name.startswith("fuse_")]
    assert "lower_int_gemm" in dict(passes)
    backend.aten_passes = [*passes, *([("emit", emit_pass)] if emit else []), ("interpret", interpret)]
    torch._dynamo.reset()  # as tests/test_backend.py: a fresh dynamo cache for a new backend
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    torch.manual_seed(1)
    y = compiled(*(x if isinstance(x, tuple) else (x,))).float()
    # a random projection: every output column gets a different, varying gradient (a constant
    # column would make a per-column gradient quantizer's scale 0, and its product term 0)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    (record,) = [r for r in backend.records if r.forward is not None]  # (dynamo may add empty ones)
    assert set(values) == {"forward", "backward"}, list(values)
    return Compiled(record, values, emitted)


def _symmetric() -> dict[str, Any]:
    return dict(input=ForwardSpec(8, symmetric=True), weight=ForwardSpec(8, symmetric=True))


def _gpt() -> GPT:
    return GPT(vocab=32, d_model=32, n_heads=2, n_layers=1, max_len=16, d_ff=64)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 32, (2, 16))


#: name -> (model, input, config options): every forward scheme ("affine_zero", "affine",
#: "symmetric"), 2-D (linear) and 3-D (attention bmm) products, convolutions (im2col), AMX
CASES = {
    "linear-affine_zero": (lambda: MLP(16, 32, 8, 1), lambda: torch.randn(4, 16, requires_grad=True), {}),
    "linear-affine": (lambda: MLP(16, 32, 8, 1), lambda: torch.randn(4, 16, requires_grad=True),
                      dict(input=ForwardSpec(8, zero_aligned=False), weight=ForwardSpec(8, zero_aligned=False))),
    "linear-symmetric": (lambda: MLP(16, 32, 8, 1), lambda: torch.randn(4, 16, requires_grad=True), _symmetric()),
    "gpt-affine_zero": (_gpt, _tokens, {}),
    "gpt-symmetric": (_gpt, _tokens, _symmetric()),
    # im2col: oneDNN's direct int8 convolution (the default on VNNI CPUs) returns float32 sums,
    # not an int32 product, so its epilogue is not one of the int32 ones matched here
    "conv": (lambda: nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)),
             lambda: torch.randn(2, 64, 4, 4, requires_grad=True), {"direct_conv": False}),
    # M, N multiples of 32, K of 64, M*K*N = amx.MIN_MACS: the AMX kernel
    "amx": (lambda: nn.Linear(512, 256), lambda: torch.randn(256, 512, requires_grad=True), {}),
}

#: name -> (kernels of its lowered int32 GEMMs, number of epilogue terms of each forward GEMM)
#: Forward: affine quantizers have nonzero zero-points on both operands (3 terms), symmetric
#: ones none (1 term); a padded convolution's input offset is added after the GEMM (2 terms).
EXPECTED = {
    "linear-affine_zero": ({"aten._int_mm"}, 3),
    "linear-affine": ({"aten._int_mm"}, 3),
    "linear-symmetric": ({"aten._int_mm"}, 1),
    "gpt-affine_zero": ({"aten._int_mm", "fqt.bmm_int8"}, 3),
    "gpt-symmetric": ({"aten._int_mm", "fqt.bmm_int8"}, 1),
    "conv": ({"im2col+fqt.mm_int8"}, 2),
    "amx": ({"fqt.int_mm_amx"}, 3),
}


def _needs(case: str) -> None:
    if case == "amx" and not amx.available():
        pytest.skip(f"AMX kernel not available: {amx.status()}")


@pytest.fixture(scope="module")
def compiled():
    """``compiled(case, emit=False)``: the case's model compiled and stepped once, shared by
    the module's tests."""
    cache: dict[tuple[str, bool], Compiled] = {}

    def get(case: str, emit: bool = False) -> Compiled:
        _needs(case)
        if (case, emit) not in cache:
            model_fn, x_fn, opts = CASES[case]
            torch.manual_seed(0)
            model, x = model_fn(), x_fn()
            cache[case, emit] = _step(model, x, FQTConfig(compiler="eager", **opts), emit=emit)
        return cache[case, emit]

    return get


def _int32_epilogues(gm: fx.GraphModule) -> list[tuple[fx.Node, Any]]:
    """(node, decision) for each lowered GEMM's epilogue output whose kernel is int32-out."""
    out = []
    for n in gm.graph.nodes:
        d = n.meta.get("fqt_lowering")
        if d is not None and d.lowered and d.kernel.removeprefix("im2col+") in INT32_KERNELS:
            out.append((n, d))
    return out


def _prod(ts: list[torch.Tensor]) -> torch.Tensor:
    """The product of a side's factor values, 1.0 for none (as emit_terms)."""
    p = torch.ones((), dtype=f32)
    for t in ts:
        p = p * t
    return p


def _epilogue_value(acc: torch.Tensor, rows: list[torch.Tensor], cols: list[torch.Tensor],
                    shape: Any) -> tuple[torch.Tensor, float]:
    """The reference epilogue (as the C kernels compute it) in ``shape``, and the largest
    term's magnitude (the tolerance's scale)."""
    ref = epilogue_reference(acc, rows, cols).reshape(shape)
    scale = (acc.float() * rows[0] * cols[0]).abs().max().item()
    for r, c in zip(rows[1:], cols[1:]):
        scale = max(scale, (r * c).abs().max().item())
    return ref, scale


def _assert_epilogue_value(acc, rows, cols, out: torch.Tensor, what: str) -> None:
    ref, scale = _epilogue_value(acc, rows, cols, out.shape)
    err = (ref - out).abs().max().item()
    assert err <= RTOL * max(scale, 1e-30), f"{what}: max |ref - out| = {err:.3g}, largest term {scale:.3g}"


def _match_values(ep: EpilogueMatch, vals: dict[fx.Node, Any]) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """The run-time values of a match: acc, and each term's row and column products."""
    return vals[ep.acc], [_prod([vals[f] for f in r]) for r in ep.rows], [_prod([vals[f] for f in c]) for c in ep.cols]


# ---------------------------------------------------------------------------------------------
# 1. real lowered graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_int32_epilogue_of_a_lowered_graph_matches_and_computes_the_graph_value(compiled, case):
    """Guards the matcher against what lower_int_gemm really emits: every int32-out lowered
    GEMM of the forward and backward graphs is matched, with ``acc`` the int32 product node of
    the decision's kernel and 1..MAX_EPILOGUE_TERMS terms, and the match evaluated on the step's
    values gives the graph's own float result. Forward term counts: 3 with affine quantizers,
    1 with symmetric ones (2 for a padded convolution)."""
    c = compiled(case)
    kernels, fwd_terms = EXPECTED[case]
    seen_kernels = set()
    for kind in ("forward", "backward"):
        gm = c.graph(kind)
        epilogues = _int32_epilogues(gm)
        lowered = [d for d in dict(c.record.aten_passes[kind])["lower_int_gemm"].lowered
                   if d.kernel.removeprefix("im2col+") in INT32_KERNELS]
        assert epilogues and len(epilogues) == len(lowered), (kind, [d.tag for _, d in epilogues],
                                                              [d.tag for d in lowered])
        for n, d in epilogues:
            what = f"{case} {kind} {d.tag} ({d.kernel})"
            seen_kernels.add(d.kernel)
            ep = match_epilogue(n)
            assert ep is not None, f"{what}: no match\n{gm.code}"
            assert ep.out is n
            acc_val = ep.acc.meta["val"]
            assert acc_val.dtype == torch.int32 and acc_val.dim() in (2, 3), what
            producer = ep.acc.args[0] if ep.acc.target is operator.getitem else ep.acc  # int_mm_amx_sums' [0]
            name = str(producer.target).removesuffix(".default").removesuffix("_sums")
            assert name == d.kernel.removeprefix("im2col+"), (what, producer.target)
            # acc is the GEMM whose float cast heads the epilogue, and no other int32 product
            (cast,) = [u for u in ep.acc.users if u.target is _convert]
            assert cast.args[1] == f32 and len(cast.users) == 1
            assert 1 <= len(ep.rows) == len(ep.cols) <= MAX_EPILOGUE_TERMS, what
            if kind == "forward":
                assert len(ep.rows) == fwd_terms, what
            else:  # gradient quantizers are stochastic affine ones: a zero-point term at least
                assert 2 <= len(ep.rows) <= 3, what
            acc, rows, cols = _match_values(ep, c.values[kind])
            assert not isinstance(acc, FakeTensor) and acc.dtype == torch.int32
            assert tuple(acc.shape) == tuple(acc_val.shape)
            # the product term is not 0 (else the check would not see acc or its factors)
            assert (acc.float() * rows[0] * cols[0]).abs().max() > 0, what
            _assert_epilogue_value(acc, rows, cols, c.values[kind][n], what)
    assert seen_kernels == kernels


@pytest.mark.parametrize("case", ["gpt-affine_zero", "linear-symmetric"])
def test_factors_sit_on_the_side_they_broadcast_along(compiled, case):
    """Guards the row/column split: every factor of ``rows`` broadcasts along the rows of the
    (B, M, N) product (its last dim is 1) or is a scalar, every factor of ``cols`` along the
    columns (its second-to-last dim is 1); the 3-D attention products have column factors
    (grad_weight of q@k and p@v: per-column gradient scales), and all shapes hold at run time."""
    c = compiled(case)
    col_factors = 0
    for kind in ("forward", "backward"):
        vals = c.values[kind]
        for n, d in _int32_epilogues(c.graph(kind)):
            ep = match_epilogue(n)
            b_m_n = tuple(ep.acc.meta["val"].shape)
            m, nn_ = b_m_n[-2:]
            for r in ep.rows:
                for f in r:
                    v = vals[f]
                    assert v.numel() == 1 or (v.shape[-1] == 1 and v.shape[-2] == m), (d.tag, f.name, v.shape)
            for col in ep.cols:
                for f in col:
                    v = vals[f]
                    assert v.numel() > 1 and v.shape[-2] == 1 and v.shape[-1] == nn_, (d.tag, f.name, v.shape)
                    col_factors += 1
    assert col_factors > 0


def test_match_epilogue_does_not_change_the_graph(compiled):
    """Guards that matching is read-only: fuse_softmax calls it on candidates it may then
    leave alone."""
    gm = compiled("gpt-affine_zero").graph("backward")
    before = [(n.name, n.target, n.args, len(n.users)) for n in gm.graph.nodes]
    for n in gm.graph.nodes:
        match_epilogue(n)
    assert [(n.name, n.target, n.args, len(n.users)) for n in gm.graph.nodes] == before


def test_whatever_matches_in_a_real_graph_computes_that_node(compiled):
    """Guards against false positives on real graphs: any node at all that match_epilogue
    accepts is computed by its match (int32 product and factors) -- the lowered epilogues'
    outputs, and also the sub-chains and extensions the form admits (``acc * sA``, a bias added
    to a lowered output: a column term) -- and the simulated GEMMs (conv grad_weight) do not
    match."""
    for case in ("gpt-affine_zero", "conv"):
        c = compiled(case)
        for kind in ("forward", "backward"):
            gm, vals = c.graph(kind), c.values[kind]
            lowered = {n for n, _ in _int32_epilogues(gm)}
            for n in gm.graph.nodes:
                ep = match_epilogue(n)
                if ep is None:
                    assert n not in lowered
                    continue
                assert ep.out is n and ep.acc.meta["val"].dtype == torch.int32
                assert 1 <= len(ep.rows) == len(ep.cols) <= MAX_EPILOGUE_TERMS
                _assert_epilogue_value(*_match_values(ep, vals), vals[n], f"{case} {kind} {n.format_node()}")
        simulated = [n for n in c.graph("backward").graph.nodes
                     if "fqt_lowering" in n.meta and not n.meta["fqt_lowering"].lowered]
        for n in simulated:
            assert match_epilogue(n) is None, n.format_node()
        if case == "conv":
            assert simulated  # conv grad_weight stays simulated (per-column Q_b2 varies along K)


def test_the_numeric_check_detects_a_dropped_term(compiled):
    """Guards the tolerance of the numeric check above: the same values with the largest
    zero-point term left out are well outside it, for every epilogue of the affine GPT graphs."""
    c = compiled("gpt-affine_zero")
    checked = 0
    for kind in ("forward", "backward"):
        vals = c.values[kind]
        for n, d in _int32_epilogues(c.graph(kind)):
            ep = match_epilogue(n)
            acc, rows, cols = _match_values(ep, vals)
            t = max(range(1, len(rows)), key=lambda i: (rows[i] * cols[i]).abs().max().item())
            with pytest.raises(AssertionError):
                _assert_epilogue_value(acc, rows[:t] + rows[t + 1:], cols[:t] + cols[t + 1:], vals[n], d.tag)
            checked += 1
    assert checked > 0


class _Scores(nn.Module):
    """Attention scores q @ k^T of two activations (a batched product, K = 16 static)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.transpose(-1, -2)


@pytest.mark.parametrize("case", ["linear", "scores"])
def test_dynamic_shapes_match_and_the_float_out_kernel_does_not(case):
    """Guards symbolic shapes (``dynamic=True``): the int32 epilogues still match, with M (and
    for the scores M = N, one symbol, and B) SymInts, and compute the graph's values; the
    ``fqt.int_mm`` lowering (dynamic K: float32 out, no int32 product in the graph) is not an
    epilogue the kernels can take, so it returns None."""
    torch.manual_seed(0)
    if case == "linear":
        c = _step(MLP(16, 32, 8, 1), torch.randn(4, 16), FQTConfig(compiler="eager"), dynamic=True)
    else:  # batch and sequence dynamic, K (the head dim) static
        q, k = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 8, 16, requires_grad=True)
        for t in (q, k):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 1)
        c = _step(_Scores(), (q, k), FQTConfig(compiler="eager"))
    kinds = set()
    for kind in ("forward", "backward"):
        vals = c.values[kind]
        for n in c.graph(kind).graph.nodes:
            d = n.meta.get("fqt_lowering")
            if d is None or not d.lowered:
                continue
            kinds.add(d.kernel)
            ep = match_epilogue(n)
            if d.kernel == "fqt.int_mm":
                assert ep is None, d.tag
            else:
                assert ep is not None and isinstance(ep.acc.meta["val"].shape[-2], torch.SymInt), d.tag
                _assert_epilogue_value(*_match_values(ep, vals), vals[n], d.tag)
    assert kinds == ({"aten._int_mm", "fqt.int_mm"} if case == "linear" else {"fqt.bmm_int8", "fqt.int_mm"})


@pytest.mark.skipif(not softmax_quant.available(), reason=f"fused softmax kernel {softmax_quant.status()}")
def test_fused_softmax_backward_takes_the_matched_int32_product_and_emitted_terms():
    """Guards the pass's one user: in the fused GPT backward, the softmax-backward kernel's
    gradient argument is the dP GEMM's int32 product (fqt.bmm_int8) with one row and one column
    product per term, row products (B, M, 1)-broadcastable, column products (B, 1, N), and the
    float dP epilogue is gone from the graph."""
    torch.manual_seed(0)
    c = _step(_gpt(), _tokens(), FQTConfig(compiler="eager"), fusions=True)
    gm = c.graph("backward")
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.fqt.softmax_backward_sr_quantize.default]
    acc, rows, cols = node.args[0], node.args[6], node.args[7]
    assert acc.target is torch.ops.fqt.bmm_int8.default and acc.meta["val"].dtype == torch.int32
    b, m, n_ = acc.meta["val"].shape
    assert 1 <= len(rows) == len(cols) <= MAX_EPILOGUE_TERMS
    vals = c.values["backward"]
    for r, col in zip(rows, cols):
        assert torch.broadcast_shapes(vals[r].shape, (b, m, 1)) == (b, m, 1), vals[r].shape
        assert torch.broadcast_shapes(vals[col].shape, (b, 1, n_)) == (b, 1, n_), vals[col].shape
    assert not [u for u in acc.users if u.target is _convert]  # the float dP is never formed
    tags = {n.meta["fqt_lowering"].tag for n, _ in _int32_epilogues(gm)}
    assert "blocks.0[p@v]:grad_input" not in tags


# ---------------------------------------------------------------------------------------------
# 2. hand-built graphs
# ---------------------------------------------------------------------------------------------


class _Builder:
    """An fx graph built by hand; each node's ``meta["val"]`` is its op run on its arguments'
    values: real tensors, or fake ones under ``mode``."""

    def __init__(self, mode: FakeTensorMode | None = None) -> None:
        self.graph = fx.Graph()
        self.mode = mode

    def value(self, name: str, t: torch.Tensor) -> fx.Node:
        """A placeholder (after the others) holding ``t``."""
        nodes = list(self.graph.nodes)
        ph = [n for n in nodes if n.op == "placeholder"]
        where = self.graph.inserting_after(ph[-1]) if ph else self.graph.inserting_before(nodes[0] if nodes else None)
        with where:
            n = self.graph.placeholder(name)
        n.meta["val"] = self.mode.from_tensor(t) if self.mode is not None else t
        return n

    def __call__(self, target: Any, *args: Any, before: fx.Node | None = None) -> fx.Node:
        """A call of ``target`` before ``before`` (default: before the output, or at the end)."""
        if before is None:
            before = _output_node(self.graph)
        # (no output yet: the graph's default insertion point, its end)
        with self.graph.inserting_before(before) if before is not None else contextlib.nullcontext():
            n = self.graph.call_function(target, args)
        vargs = fx.node.map_arg(args, lambda a: a.meta["val"])
        with self.mode if self.mode is not None else contextlib.nullcontext():
            n.meta["val"] = target(*vargs)
        return n

    def replace(self, old: fx.Node, target: Any, *args: Any) -> fx.Node:
        """``old`` replaced by a new call of ``target`` at its place."""
        new = self(target, *args, before=old)
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)
        self.graph.lint()
        return new

    def real(self) -> dict[fx.Node, torch.Tensor]:
        """Every node's value (real meta vals only)."""
        return {n: n.meta["val"] for n in self.graph.nodes if "val" in n.meta}


def _output_node(graph: fx.Graph) -> fx.Node | None:
    return next((n for n in reversed(graph.nodes) if n.op == "output"), None)


@dataclass
class _Epi:
    b: _Builder
    nodes: dict[str, fx.Node]
    out: fx.Node
    rows: list[list[fx.Node]]  # expected match
    cols: list[list[fx.Node]]


def _lowered_epilogue(mode: FakeTensorMode | None = None, *, batch: int | None = None, m: int = 8, k: int = 16,
                      n: int = 8, extra: int = 0) -> _Epi:
    """``out = convert(acc) * sA * sB + rowsum * sA * oB + colsum * oA [+ r_i * c_i ...]``, the
    shape lower_int_gemm writes, with per-row ``sA``/``oA`` and per-column ``sB``/``oB`` (2-D
    ones broadcast over the batch of a 3-D product), and ``extra`` more terms."""
    torch.manual_seed(3)
    b = _Builder(mode)
    lead = () if batch is None else (batch,)
    a_codes = b.value("a", torch.randint(-128, 128, (*lead, m, k), dtype=torch.int8))
    b_codes = b.value("b", torch.randint(-128, 128, (*lead, k, n), dtype=torch.int8))
    s_a = b.value("sA", torch.rand(*lead, m, 1) + 0.5)
    o_a = b.value("oA", torch.randn(*lead, m, 1))
    s_b = b.value("sB", torch.rand(1, n) + 0.5)  # 2-D: broadcasts over a batch
    o_b = b.value("oB", torch.randn(*lead, 1, n))
    rowsum = b.value("rowsum", a_codes.meta["val"].float().sum(-1, keepdim=True) if mode is None
                     else torch.randn(*lead, m, 1))
    colsum = b.value("colsum", torch.randn(*lead, 1, n))
    acc = b(aten._int_mm.default if batch is None else torch.ops.fqt.bmm_int8.default, a_codes, b_codes)
    accf = b(_convert, acc, f32)
    inner = b(aten.mul.Tensor, accf, s_a)
    head = b(aten.mul.Tensor, inner, s_b)
    t1_inner = b(aten.mul.Tensor, rowsum, s_a)
    t1 = b(aten.mul.Tensor, t1_inner, o_b)
    add1 = b(aten.add.Tensor, head, t1)
    t2 = b(aten.mul.Tensor, colsum, o_a)
    out = b(aten.add.Tensor, add1, t2)
    rows, cols = [[s_a], [rowsum, s_a], [o_a]], [[s_b], [o_b], [colsum]]
    nodes = dict(a=a_codes, b=b_codes, sA=s_a, oA=o_a, sB=s_b, oB=o_b, rowsum=rowsum, colsum=colsum, acc=acc,
                 accf=accf, inner=inner, head=head, t1_inner=t1_inner, t1=t1, add1=add1, t2=t2)
    for i in range(extra):
        r = b.value(f"r{i}", torch.randn(*lead, m, 1))
        c = b.value(f"c{i}", torch.randn(1, n))
        out = b(aten.add.Tensor, out, b(aten.mul.Tensor, r, c))
        rows.append([r])
        cols.append([c])
    b.graph.output(out)
    return _Epi(b, nodes, out, rows, cols)


@pytest.mark.parametrize("batch", [None, 3])
def test_hand_built_epilogue_matches_with_the_expected_factors(batch):
    """Guards the positive control of the hand-built cases below: the epilogue lower_int_gemm
    writes, 2-D and 3-D, matches with its factors in graph order, each on its side (scalars and
    (M, 1) factors rows, (1, N) columns), and evaluates to the graph's value."""
    e = _lowered_epilogue(batch=batch)
    ep = match_epilogue(e.out)
    assert ep is not None
    assert ep.acc is e.nodes["acc"] and ep.out is e.out
    assert ep.rows == e.rows and ep.cols == e.cols
    _assert_epilogue_value(*_match_values(ep, e.b.real()), e.out.meta["val"], "hand-built")


def test_extra_users_of_the_output_and_of_the_int32_product_are_allowed():
    """Guards against over-rejection: the epilogue's output and the int32 product itself may
    have other readers (neither is an intermediate the kernel replaces)."""
    e = _lowered_epilogue()
    for node in (e.out, e.nodes["acc"]):
        e.b(aten.neg.default, node)
    assert match_epilogue(e.out) is not None


def test_plain_float_graphs_do_not_match():
    """Guards that a float add/mul chain of the same shape, with no int32 product, or with an
    int32 tensor that no integer GEMM produced, or cast to another dtype, is not an epilogue."""
    b = _Builder()
    x = b.value("x", torch.randn(8, 8))
    r, c = b.value("r", torch.randn(8, 1)), b.value("c", torch.randn(1, 8))
    out = b(aten.add.Tensor, b(aten.mul.Tensor, b(aten.mul.Tensor, x, r), c), b(aten.mul.Tensor, r, c))
    assert match_epilogue(out) is None
    assert match_epilogue(b(aten.mul.Tensor, x, r)) is None
    # int32, but a placeholder rather than an integer GEMM
    xi = b.value("xi", torch.randint(-9, 9, (8, 8), dtype=torch.int32))
    assert match_epilogue(b(aten.mul.Tensor, b(_convert, xi, f32), r)) is None
    # an integer GEMM cast to float64
    a8, b8 = (b.value(nm, torch.randint(-9, 9, (8, 8), dtype=torch.int8)) for nm in ("a8", "b8"))
    acc = b(aten._int_mm.default, a8, b8)
    r64 = b.value("r64", torch.randn(8, 1, dtype=torch.float64))
    assert match_epilogue(b(aten.mul.Tensor, b(_convert, acc, torch.float64), r64)) is None
    # two int32 products in one head
    acc2 = b(aten._int_mm.default, b8, a8)
    assert match_epilogue(b(aten.mul.Tensor, b(_convert, acc, f32), b(_convert, acc2, f32))) is None


@pytest.mark.parametrize("op", ["alpha", "sub"])
def test_a_sum_that_is_not_a_plain_add_does_not_match(op):
    """Guards the chain of sums: ``add(x, t, alpha=2)`` (a scaled term) and ``sub(x, t)`` are not
    ``x + t``; the epilogue ending in one is not matched (as a chain of plain adds, it would be
    computed wrongly)."""
    e = _lowered_epilogue()
    g = e.b.graph
    old = e.out
    with g.inserting_before(old):
        new = g.call_function(aten.add.Tensor, old.args, {"alpha": 2.0}) if op == "alpha" else \
            g.call_function(aten.sub.Tensor, old.args)
    new.meta["val"] = old.meta["val"]
    old.replace_all_uses_with(new)
    g.erase_node(old)
    g.lint()
    assert match_epilogue(new) is None
    assert match_epilogue(e.nodes["add1"]) is not None  # the plain-add part still matches


@pytest.mark.parametrize("which", ["add1", "head", "inner", "accf"])
def test_an_intermediate_node_with_a_second_user_does_not_match(which):
    """Guards that the kernel may drop the epilogue's intermediates: if the partial sum, the
    head product, its inner product acc*sA or the float cast of acc has another reader, the
    float value is needed anyway and the match is None."""
    e = _lowered_epilogue()
    e.b(aten.neg.default, e.nodes[which])
    assert match_epilogue(e.out) is None


@pytest.mark.parametrize("where", ["head", "term"])
def test_a_python_scalar_factor_does_not_match(where):
    """Guards that every factor is a graph node (the kernels take tensors): ``mul(x, 0.5)`` in
    the head or in a term gives None."""
    e = _lowered_epilogue()
    if where == "head":  # acc * sA * 0.5 in place of acc * sA * sB
        e.b.replace(e.nodes["head"], aten.mul.Tensor, e.nodes["inner"], 0.5)
    else:  # colsum * 2.0 in place of colsum * oA
        e.b.replace(e.nodes["t2"], aten.mul.Tensor, e.nodes["colsum"], 2.0)
    assert match_epilogue(e.out) is None


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("m,n", [(1, 8), (8, 1), (1, 1)])
def test_a_product_with_one_row_or_one_column_does_not_match(batch, m, n):
    """Guards M = 1 / N = 1 (2-D and 3-D): a (1, 1) factor would be both a row and a column
    factor, so the form is rejected."""
    e = _lowered_epilogue(batch=batch, m=m, n=n)
    assert match_epilogue(e.out) is None


def test_more_terms_than_the_kernels_take_do_not_match():
    """Guards MAX_EPILOGUE_TERMS: exactly that many terms match (all of them kept, in order),
    one more gives None."""
    base = 3  # the head and the two zero-point terms
    e = _lowered_epilogue(extra=MAX_EPILOGUE_TERMS - base)
    ep = match_epilogue(e.out)
    assert ep is not None and len(ep.rows) == len(ep.cols) == MAX_EPILOGUE_TERMS
    assert ep.rows == e.rows and ep.cols == e.cols
    _assert_epilogue_value(*_match_values(ep, e.b.real()), e.out.meta["val"], "max terms")
    assert match_epilogue(_lowered_epilogue(extra=MAX_EPILOGUE_TERMS - base + 1).out) is None


@pytest.mark.parametrize("batch,shape,dtype", [
    (None, (8, 8), f32),  # as large as the product
    (3, (8, 8), f32),
    (3, (3, 8, 8), f32),
    (None, (2, 8, 1), f32),  # a batch the (M, N) product does not have
    (None, (2, 1, 8), f32),
    (None, (1, 1, 8, 1), f32),  # more than 3 dims
    (None, (1, 8), torch.float64),  # not float32
    (3, (), torch.float64),
])
def test_a_factor_of_another_shape_or_dtype_does_not_match(batch, shape, dtype):
    """Guards the side classification: a factor as large as the product, one with a batch
    the product does not have, with more than 3 dims, or not float32 is neither a row nor a
    column factor (the kernels read (B?, M, 1) / (B?, 1, N) float32 vectors)."""
    e = _lowered_epilogue(batch=batch)
    f = e.b.value("f", torch.randn(shape, dtype=dtype))
    e.b.replace(e.nodes["t2"], aten.mul.Tensor, e.nodes["colsum"], f)
    assert match_epilogue(e.out) is None


def test_fake_tensor_values_match_like_real_ones():
    """Guards that the matcher reads only shapes and dtypes: the same epilogue with fake
    ``meta["val"]`` (as in the backend's graphs) gives the same match."""
    e = _lowered_epilogue(FakeTensorMode(), batch=2)
    assert isinstance(e.nodes["acc"].meta["val"], FakeTensor)
    ep = match_epilogue(e.out)
    assert ep is not None and ep.rows == e.rows and ep.cols == e.cols


# ---------------------------------------------------------------------------------------------
# 3. emit_terms
# ---------------------------------------------------------------------------------------------


def _side_shape(shape, b: int, m: int, n: int, side: str) -> bool:
    """Whether ``shape`` broadcasts to (b, m, 1) (rows) or (b, 1, n) (cols) without growing."""
    full = (b, m, 1) if side == "rows" else (b, 1, n)
    return len(shape) <= 3 and torch.broadcast_shapes(tuple(shape), full) == full


@pytest.mark.parametrize("batch", [None, 2])
def test_emit_terms_with_a_fake_mode_gives_each_product_its_shape(batch):
    """Guards emit_terms' nodes: one row product and one column product per term, each with a
    fake ``meta["val"]`` of the broadcast shape of its factors, a single factor passed through
    as itself, and inserted at the insertion point (the graph still lints)."""
    mode = FakeTensorMode()
    e = _lowered_epilogue(mode, batch=batch)
    ep = match_epilogue(e.out)
    with e.b.graph.inserting_before(e.out):
        rows, cols = emit_terms(e.b.graph, ep, mode)
    e.b.graph.lint()
    lead = () if batch is None else (batch,)
    m, n = 8, 8
    assert len(rows) == len(cols) == 3
    assert rows[0] is e.nodes["sA"] and cols[0] is e.nodes["sB"] and cols[1] is e.nodes["oB"]
    assert rows[2] is e.nodes["oA"] and cols[2] is e.nodes["colsum"]
    assert rows[1].target is aten.mul.Tensor and rows[1].args == (e.nodes["rowsum"], e.nodes["sA"])
    assert isinstance(rows[1].meta["val"], FakeTensor) and tuple(rows[1].meta["val"].shape) == (*lead, m, 1)
    for r, c in zip(rows, cols):
        assert _side_shape(r.meta["val"].shape, batch or 1, m, n, "rows")
        assert _side_shape(c.meta["val"].shape, batch or 1, m, n, "cols")
        assert r.meta["val"].dtype == c.meta["val"].dtype == f32


def test_emit_terms_gives_an_empty_side_a_scalar_one():
    """Guards the empty side: a term without column factors (symmetric quantizers: the head is
    acc * sA * sB with scalar scales, all on the row side) gets ``scalar_tensor(1.0)`` float32 on
    the product's device, with a () fake value; its row side the product of the scalars."""
    mode = FakeTensorMode()
    b = _Builder(mode)
    a8 = b.value("a", torch.randint(-128, 128, (2, 8, 16), dtype=torch.int8))
    b8 = b.value("b", torch.randint(-128, 128, (2, 16, 8), dtype=torch.int8))
    s_a, s_b = b.value("sA", torch.tensor(0.5)), b.value("sB", torch.tensor(0.25))
    acc = b(torch.ops.fqt.bmm_int8.default, a8, b8)
    out = b(aten.mul.Tensor, b(aten.mul.Tensor, b(_convert, acc, f32), s_a), s_b)
    b.graph.output(out)
    ep = match_epilogue(out)
    assert ep is not None and ep.rows == [[s_a, s_b]] and ep.cols == [[]]
    with b.graph.inserting_before(out):
        (row,), (col,) = emit_terms(b.graph, ep, mode)
    b.graph.lint()
    assert col.target is aten.scalar_tensor.default and col.args == (1.0,)
    assert col.kwargs == {"dtype": f32, "device": torch.device("cpu")}
    assert tuple(col.meta["val"].shape) == () and col.meta["val"].dtype == f32
    assert row.target is aten.mul.Tensor and row.args == (s_a, s_b) and tuple(row.meta["val"].shape) == ()


def test_emit_terms_without_a_fake_mode_computes_the_epilogue():
    """Guards emit_terms with ``fake_mode=None``: the same nodes are emitted (no values are
    computed at emission), and running the graph gives products that, through the reference
    epilogue, reproduce the graph's own result."""
    e = _lowered_epilogue(batch=2, extra=1)
    g = e.b.graph
    ep = match_epilogue(e.out)
    with g.inserting_before(e.out):
        rows, cols = emit_terms(g, ep, None)
    _output_node(g).args = ((e.out, *rows, *cols),)
    g.lint()
    gm = fx.GraphModule(nn.Module(), g)
    inputs = [n.meta["val"] for n in g.nodes if n.op == "placeholder"]
    out, *sides = gm(*inputs)
    torch.testing.assert_close(out, e.out.meta["val"], rtol=0, atol=0)
    acc = e.nodes["acc"].meta["val"]
    _assert_epilogue_value(acc, sides[: len(rows)], sides[len(rows):], out, "emitted, no fake mode")


@pytest.mark.parametrize("case", ["gpt-affine_zero", "gpt-symmetric", "conv"])
def test_emit_terms_on_real_graphs_computes_the_epilogue_in_the_step(compiled, case):
    """Guards emit_terms on the backend's graphs (their fake mode): for every matched epilogue
    the emitted products' fake values have the shapes the step computes, row products
    broadcast along rows, column products along columns, and acc with them gives the graph's
    float result."""
    c = compiled(case, emit=True)
    total = 0
    for kind in ("forward", "backward"):
        vals = c.values[kind]
        assert c.emitted[kind]
        for ep, rows, cols in c.emitted[kind]:
            acc_shape = tuple(ep.acc.meta["val"].shape)
            bb, m, n = (1, *acc_shape) if len(acc_shape) == 2 else acc_shape
            for side, nodes in (("rows", rows), ("cols", cols)):
                for p in nodes:
                    assert isinstance(p.meta["val"], FakeTensor)
                    assert tuple(p.meta["val"].shape) == tuple(vals[p].shape), (p.name, vals[p].shape)
                    assert _side_shape(vals[p].shape, bb, m, n, side), (side, p.name, vals[p].shape)
            _assert_epilogue_value(vals[ep.acc], [vals[r] for r in rows], [vals[col] for col in cols], vals[ep.out],
                                   f"{case} {kind} {ep.out.meta['fqt_lowering'].tag}")
            total += 1
    assert total == sum(len(_int32_epilogues(c.graph(k))) for k in ("forward", "backward"))
