"""Inspection report: rows and coverage for known models, the GEMM columns with and without
the lowering pass, the JSON schema, graph text and drawing, and that the model is left as it was.

Exact tier: row counts, keys, FLOPs (2 x multiply-adds, from the shapes) and coverage shares
are derived here from the model sizes, not read back from the implementation."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import fqt_compile
from fqt_compile import FQTConfig, Override
from fqt_compile.inspect import GEMMS, SCHEMA, Report, inspect, report_from_records
from fqt_compile.models import MLP, SmallCNN, TransformerBlock
from conftest import import_transformers_or_skip

PSQ8 = FQTConfig.recipe("psq8", compiler="eager")


def _mlp():
    return MLP(64, 32, 10, depth=2), torch.randn(8, 64)


def _cnn():
    return SmallCNN(width=8), torch.randn(4, 1, 8, 8)


def _block():
    return TransformerBlock(32, 4), torch.randn(2, 8, 32)


def _flops_mlp() -> dict[str, int]:
    n = 8
    return {"layers.0": 2 * n * 64 * 32, "layers.1": 2 * n * 32 * 32, "head": 2 * n * 32 * 10}


def _flops_cnn() -> dict[str, int]:
    # conv: 2 x out elements x (C_in x 3 x 3); stride-2 "down" halves the spatial size
    return {
        "stem": 2 * (4 * 8 * 8 * 8) * (1 * 9),
        "blocks.0.conv1": 2 * (4 * 8 * 8 * 8) * (8 * 9),
        "blocks.0.conv2": 2 * (4 * 8 * 8 * 8) * (8 * 9),
        "down": 2 * (4 * 16 * 4 * 4) * (8 * 9),
        "fc": 2 * 4 * 16 * 10,
    }


def _flops_block() -> dict[str, int]:
    tokens, d, heads, t = 2 * 8, 32, 4, 8
    return {
        "qkv": 2 * tokens * d * 3 * d,
        "<root>": 2 * 2 * (2 * heads * t) * t * (d // heads),  # sdpa: Q @ K^T and P @ V
        "proj": 2 * tokens * d * d,
        "fc1": 2 * tokens * d * 4 * d,
        "fc2": 2 * tokens * 4 * d * d,
    }


CASES = {
    "mlp": (_mlp, _flops_mlp, []),
    "cnn": (_cnn, _flops_cnn, ["bn", "blocks.0.bn1", "blocks.0.bn2"]),
    "block": (_block, _flops_block, ["ln1", "ln2"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rows_flops_and_coverage_of_known_models(name):
    make, flops, full_precision = CASES[name]
    torch.manual_seed(0)
    model, x = make()
    report = inspect(model, x, PSQ8)
    expected = flops()
    assert [r.key for r in report.rows] == list(expected)
    assert {r.key: r.flops for r in report.rows} == expected
    # the default recomputes the attention and fc1 (+ GELU) in the backward, and says so
    recomputed = {"<root>", "fc1"} if name == "block" else set()
    for r in report.rows:
        assert r.quantized, r.key
        if r.key in recomputed:
            assert r.reason.startswith("quantized; ") and "recomputed in the backward" in r.reason, r.reason
        else:
            assert r.reason == "quantized", (r.key, r.reason)
    assert [d["module"] for d in report.full_precision] == full_precision
    t = report.totals
    assert t["products"] == len(expected) and t["quantized"] == len(expected)
    assert t["flops"] == sum(expected.values()) and t["coverage"] == 1.0
    for r in report.rows:
        q = r.quantizers
        assert q["input"] == {"bits": 8, "scheme": "affine_zero", "granularity": "tensor"}
        assert q["grad_input"] == {"kind": "psq", "bits": 8}  # Q_b1
        assert q["grad_weight"] == {"kind": "column", "bits": 8}  # Q_b2
        assert set(r.gemms) == set(GEMMS)


def test_overrides_and_ops_show_as_full_precision_rows_and_lower_coverage():
    torch.manual_seed(0)
    model, x = _cnn()
    cfg = FQTConfig(compiler="eager", overrides=(Override("stem", mode="off"),))
    report = inspect(model, x, cfg)
    stem = report.row("stem")
    assert not stem.quantized and stem.reason == "mode 'off' (override 'stem')"
    assert stem.quantizers["input"] is None
    assert {s.status for s in stem.gemms.values()} == {"full_precision"}
    flops = _flops_cnn()
    assert report.totals["coverage"] == pytest.approx(1 - flops["stem"] / sum(flops.values()))
    assert "full precision: mode 'off' (override 'stem')  [stem]" in str(report)

    torch.manual_seed(0)
    model, x = _block()
    report = inspect(model, x, FQTConfig(compiler="eager", ops=("linear",)))
    sdpa = report.row("<root>")
    assert sdpa.op == "sdpa" and not sdpa.quantized and sdpa.reason == "op kind 'matmul' not in config.ops"
    flops = _flops_block()
    assert report.totals["coverage"] == pytest.approx(1 - flops["<root>"] / sum(flops.values()))


def test_bits_and_gradient_quantizers_of_a_recipe_are_reported():
    torch.manual_seed(0)
    model, x = _block()
    cfg = FQTConfig.recipe("bhq5", compiler="eager", weight=fqt_compile.ForwardSpec(4, "channel", symmetric=True))
    row = inspect(model, x, cfg).row("fc1")
    assert row.quantizers["weight"] == {"bits": 4, "scheme": "symmetric", "granularity": "channel"}
    assert row.quantizers["grad_input"] == {"kind": "bhq", "bits": 5}
    assert row.quantizers["grad_weight"] == {"kind": "column", "bits": 8}


def _records(model, x, cfg=PSQ8):
    fqt_compile.compile(model, cfg)
    model(x).square().mean().backward()
    return fqt_compile.records(model)


def test_gemm_columns_say_simulated_when_the_lowering_pass_did_not_run():
    torch.manual_seed(0)
    model, x = _mlp()
    recs = [dataclasses.replace(r, aten_passes={}) for r in _records(model, x)]
    report = report_from_records(recs, model="MLP")
    assert not report.lowering_pass_run
    for r in report.rows:
        for g in GEMMS:
            assert (r.gemms[g].status, r.gemms[g].reason) == ("simulated", "lowering pass not run")
    assert report.totals["lowered"] == 0.0
    assert "(lowering pass not run)" in str(report)


def test_gemm_columns_are_filled_from_a_lower_result():
    torch.manual_seed(0)
    model, x = _mlp()
    recs = _records(model, x)

    def dec(module, gemm, lowered, reason, mkn):
        return SimpleNamespace(module=module, gemm=gemm, lowered=lowered, reason=reason, mkn=mkn)

    fw = SimpleNamespace(decisions=[
        dec("layers.0", "output", True, "aten._int_mm", (8, 64, 32)),
        dec("layers.1", "output", True, "aten._int_mm", (8, 32, 32)),
        dec("head", "output", False, "per-row weight scale on K", (8, 32, 10)),
    ])  # fmt: skip
    bw = SimpleNamespace(decisions=[
        dec("layers.1", "grad_input", True, "aten._int_mm", (8, 32, 32)),
        dec("head", "grad_input", True, "aten._int_mm", (8, 10, 32)),
        dec("layers.0", "grad_weight", True, "aten._int_mm", (32, 8, 64)),
        dec("layers.1", "grad_weight", True, "aten._int_mm", (32, 8, 32)),
        # two calls of one GEMM, one lowered: weighed by M*K*N
        dec("head", "grad_weight", True, "aten._int_mm", (10, 6, 32)),
        dec("head", "grad_weight", False, "K too long", (10, 2, 32)),
    ])  # fmt: skip
    recs = [dataclasses.replace(r, aten_passes={"forward": [("lower_int_gemm", fw)], "backward": [("lower_int_gemm", bw)]})
            for r in recs]  # fmt: skip
    report = report_from_records(recs, model="MLP")
    assert report.lowering_pass_run
    head, l0 = report.row("head"), report.row("layers.0")
    assert (head.gemms["output"].status, head.gemms["output"].reason) == ("simulated", "per-row weight scale on K")
    assert head.gemms["output"].mkn == [[8, 32, 10]]
    assert head.gemms["grad_weight"].status == "partial"
    assert head.gemms["grad_weight"].lowered_fraction == pytest.approx(0.75)
    assert l0.gemms["grad_input"].status == "absent"  # the input x needs no gradient
    f = _flops_mlp()
    lowered = f["layers.0"] * 2 + f["layers.1"] * 3 + f["head"] * (1 + 0.75)
    assert report.totals["gemm_flops"] == f["layers.0"] * 2 + f["layers.1"] * 3 + f["head"] * 3
    assert report.totals["lowered"] == pytest.approx(lowered / report.totals["gemm_flops"])
    text = str(report)
    assert "simulated: per-row weight scale on K  [head:output]" in text
    assert "partial: aten._int_mm; K too long  [head:grad_weight]" in text


def test_lowered_gemms_of_an_mlp_with_the_real_pass():
    torch.manual_seed(0)
    model, x = _mlp()
    report = inspect(model, x, PSQ8)
    if not report.lowering_pass_run:
        pytest.skip("the backend runs no lower_int_gemm pass")
    # PSQ8 keeps every scale off the contracted axis: all linear GEMMs lower on CPU (DESIGN 4)
    assert report.row("head").gemms["output"].status == "lowered"
    assert report.row("layers.0").gemms["grad_input"].status == "absent"


_REPORT_KEYS = {"schema", "model", "config", "config_summary", "graphs", "training", "lowering_pass_run",
                "rows", "full_precision", "frames", "unseen_modules", "totals"}  # fmt: skip
_ROW_KEYS = {"key", "module", "node", "op", "kind", "quantized", "mode", "reason", "shapes", "out_shape",
             "flops", "quantizers", "gemms", "overrides", "region"}  # fmt: skip
_TOTAL_KEYS = {"products", "quantized", "full_precision_ops", "flops", "flops_quantized", "coverage",
               "gemm_flops", "gemm_flops_lowered", "lowered", "stochastic_quantizers", "seeds",
               "fused_softmax", "fused_softmax_backward", "fused_softmax_dropout", "fused_gelu", "fused_gelu_backward",
               "fused_quantizers", "c_kernel_quantizers", "recompute_kept_codes", "recompute_requantized",
               "counter_dropouts"}  # fmt: skip


def test_json_schema_is_stable(tmp_path):
    torch.manual_seed(0)
    model, x = _cnn()
    report = inspect(model, x, PSQ8)
    path = tmp_path / "report.json"
    data = json.loads(report.to_json(path))
    assert json.loads(path.read_text()) == data == json.loads(json.dumps(report.to_dict()))
    assert SCHEMA == "fqt_compile.inspect/1" and data["schema"] == SCHEMA
    assert set(data) == _REPORT_KEYS
    assert set(data["totals"]) == _TOTAL_KEYS
    for row in data["rows"]:
        assert set(row) == _ROW_KEYS
        assert set(row["quantizers"]) == {"input", "weight", "grad_input", "grad_weight"}
        assert set(row["quantizers"]["input"]) == {"bits", "scheme", "granularity"}
        assert set(row["quantizers"]["grad_input"]) == {"kind", "bits"}
        assert set(row["gemms"]) == {"output", "grad_input", "grad_weight"}
        for g in row["gemms"].values():
            assert set(g) == {"status", "reason", "mkn", "lowered_fraction"}
            assert g["status"] in {"lowered", "simulated", "partial", "absent", "full_precision"}
    for d in data["full_precision"]:
        assert set(d) == {"module", "node", "op", "reason"}
    assert data["frames"] == []  # no graph break inside a submodule (tests/test_frames.py has them)
    assert data["unseen_modules"] == []  # every product module of the CNN is in the graph
    assert FQTConfig.from_dict(data["config"]) == report.config


def test_printed_table_and_graph_text():
    torch.manual_seed(0)
    model, x = _cnn()
    report = inspect(model, x, PSQ8)
    text = str(report)
    for r in report.rows:
        assert r.key in text
    assert "Q_b1" in text and "grad_in" in text and "Totals:" in text and "bn  " not in text.split("Other")[0]
    assert "fqt.quantize.default" in report.forward_graph
    assert "fqt.sr_quantize.default" in report.backward_graph
    assert "fqt.sr_quantize" not in report.forward_graph
    # every stochastic quantizer of the backward reads a seed of its own: 2 per conv, less the
    # stem's grad_input, as nodes; the linear head's two in one fused op (passes/fuse_quantizers.py)
    n_sr = report.backward_graph.count("fqt.sr_quantize.default(")
    n_fused = report.backward_graph.count("fqt.sr_quantize_multi.default(")
    assert (n_sr, n_fused, report.fused_quantizers) == (7, 1, 1)
    n_sr += 2 * n_fused
    assert report.stochastic_quantizers == report.seeds == n_sr
    assert f"Backward: {n_sr} stochastic gradient quantizers, {n_sr} seeds (one per quantizer" in text
    shared = dataclasses.replace(report, seeds=n_sr - 2)
    assert "(2 quantizers share a seed with another: their roundings are correlated)" in str(shared)


def test_recompute_options_report_the_quantizers_that_keep_their_codes():
    """sdpa='recompute' + recompute_mlp on a TransformerBlock: q, k, v and fc1's input keep
    their codes (4, passes/keep_codes.py); the probabilities' quantizer and fc1's weight
    quantizer run again in the backward (2): the default config. Without the options there is
    no such line."""
    torch.manual_seed(0)
    model, x = _block()
    report = inspect(model, x, FQTConfig(compiler="eager", sdpa="recompute", recompute_mlp=True))
    assert (report.totals["recompute_kept_codes"], report.totals["recompute_requantized"]) == (4, 2)
    assert "Recomputed in the backward (config.sdpa='recompute' / recompute_mlp): 4 quantizers" in str(report)
    assert str(report) == str(inspect(model, x, FQTConfig(compiler="eager")))
    saved = FQTConfig(compiler="eager", sdpa="decompose", recompute_mlp=False)
    assert "Recomputed in the backward" not in str(inspect(model, x, saved))


def test_counter_dropouts_are_counted():
    torch.manual_seed(0)
    model, x = TransformerBlock(32, 4, resid_dropout=0.1), torch.randn(2, 8, 32)
    report = inspect(model, x, FQTConfig(compiler="eager"))
    assert report.totals["counter_dropouts"] == 2
    assert "Dropout: 2 F.dropout calls use fqt::dropout's counter-based mask" in str(report)
    assert inspect(model, x, FQTConfig(compiler="eager", counter_dropout=False)).totals["counter_dropouts"] == 0


def test_forward_only_has_no_backward_graph():
    torch.manual_seed(0)
    model, x = _mlp()
    report = inspect(model, x, PSQ8, backward=False)
    assert report.backward_graph == "" and "fqt.quantize" in report.forward_graph


def test_inspect_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model, x = _cnn()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.random.get_rng_state()
    inspect(model, x, PSQ8)
    assert all(p.grad is g and bool((g == 0.5).all()) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # batch-norm statistics
    assert torch.equal(rng, torch.random.get_rng_state())
    assert model._compiled_call_impl is None
    with pytest.raises(ValueError, match="not compiled"):
        fqt_compile.records(model)


def test_draw_writes_dot_and_explains_missing_tools(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = _mlp()
    report = inspect(model, x, PSQ8)
    pytest.importorskip("pydot")
    path = report.draw(tmp_path / "fw.dot")
    text = open(path).read()
    assert text.startswith("digraph") and "fqt" in text and "#ffb347" in text
    report.draw(tmp_path / "bw.dot", graph="backward")
    with pytest.raises(ValueError, match="graph must be one of"):
        report.draw(tmp_path / "x.dot", graph="sideways")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs the Graphviz 'dot' program"):
        report.draw(tmp_path / "fw.svg")
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(ImportError, match="needs pydot"):
        report.draw(tmp_path / "fw.dot")


def test_hugging_face_gpt2():
    transformers = import_transformers_or_skip()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, 128, (2, 16))
    report = inspect(model, {"input_ids": ids}, PSQ8)
    # per layer: c_attn, c_proj, c_fc, mlp.c_proj (Conv1D -> addmm) and the attention (sdpa); lm_head
    assert len(report.rows) == 2 * 5 + 1
    assert report.totals["coverage"] == 1.0
    assert {r.op for r in report.rows} == {"addmm", "sdpa", "linear"}
    assert sorted(d["op"] for d in report.full_precision) == ["embedding"] * 2 + ["layer_norm"] * 5
    assert isinstance(report, Report) and report.graphs >= 1


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.rnn = torch.nn.LSTM(16, 16, batch_first=True)

    def forward(self, x):
        return self.fc(self.rnn(torch.relu(self.fc(x)))[0])


def test_recurrent_layers_are_named_in_the_report_and_warned_about():
    """Dynamo does not trace nn.LSTM/GRU/RNN by default: a graph break around each call (on
    torch 2.11 and 2.13 it cannot resume inside the compiled entry frame and runs the whole
    forward eagerly; 2.15 compiles the fc calls as frames of their own). No graph names the
    layer, so the report lists it from the model, and fqt_compile.compile warns. With torch._dynamo.config.allow_rnn the rest compiles and quantizes, and the layer is
    one torch.lstm call in the graph, listed in full precision by insert_qdq."""
    x = torch.randn(2, 4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = inspect(_Recurrent(), x, PSQ8)
    messages = [str(w.message) for w in caught if "fqt_compile" in str(w.message)]
    assert any(re.search(r"rnn \(LSTM\) run in float, unquantized.*allow_rnn = True", m) for m in messages)
    # where dynamo compiled nothing at all (2.11, 2.13), compile's wrapper says that too
    assert all("rnn (LSTM)" in m or "dynamo compiled no graph for _Recurrent" in m for m in messages)
    assert not any(r.module == "rnn" for r in report.rows)
    assert report.full_precision == [{"module": "rnn", "node": "", "op": "LSTM", "reason": (
        "recurrent layer: dynamo runs it outside the graphs, in float (a graph break; "
        "torch._dynamo.config.allow_rnn is False)")}]
    with torch._dynamo.config.patch(allow_rnn=True):
        report = inspect(_Recurrent(), x, PSQ8)
    assert [r.key for r in report.rows if r.quantized] == ["fc", "fc#1"]
    assert [(d["module"], d["op"], d["reason"]) for d in report.full_precision] == [
        ("rnn", "lstm", "recurrent layer (LSTM/GRU/RNN) is not covered")]


class _PartlyOutsideDynamo(torch.nn.Module):
    """A linear layer whose forward dynamo must not trace (torch._dynamo.disable: a graph break,
    the layer runs eagerly, in float), an unused one, and nn.MultiheadAttention (whose out_proj
    module it never calls: its weight is used by the attention's own row)."""

    class _Eager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        @torch._dynamo.disable
        def forward(self, x):
            return self.fc(x)

    def __init__(self):
        super().__init__()
        self.a, self.eager, self.b = torch.nn.Linear(16, 16), self._Eager(), torch.nn.Linear(16, 4)
        self.unused = torch.nn.Linear(3, 3)
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = self.a(x)
        return self.b(self.eager(self.mha(x, x, x)[0]))


def test_product_modules_in_no_compiled_graph_are_named():
    """A product module that ran outside dynamo's graphs has no row: the report's coverage said
    100% while its product ran in float. The report now names every torch product module that
    no graph holds (it cannot tell one the step did not call, which it names too); none in the
    models whose every module runs in a graph (also asserted for the Hugging Face models in
    tests/test_hf_models.py)."""
    report = inspect(_PartlyOutsideDynamo(), torch.randn(2, 3, 16), PSQ8)
    assert report.unseen_modules == [{"module": "eager.fc", "op": "Linear"}, {"module": "unused", "op": "Linear"}]
    assert report.to_dict()["unseen_modules"] == report.unseen_modules
    assert ("Not in any compiled graph: 2 product module(s), either not called by this step or run outside dynamo's "
            "graphs") in str(report)
    assert "eager.fc (Linear), unused (Linear)" in str(report)
    for model, x in [(TransformerBlock(32, 4), torch.randn(2, 8, 32)), (SmallCNN(width=8), torch.randn(2, 1, 8, 8)),
                     (torch.nn.TransformerDecoderLayer(16, 2, 32, batch_first=True),
                      (torch.randn(2, 4, 16), torch.randn(2, 5, 16)))]:
        report = inspect(model, x, PSQ8)
        assert report.unseen_modules == [] and "Not in any compiled graph" not in str(report)
