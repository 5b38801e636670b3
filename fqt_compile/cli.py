"""Command line: ``python -m fqt_compile SUBCOMMAND ...`` (also the ``fqt-compile`` script).

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`). To add one, write
``add_arguments(parser)`` and ``run(args) -> int`` in your module and register them::

    from fqt_compile.cli import Subcommand, register, add_model_arguments, load_model, load_config

    register(Subcommand("variance", "measure per-layer gradient variance", add_arguments, run))

and list the module in :data:`SUBCOMMAND_MODULES` so :func:`main` imports it. The helpers
:func:`add_model_arguments`, :func:`load_model`, :func:`load_config` give every subcommand
the same ``MODULE:FACTORY``, ``--input-shape``/``--inputs`` and ``--config`` options.

Errors: a user error (:class:`CLIError`, ``ValueError``, ``TypeError``, ``ImportError``,
``FileNotFoundError``, ``NotImplementedError``) prints one line ``fqt-compile: error: ...``
to stderr and exits 2; any other failure exits 1, also with one line; ``--debug`` shows the
traceback. argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "main", "Subcommand", "SUBCOMMANDS", "SUBCOMMAND_MODULES", "register", "CLIError",
    "add_model_arguments", "load_model", "load_inputs", "load_config",
]  # fmt: skip

PROG = "fqt-compile"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


SUBCOMMANDS: dict[str, Subcommand] = {}

#: Modules imported by :func:`main` so that they can register their subcommands.
SUBCOMMAND_MODULES: list[str] = []


def register(sub: Subcommand) -> Subcommand:
    """Add (or replace) a subcommand."""
    SUBCOMMANDS[sub.name] = sub
    return sub


# ---------------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------------

_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODULE:FACTORY``, example inputs and ``--config`` (shared by subcommands)."""
    parser.add_argument(
        "model", metavar="MODULE:FACTORY",
        help="where the model comes from: an importable module (or a .py file) and a callable in it "
             "that returns an nn.Module when called without arguments (a class or a function), or an "
             "nn.Module object; e.g. fqt_compile.models:SmallCNN",
    )  # fmt: skip
    group = parser.add_argument_group("example inputs (one of)")
    group.add_argument(
        "--input-shape", action="append", metavar="SHAPE", default=None,
        help="shape of a random example input, e.g. 4,1,8,8 or 4x1x8x8; repeat for several inputs",
    )  # fmt: skip
    group.add_argument(
        "--inputs", metavar="MODULE:FN", default=None,
        help="a callable returning the example inputs: a tensor, a tuple of positional inputs or "
             "(inspect only) a dict of keyword inputs",
    )  # fmt: skip
    parser.add_argument("--input-dtype", choices=_DTYPES, default="float32",
                        help="dtype of --input-shape inputs (default: float32; integer inputs are drawn "
                             "from [0, --high))")  # fmt: skip
    parser.add_argument("--high", type=int, default=2, metavar="N",
                        help="exclusive upper bound of integer --input-shape inputs (e.g. a vocabulary size; default 2)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the model and inputs (default 0)")
    parser.add_argument(
        "--config", metavar="RECIPE|FILE", default=None,
        help="a recipe name (e.g. psq8, bhq5, ptq8, qat8, off) or a .json/.yaml file of FQTConfig fields "
             "(a 'recipe' key starts from a recipe); default: FQTConfig()",
    )  # fmt: skip


