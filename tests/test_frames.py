"""fqt_compile.frames: graphs that dynamo compiles for a submodule's frame (after a graph break
inside its forward) get full module paths, and overrides reach each instance of the submodule
even where one dynamo graph runs for all of them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fqt_compile
from fqt_compile import FQTConfig, Override
from fqt_compile.frames import InstanceDispatch, _relative_param_path, _split
from fqt_compile.inspect import report_from_records


class BreakingChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = BreakingChild(), BreakingChild()

    def forward(self, x):
        return self.dec(self.enc(x))


class SharedChild(nn.Module):
    """One BreakingChild registered under two names: its frame has two paths."""

    def __init__(self):
        super().__init__()
        self.enc = BreakingChild()
        self.dec = self.enc

    def forward(self, x):
        return self.dec(self.enc(x))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "fqt_compile" in str(w.message)]


def test_relative_paths_of_dynamo_sources():
    assert _relative_param_path("L['self']._modules['a']._parameters['weight']") == "a.weight"
    assert _relative_param_path("L['self']._parameters['weight']") == "weight"
    assert _relative_param_path("L['self']._modules['layers']._modules['0']._parameters['bias']") == "layers.0.bias"
    assert _split("enc.a.weight", "a.weight") == "enc"
    assert _split("a.weight", "a.weight") == ""
    assert _split("enc.xa.weight", "a.weight") is None  # whole components only
    # a frame whose module came in positionally (a decorator's ``wrapper(*args, **kwargs)``)
    assert _relative_param_path("L['args'][0]._modules['h']._modules['0']._parameters['weight']") == "h.0.weight"


def _run_child(*args):
    """A helper that takes the module positionally (as transformers' decorators' wrappers do,
    ``wrapper(*args, **kwargs)``), with a graph break inside."""
    child, x = args
    x = child.a(x)
    torch._dynamo.graph_break()
    return child.b(x)


class PositionalEncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Module(), nn.Module()
        for m in (self.enc, self.dec):
            m.a, m.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return _run_child(self.dec, _run_child(self.enc, x))


def test_a_frame_whose_module_came_in_positionally_gets_full_paths():
    """A graph break inside a function that takes the module positionally: where dynamo compiles
    that function as a frame of its own (torch 2.11: no resuming inside an inlined call), its
    parameters' sources start at ``L['args'][0]``. Their paths were read as "0.a", ..., so no
    prefix fitted and the records named "0.b" (found on torch 2.11, where transformers'
    decorators took GPT-2 there after a T5 model had been compiled). Now every decision names
    its full path and the override reaches its instance."""
    torch._dynamo.reset()
    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    model = fqt_compile.compile(PositionalEncDec(), cfg)
    _step(model, torch.randn(4, 8))
    decisions = {(d.module, d.quantized) for r in fqt_compile.records(model) for d in r.insert.decisions}
    assert decisions == {("enc.a", True), ("enc.b", True), ("dec.a", False), ("dec.b", False)}


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return y.detach()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_overrides_reach_each_instance_after_a_graph_break(compiler):
    """`dec.*` off: dec's layers run in float, enc's quantized, though dynamo compiles the
    graph after the break once for both instances (its paths are relative: `b`). Checked
    against the same model prepared by symbolic tracing (no graph break there): the forward
    (deterministic rounding) and dec's weight gradients (exact: dec is off, and its input is
    enc's forward output) agree; with the overrides missed they would not."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = FQTConfig(compiler=compiler, overrides=(Override("dec.*", mode="off"),))
    ref = EncDec()
    model = EncDec()
    model.load_state_dict(ref.state_dict())
    prepared = fqt_compile.prepare(ref, cfg)
    model = fqt_compile.compile(model, cfg)
    x = torch.randn(4, 8)
    for _ in range(2):  # the second step runs the compiled graphs again
        y, msgs = _caught(lambda: _step(model, x))
        assert not msgs
        y_ref = _step(prepared, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        for name in ("dec.a.weight", "dec.b.weight", "dec.a.bias", "dec.b.bias"):
            torch.testing.assert_close(model.get_parameter(name).grad, prepared.get_parameter(name).grad,
                                       rtol=1e-5, atol=1e-6)
    recs = fqt_compile.records(model)
    decisions = {(d.module, d.quantized) for r in recs for d in r.insert.decisions}
    assert decisions == {("enc.a", True), ("enc.b", True), ("dec.a", False), ("dec.b", False)}
    assert {r.frame for r in recs} == {"enc", "dec"}
    # the graph after the break ran for both instances: compiled once by dynamo, in two variants
    after_break = [r for r in recs if any(d.module.endswith(".b") for d in r.insert.decisions)]
    assert sorted(r.instances for r in after_break) == [("dec",), ("enc",)]
    report = report_from_records(recs, model="EncDec")
    assert "enc.b" in report.format() and "dec.b" in report.format()
    assert report.row("dec.b").reason == "mode 'off' (override 'dec.*')"
    assert {"frame": "dec", "instances": ["dec"]} in report.to_dict()["frames"]
    assert "Submodule frames: " in report.format() and "enc (for enc)" in report.format()


def test_instances_alike_share_one_variant_with_full_paths():
    """Without overrides that tell the instances apart there is one variant, named with the
    first instance's full paths and listing the instances it holds for."""
    torch._dynamo.reset()
    model = fqt_compile.compile(EncDec(), FQTConfig(compiler="eager", overrides=(Override("*.a", mode="off"),)))
    _, msgs = _caught(lambda: _step(model, torch.randn(4, 8)))
    assert not msgs
    recs = fqt_compile.records(model)
    assert all(r.instances == ("enc", "dec") for r in recs)
    decisions = [(d.module, d.quantized) for r in recs for d in r.insert.decisions]
    # dynamo compiles the frame before the break again for dec (named dec.a), the one after it
    # once, run for both (named enc.b)
    assert sorted(decisions) == [("dec.a", False), ("enc.a", False), ("enc.b", True)]


def test_dispatch_follows_replaced_parameters():
    """A parameter replaced after the compile (a new nn.Parameter object) is looked up again:
    dec still runs dec's variant (float, so its output equals the float layer's)."""
    torch._dynamo.reset()
    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    model = fqt_compile.compile(EncDec(), cfg)
    x = torch.randn(4, 8)
    _step(model, x)
    with torch.no_grad():
        model.dec.b.weight = nn.Parameter(model.dec.b.weight.clone() * 2)
    seen = []
    original = InstanceDispatch.__call__

    def spy(self, *args):
        param = args[self.arg_index]
        before = self._lookup(param)
        out = original(self, *args)
        seen.append((before, self._lookup(param), dict(self._variants)))
        return out

    InstanceDispatch.__call__ = spy
    try:
        _, msgs = _caught(lambda: _step(model, x))
    finally:
        InstanceDispatch.__call__ = original
    assert not msgs
    # the dispatcher of the graph after the break met the new parameter unindexed, and ran
    # dec's variant for it
    assert any(before is None and after is variants[("dec",)] for before, after, variants in seen)


def test_a_module_under_two_names_warns_when_the_overrides_differ():
    """A submodule registered under two names (`enc`, `dec`: one object) is one instance: a call
    cannot tell which name it runs under. Where the overrides treat the names differently a
    warning says so, and the graph runs as compiled for the first group; where they agree
    there is nothing to warn about."""
    torch._dynamo.reset()
    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    model = fqt_compile.compile(SharedChild(), cfg)
    _, msgs = _caught(lambda: _step(model, torch.randn(4, 8)))
    assert any("cannot tell them apart" in m for m in msgs), msgs
    assert {r.frame for r in fqt_compile.records(model)} == {"dec"}
    torch._dynamo.reset()
    cfg = FQTConfig(compiler="eager", overrides=(Override("*.a", mode="off"),))
    model = fqt_compile.compile(SharedChild(), cfg)
    _, msgs = _caught(lambda: _step(model, torch.randn(4, 8)))
    assert not msgs
    assert {r.instances for r in fqt_compile.records(model)} == {("enc", "dec")}


def test_a_graph_runs_only_for_instances_that_have_its_modules():
    """A frame's graph that names a module only some instances of the class have (T5's
    decoder stack has cross-attention, the encoder's does not) gets no variant for the
    others."""
    torch._dynamo.reset()

    class Child(BreakingChild):
        def __init__(self, cross: bool):
            super().__init__()
            if cross:
                self.c = nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.c(self.b(x)) if hasattr(self, "c") else self.b(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = Child(False), Child(True)

        def forward(self, x):
            return self.dec(self.enc(x))

    cfg = FQTConfig(compiler="eager", overrides=(Override("enc.*", mode="off"),))
    model = fqt_compile.compile(Model(), cfg)
    _, msgs = _caught(lambda: _step(model, torch.randn(4, 8)))
    assert not msgs
    paths = {n for n, _ in model.named_modules()}
    recs = fqt_compile.records(model)
    assert all(d.module in paths for r in recs for d in r.insert.decisions)
    with_c = [r for r in recs if any(d.module.endswith(".c") for d in r.insert.decisions)]
    assert [r.instances for r in with_c] == [("dec",)]
    assert all(d.quantized == d.module.startswith("dec") for r in recs for d in r.insert.decisions)


def test_a_backend_bound_by_hand_under_torch_compile():
    """`torch.compile(model, backend=FQTBackend(cfg))` with `backend.bind(model)`: the same
    frames as fqt_compile.compile (without bind the backend does not know the model, and the
    graph after the break keeps its relative paths)."""
    from fqt_compile.backend import FQTBackend

    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    for bind in (True, False):
        torch._dynamo.reset()
        model = EncDec()
        backend = FQTBackend(cfg)
        if bind:
            backend.bind(model)
        compiled = torch.compile(model, backend=backend)
        _, msgs = _caught(lambda: _step(compiled, torch.randn(4, 8)))
        modules = {(d.module, d.quantized) for r in backend.records for d in r.insert.decisions}
        if bind:
            assert not msgs and modules == {("enc.a", True), ("enc.b", True), ("dec.a", False), ("dec.b", False)}
        else:
            assert modules == {("a", True), ("b", True)}


def test_aliases_in_one_group_still_dispatch():
    """`enc` registered twice (`enc`, `enc2`: one object, treated alike) and `dec` overridden:
    the parameters tell `dec` from the `enc` group, so each runs its own variant."""

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = BreakingChild(), BreakingChild()
            self.enc2 = self.enc

        def forward(self, x):
            return self.dec(self.enc(x))

    torch._dynamo.reset()
    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    model = fqt_compile.compile(Aliased(), cfg)
    _, msgs = _caught(lambda: _step(model, torch.randn(4, 8)))
    assert not msgs
    recs = fqt_compile.records(model)
    assert ("enc", "enc2") in {r.instances for r in recs} and ("dec",) in {r.instances for r in recs}
    assert all(d.quantized == d.module.startswith("enc") for r in recs for d in r.insert.decisions)


def test_variants_under_dynamic_shapes():
    """dynamic=True: both variants are compiled on the symbolic graph and serve every batch
    size (forward and dec's gradients equal the symbolically traced model's at 4, 6 and 9)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    ref, model = EncDec(), EncDec()
    model.load_state_dict(ref.state_dict())
    prepared = fqt_compile.prepare(ref, cfg)
    model = fqt_compile.compile(model, cfg, dynamic=True)
    for n in (4, 6, 9):
        x = torch.randn(n, 8)
        y, msgs = _caught(lambda: _step(model, x))
        assert not msgs
        torch.testing.assert_close(y, _step(prepared, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.dec.b.weight.grad, prepared.dec.b.weight.grad, rtol=1e-5, atol=1e-6)
    assert len({r.instances for r in fqt_compile.records(model)}) == 2


class CheckpointedBreakingChild(nn.Module):
    """A checkpoint region in the part of the frame before the graph break."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(self.a, x, use_reentrant=False)
        torch._dynamo.graph_break()
        return self.b(x)


class CheckpointedEncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = CheckpointedBreakingChild(), CheckpointedBreakingChild()

    def forward(self, x):
        return self.dec(self.enc(x))


def test_each_variant_rewrites_its_own_copy_of_a_checkpoint_region():
    """The frame's graph holds a checkpoint region (a body module of the graph): `dec.a` in
    the region runs in float and `enc.a` quantized: the groups of instances come from the module
    paths in the body too (``frames._module_paths``), and each variant rewrites its own copy of
    the body (``backend._copy_graph_module`` copies body modules; with the body shared, the
    second variant would run the first one's rewritten region). Checked against the model prepared by symbolic
    tracing (which traces through the checkpoint), as in the test above: the forward and dec's
    gradients agree."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = FQTConfig(compiler="eager", overrides=(Override("dec.*", mode="off"),))
    ref = CheckpointedEncDec()
    model = CheckpointedEncDec()
    model.load_state_dict(ref.state_dict())
    prepared = fqt_compile.prepare(ref, cfg)
    model = fqt_compile.compile(model, cfg)
    x = torch.randn(4, 8)
    for _ in range(2):
        y = _step(model, x)
        torch.testing.assert_close(y, _step(prepared, x), rtol=1e-5, atol=1e-6)
        for name in ("dec.a.weight", "dec.b.weight", "dec.a.bias", "dec.b.bias"):
            torch.testing.assert_close(model.get_parameter(name).grad, prepared.get_parameter(name).grad,
                                       rtol=1e-5, atol=1e-6)
    recs = fqt_compile.records(model)
    decisions = {(d.module, d.region != "", d.quantized) for r in recs for d in r.insert.decisions}
    assert decisions == {("enc.a", True, True), ("dec.a", True, False), ("enc.b", False, True), ("dec.b", False, False)}
    in_region = [r for r in recs if any(d.region for d in r.insert.decisions)]
    # a variant per instance group, each with its own body (dynamo compiles the frame again for
    # the other instance, which adds two more)
    assert {r.instances for r in in_region} == {("enc",), ("dec",)}
    with_body = [r for r in recs if isinstance(getattr(r.torch_graph, "wrap_body_0", None), torch.fx.GraphModule)]
    assert in_region == with_body  # every variant rewrote a body: its own
    assert len({id(r.torch_graph.get_submodule("wrap_body_0")) for r in in_region}) == len(in_region)
