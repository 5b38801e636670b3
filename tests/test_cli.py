"""Command line: help, exit codes, one-line error messages, config files, inspect and export
end to end, and registering a subcommand from another module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fqt_compile import cli
from fqt_compile.backend import torch_version
from fqt_compile.export import MIN_EXPORT_TORCH
from fqt_compile.__main__ import main

MLP_ARGS = ["fqt_compile.models:MLP", "--input-shape", "4,64"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fqt-compile: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_is_complete(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out and "export" in out and "Exit status" in out
    code, out, _ = run(capsys, "inspect", "--help")
    assert code == 0
    for opt in ("MODULE:FACTORY", "--input-shape", "--inputs", "--input-dtype", "--high", "--seed", "--config",
                "--compiler", "--json", "--eval", "--no-backward", "--graphs", "--draw", "--debug"):
        assert opt in out, opt
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0
    for opt in ("--format", "{onnx,torch}", "--out", "--opset", "--static-batch", "--config", "--input-shape"):
        assert opt in out, opt


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fqt_compile", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "inspect" in proc.stdout


def test_inspect_prints_the_report_and_writes_json(capsys, tmp_path):
    path = tmp_path / "r.json"
    code, out, err = run(capsys, "inspect", *MLP_ARGS, "--config", "psq8", "--json", str(path))
    assert code == 0, err
    assert "layers.0" in out and "head" in out and "Totals:" in out
    data = json.loads(path.read_text())
    assert data["schema"] == "fqt_compile.inspect/1" and len(data["rows"]) == 3
    assert data["config"]["grad_input"] == {"kind": "psq", "bits": 8, "hadamard_block": 16}
    code, out, _ = run(capsys, "inspect", *MLP_ARGS, "--json", "-", "--no-backward")
    assert code == 0 and json.loads(out)["rows"][0]["key"] == "layers.0"


def test_config_files_json_and_yaml(capsys, tmp_path):
    pytest.importorskip("yaml")
    good = tmp_path / "c.yaml"
    good.write_text("recipe: bhq5\nweight:\n  bits: 4\n  granularity: channel\n")
    code, out, err = run(capsys, "inspect", *MLP_ARGS, "--config", str(good), "--json", "-")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["quantizers"]["weight"]["bits"] == 4 and row["quantizers"]["weight"]["granularity"] == "channel"
    assert row["quantizers"]["grad_input"] == {"kind": "bhq", "bits": 5}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"recipe": "psq8", "bitz": 3}))
    code, _, err = run(capsys, "inspect", *MLP_ARGS, "--config", str(bad))
    assert code == 2
    assert_one_line_error(err, "unknown FQTConfig field(s) ['bitz']", "valid fields:", "'grad_input'")

    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"grad_input": {"kind": "psq", "bitz": 3}}))
    code, _, err = run(capsys, "inspect", *MLP_ARGS, "--config", str(nested))
    assert code == 2
    assert_one_line_error(err, "unknown grad_input (GradSpec) field(s) ['bitz']", "'hadamard_block'")

    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"mode": "fast"}))
    code, _, err = run(capsys, "inspect", *MLP_ARGS, "--config", str(invalid))
    assert code == 2
    assert_one_line_error(err, "'fast'", "'fqt'", "'qat'")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["inspect", *MLP_ARGS, "--config", "psq3"], ["unknown recipe 'psq3'", "bhq5"]),
        (["inspect", *MLP_ARGS, "--config", "missing.json"], ["'missing.json' does not exist"]),
        (["inspect", "fqt_compile.models:Nope", "--input-shape", "4,64"], ["has no attribute 'Nope'"]),
        (["inspect", "no_such_module:X", "--input-shape", "4,64"], ["cannot import module 'no_such_module'"]),
        (["inspect", "fqt_compile.models", "--input-shape", "4,64"], ["must look like MODULE:NAME"]),
        (["inspect", "fqt_compile.models:MLP"], ["example inputs are needed"]),
        (["inspect", "fqt_compile.models:MLP", "--input-shape", "4,a"], ["not a shape"]),
    ],
    ids=["recipe", "config-file", "factory", "module", "spec", "no-inputs", "shape"],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, needles):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, *needles)


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "export", *MLP_ARGS)
    assert code == 2 and "required: --format, --out" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_failures_exit_1_with_one_line_and_traceback_with_debug(capsys):
    argv = ["inspect", "fqt_compile.models:MLP", "--input-shape", "4,65"]  # wrong feature size
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert_one_line_error(err, "--debug for the traceback")
    code, _, err = run(capsys, *argv, "--debug")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fqt-compile: error:")


def test_inputs_function_from_a_file(capsys, tmp_path):
    src = tmp_path / "my_model.py"
    src.write_text(
        "import torch\n"
        "from fqt_compile.models import GPT\n"
        "def make():\n    return GPT(vocab=32, d_model=32, n_heads=2, n_layers=1, max_len=16)\n"
        "def inputs():\n    return {'idx': torch.randint(0, 32, (2, 8))}\n"
    )
    code, out, err = run(capsys, "inspect", f"{src}:make", "--inputs", f"{src}:inputs", "--json", "-")
    assert code == 0, err
    data = json.loads(out)
    assert [r["key"] for r in data["rows"]] == ["blocks.0.qkv", "blocks.0", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2", "head"]
    assert [d["op"] for d in data["full_precision"]][:2] == ["embedding", "embedding"]


@pytest.mark.skipif(torch_version() < MIN_EXPORT_TORCH,
                    reason="export needs a newer torch (tests/test_export.py checks the error)")
def test_export_torch_and_onnx(capsys, tmp_path):
    pt2 = tmp_path / "mlp.pt2"
    code, out, err = run(capsys, "export", *MLP_ARGS, "--format", "torch", "--out", str(pt2))
    assert code == 0, err
    ep = torch.export.load(pt2)
    assert ep.module()(torch.randn(7, 64)).shape == (7, 10)
    code, _, err = run(capsys, "export", *MLP_ARGS, "--format", "torch", "--out", str(pt2), "--opset", "17")
    assert code == 2
    assert_one_line_error(err, "--opset applies to --format onnx only")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "mlp.onnx"
    code, out, err = run(capsys, "export", *MLP_ARGS, "--format", "onnx", "--out", str(path), "--config", "psq8")
    assert code == 0 and err == "", err
    model = onnx.load(str(path))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 6


def test_a_subcommand_can_be_registered(capsys, monkeypatch):
    seen = {}

    def add_arguments(parser):
        cli.add_model_arguments(parser)
        parser.add_argument("--samples", type=int, default=3)

    def run_hello(args):
        seen["model"] = type(cli.load_model(args)).__name__
        seen["config"] = cli.load_config(args.config).describe()
        print(f"hello {args.samples}")
        return 0

    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", cli.Subcommand("hello", "say hello", add_arguments, run_hello))
    code, out, _ = run(capsys, "hello", "fqt_compile.models:MLP", "--samples", "5", "--config", "bhq5")
    assert code == 0 and out == "hello 5\n"
    assert seen == {"model": "MLP", "config": "fqt in=8b/tensor w=8b/tensor Q_b1=bhq5 Q_b2=column8"}
    code, out, _ = run(capsys, "--help")
    assert "say hello" in out