def _load_object(spec: str, what: str) -> Any:
    if ":" not in spec:
        raise CLIError(f"{what} must look like MODULE:NAME (e.g. fqt_compile.models:SmallCNN), got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise CLIError(f"{what}: file {mod_name!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise CLIError(f"{what}: cannot import module {mod_name!r} ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"{what}: module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def load_model(args: argparse.Namespace) -> Any:
    """The ``nn.Module`` named by ``args.model`` (seeded with ``args.seed``)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(args.seed)
    obj = _load_object(args.model, "MODULE:FACTORY")
    model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, nn.Module):
        raise CLIError(f"{args.model} did not give an nn.Module (got {type(model).__name__})")
    return model


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise CLIError(f"--input-shape: {text!r} is not a shape like 4,1,8,8") from None
    if not shape or any(s < 0 for s in shape):
        raise CLIError(f"--input-shape: {text!r} is not a shape like 4,1,8,8")
    return shape


def load_inputs(args: argparse.Namespace) -> Any:
    """Example inputs from ``--inputs`` or ``--input-shape`` (a tuple, or what --inputs returned)."""
    import torch

    if args.inputs and args.input_shape:
        raise CLIError("give either --input-shape or --inputs, not both")
    torch.manual_seed(args.seed)
    if args.inputs:
        fn = _load_object(args.inputs, "--inputs")
        return fn() if callable(fn) else fn
    if not args.input_shape:
        raise CLIError("example inputs are needed: give --input-shape (e.g. --input-shape 4,1,8,8) or --inputs MODULE:FN")
    dtype = getattr(torch, args.input_dtype)
    shapes = [_parse_shape(s) for s in args.input_shape]
    if dtype.is_floating_point:
        return tuple(torch.randn(s).to(dtype) for s in shapes)
    if args.high < 1:
        raise CLIError(f"--high must be >= 1, got {args.high}")
    return tuple(torch.randint(0, args.high, s, dtype=dtype) for s in shapes)


def _read_config_file(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise CLIError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CLIError(f"--config {path}: invalid YAML: {str(e).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"--config {path}: invalid JSON: {e}") from None


def _check_nested_keys(data: dict[str, Any]) -> None:
    """Unknown keys inside the nested quantizer specs and overrides, named with the valid ones
    (``FQTConfig.from_dict`` checks the top level)."""
    from .config import ForwardSpec, GradSpec, Override

    def check(value: Any, cls: type, where: str) -> None:
        if not isinstance(value, dict):
            return
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise CLIError(f"--config: unknown {where} field(s) {unknown}; valid fields: {valid}")

    for name, cls in (("input", ForwardSpec), ("weight", ForwardSpec), ("grad_input", GradSpec), ("grad_weight", GradSpec)):
        check(data.get(name), cls, f"{name} ({cls.__name__})")
    for i, o in enumerate(data.get("overrides") or []):
        check(o, Override, f"overrides[{i}] (Override)")
        if isinstance(o, dict):
            for name, cls in (("input", ForwardSpec), ("weight", ForwardSpec), ("grad_input", GradSpec), ("grad_weight", GradSpec)):
                check(o.get(name), cls, f"overrides[{i}].{name} ({cls.__name__})")


def load_config(spec: str | None) -> Any:
    """An ``FQTConfig`` from a recipe name, a JSON/YAML file path, or None (defaults)."""
    from .config import RECIPES, FQTConfig

    if spec is None:
        return FQTConfig()
    if spec in RECIPES:
        return FQTConfig.recipe(spec)
    if not os.path.splitext(spec)[1]:
        raise CLIError(f"--config: unknown recipe {spec!r}; valid recipes: {', '.join(sorted(RECIPES))} (or a .json/.yaml file)")
    if not os.path.isfile(spec):
        raise CLIError(f"--config: file {spec!r} does not exist")
    data = _read_config_file(spec)
    if not isinstance(data, dict):
        raise CLIError(f"--config {spec}: expected a mapping of FQTConfig fields, got {type(data).__name__}")
    _check_nested_keys(data)
    return FQTConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                        help="inner compiler to trace with (default: eager; the report is the same, inductor is slower)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON to PATH ('-': stdout only, no table)")
    parser.add_argument("--eval", action="store_true", help="trace in eval mode (default: train mode)")
    parser.add_argument("--no-backward", action="store_true", help="trace the forward only (no backward graph, no gradient GEMMs)")
    parser.add_argument("--graphs", action="store_true", help="also print the aten forward and backward graphs")
    parser.add_argument("--draw", metavar="PATH", default=None,
                        help="render the forward aten graph to PATH (.svg/.png/.pdf need pydot and Graphviz; .dot needs pydot)")


def _inspect_run(args: argparse.Namespace) -> int:
    from .inspect import inspect

    model = load_model(args)
    inputs = load_inputs(args)
    cfg = load_config(args.config)
    model.train(not args.eval)
    report = inspect(model, inputs, cfg, compiler=args.compiler, backward=not args.no_backward)
    if args.json == "-":
        print(report.to_json())
        return EXIT_OK
    print(report)
    if args.graphs:
        print("\n# forward graph\n" + report.forward_graph)
        print("\n# backward graph\n" + (report.backward_graph or "(none)"))
    if args.json:
        report.to_json(args.json)
        print(f"\nreport written to {args.json}")
    if args.draw:
        report.draw(args.draw)
        print(f"forward graph drawn to {args.draw}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--format", choices=("onnx", "torch"), required=True,
                        help="onnx: QDQ ONNX model (needs the export extra); torch: torch.export program (.pt2)")
    parser.add_argument("--out", metavar="PATH", required=True, help="file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    parser.add_argument("--static-batch", action="store_true", help="keep the batch dimension fixed (default: dynamic)")


def _export_run(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from .export import ONNX_OPSET, export, export_onnx

    model = load_model(args)
    inputs = load_inputs(args)
    if isinstance(inputs, dict):
        raise CLIError("export takes positional example inputs (a tensor or a tuple), not a dict")
    cfg = load_config(args.config)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.format == "onnx":
            export_onnx(model, inputs, args.out, cfg, opset=args.opset or ONNX_OPSET, dynamic_batch=not args.static_batch)
        else:
            if args.opset is not None:
                raise CLIError("--opset applies to --format onnx only")
            torch.export.save(export(model, inputs, cfg, dynamic_batch=not args.static_batch), args.out)
    print(f"wrote {args.format} model to {args.out}")
    return EXIT_OK


register(Subcommand(
    "inspect", "print what FQT does to each matmul-like op of a model", _inspect_arguments, _inspect_run,
    "Compile the model with the fqt backend, trace one forward and backward on example inputs, and print "
    "one row per matmul-like op: operand shapes, forward quantizers (Q_f, Q_w), gradient quantizers "
    "(Q_b1, Q_b2), whether each GEMM (output, grad_input, grad_weight) runs on an integer kernel or is "
    "simulated and why, the ops left in full precision, and FLOP coverage.",
))  # fmt: skip
register(Subcommand(
    "export", "export the quantized inference model (ONNX QDQ or torch.export)", _export_arguments, _export_run,
    "Export the inference form of the quantized model (eval semantics: forward quantizers only). "
    "onnx: QuantizeLinear/DequantizeLinear pairs, int8 weights, checked with onnx.checker. "
    "torch: a torch.export ExportedProgram holding fqt::fake_quant ops, saved with torch.export.save.",
))  # fmt: skip


def _variance_arguments(parser: argparse.ArgumentParser) -> None:
    from .variance import add_variance_arguments

    add_variance_arguments(parser)


def _variance_run(args: argparse.Namespace) -> int:
    from .variance import run_variance_command

    return run_variance_command(args)


register(Subcommand(
    "variance", "measure per-layer gradient variance (sampling vs quantization) and the bias check",
    _variance_arguments, _variance_run,
    "Measure, per layer and in total, the sampling variance of the QAT weight gradient over "
    "minibatches, the quantization variance FQT adds over repeated backward passes, their ratio, "
    "and the bias check (mean FQT gradient vs QAT gradient), for one recipe or a sweep of "
    "quantizers and bit-widths, with a progress bar.",
))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="fqt_compile: fully quantized training (Chen et al., NeurIPS 2020) as a torch.compile backend.",
        epilog="Exit status: 0 success, 1 failure while running, 2 usage or input error. "
               "Errors print one line; --debug shows the traceback.",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS.values():
        p = subs.add_parser(sub.name, help=sub.help, description=sub.description or sub.help, epilog=parser.epilog)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logging")
        sub.add_arguments(p)
        p.set_defaults(_run=sub.run)
    return parser


_USER_ERRORS = (CLIError, ValueError, TypeError, ImportError, FileNotFoundError, NotImplementedError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    debug = getattr(args, "debug", False)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("fqt_compile").setLevel(logging.DEBUG if debug else logging.WARNING)
    quieted = {}
    if not debug:
        # torch.onnx's notes about optional packages (torchvision ops) are noise here, and torch
        # >= 2.15 logs a failing meta kernel (e.g. a wrong --input-shape) at ERROR with its
        # traceback before raising the exception that the one line below reports.
        for name, level in (("torch.onnx", logging.ERROR), ("torch._subclasses.fake_tensor", logging.CRITICAL)):
            logger = logging.getLogger(name)
            quieted[logger] = logger.level
            logger.setLevel(level)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line unless --debug
        if debug:
            traceback.print_exc()
        user = isinstance(e, _USER_ERRORS)
        print(f"{PROG}: error: {_one_line(e, user)}", file=sys.stderr)
        return EXIT_USAGE if user else EXIT_FAILURE
    finally:
        for logger, level in quieted.items():
            logger.setLevel(level)


_MAX_MESSAGE = 400


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _one_line(e: BaseException, user: bool) -> str:
    """A user error's message; for other failures the exception type, its first line and the
    innermost cause's first line (TorchDynamo wraps the real error)."""
    msg = " ".join(str(e).split()) if user else f"{type(e).__name__}: {_first_line(e)}"
    if not user:
        root, seen = e, {id(e)}
        while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
            root = nxt
            seen.add(id(root))
        # TorchDynamo quotes the failing op's error inside its message: "got RuntimeError('...')"
        quoted = re.search(r"got (\w+(?:Error|Exception))\((['\"])(.+?)\2\)", " ".join(str(root).split()))
        if quoted:
            msg += f" (cause: {quoted.group(1)}: {quoted.group(3)})"
        elif root is not e:
            msg += f" (cause: {type(root).__name__}: {_first_line(root)})"
    if len(msg) > _MAX_MESSAGE:
        msg = msg[: _MAX_MESSAGE - 3] + "..."
    return msg + ("" if user else " [--debug for the traceback]")
