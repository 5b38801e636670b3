"""Inspection report: what FQT does to each matmul-like op of a model.

``fqt_compile.inspect(model, example_inputs, config)`` compiles the model with the ``fqt``
backend (eager inner compiler by default), runs one forward and one backward on the example
inputs to obtain the aten graphs, and reads back what the passes recorded:

- ``passes.insert_qdq``: one :class:`~fqt_compile.passes.insert_qdq.NodeDecision` per
  matmul-like op (quantized, or skipped and why) and per op noted as full precision;
- ``passes.lower_int_gemm`` (when it ran): for each of the three GEMMs of a product
  (``output``, ``grad_input``, ``grad_weight``) whether it became an integer kernel, and why
  not. Results are read by attribute (``module``, ``gemm``, ``lowered``, ``reason``, ``mkn``).

Nothing is trained: no optimizer step, and the parameters' ``.grad``, the buffers (batch-norm
running statistics), the RNG state and the model's ``torch.compile`` wrapper are restored.

FLOPs are forward FLOPs of the products (2 x multiply-adds); "model FLOPs" means the sum over
all matmul-like ops (elementwise ops, normalization and softmax are not counted). Each of the
three GEMMs of a product costs the product's forward FLOPs, so the lowered share is counted
over GEMM FLOPs: sum of lowered GEMMs' FLOPs / sum of all present GEMMs' FLOPs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .backend import GraphRecord, resolve_config
from .config import FQTConfig, InnerCompiler
from .passes.decompose_fqt import C_KERNEL

__all__ = ["inspect", "Report", "Row", "GemmStatus", "SCHEMA", "GEMMS", "report_from_records",
           "gradient_quantizer_seeds"]

#: Version tag of :meth:`Report.to_dict`. Bump it when a key is renamed or removed.
SCHEMA = "fqt_compile.inspect/1"

_FUSED_FWD = torch.ops.fqt.softmax_quantize.default
_FUSED_BWD = torch.ops.fqt.softmax_backward_sr_quantize.default


def _drops_inside(n: torch.fx.Node) -> bool:
    """A fused softmax kernel that draws the attention dropout's mask (a seed among its
    arguments, ``passes/fuse_softmax.py``)."""
    seed_at = {_FUSED_FWD: 7, _FUSED_BWD: 8}.get(n.target)
    return seed_at is not None and len(n.args) > seed_at and n.args[seed_at] is not None
_FUSED_GELU_BWD = torch.ops.fqt.gelu_backward_sr_quantize.default
_FUSED_GELU = torch.ops.fqt.gelu_quantize.default
_FUSED_MULTI = torch.ops.fqt.sr_quantize_multi.default
_SR = torch.ops.fqt.sr_quantize.default
GEMMS = ("output", "grad_input", "grad_weight")

_LOWER_PASS = "lower_int_gemm"


def gradient_quantizer_seeds(gm: fx.GraphModule) -> list[fx.Node]:
    """The seed node of each stochastic gradient quantizer of an aten graph, in graph order:
    one per ``fqt::sr_quantize`` node and one per quantizer inside a fused kernel
    (``fqt::softmax_backward_sr_quantize``, ``fqt::gelu_backward_sr_quantize``: argument 3;
    ``fqt::sr_quantize_multi``: argument 1). ``len()`` counts the quantizers; distinct
    entries, the seeds."""
    draws: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.target is torch.ops.fqt.sr_quantize.default:
            draws.append(n.args[1])
        elif n.target in (_FUSED_BWD, _FUSED_GELU_BWD):
            draws += n.args[3]
        elif n.target is _FUSED_MULTI:
            draws += n.args[1]
    return draws
_NOT_RUN = "lowering pass not run"


@dataclass
class GemmStatus:
    """One GEMM of a product. ``status``: ``lowered`` (integer kernel), ``simulated``
    (dequantize + float GEMM), ``partial`` (some of the product's calls lowered),
    ``absent`` (not in the graphs, e.g. no gradient needed for the input), or
    ``full_precision`` (the product is not quantized)."""

    status: str
    reason: str
    mkn: list[list[int]] = field(default_factory=list)  # (M, K, N) or (B, M, K, N) per call; -1: symbolic
    lowered_fraction: float = 0.0  # share of this GEMM's work (M*K*N, else calls) lowered

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "mkn": [list(t) for t in self.mkn],
                "lowered_fraction": self.lowered_fraction}


@dataclass
class Row:
    """One matmul-like op of the model (a product), keyed by module path."""

    key: str  # module path, "<root>" for the model itself, "#n" appended for repeats
    module: str
    node: str
    op: str
    kind: str | None
    quantized: bool
    mode: str
    reason: str
    shapes: list[list[int]]
    out_shape: list[int] | None
    flops: int
    quantizers: dict[str, dict[str, Any] | None]  # input, weight (Q_f, Q_w); grad_input, grad_weight (Q_b1, Q_b2)
    gemms: dict[str, GemmStatus]
    overrides: list[str] = field(default_factory=list)
    #: the higher-order op body the product is in ("" for none): a ``torch.utils.checkpoint``
    #: region's body (quantized, recomputed by the region), or another op's (full precision)
    region: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["gemms"] = {g: s.to_dict() for g, s in self.gemms.items()}
        return d


def _quantizers(spec: Any) -> dict[str, dict[str, Any] | None]:
    if spec is None:
        return {"input": None, "weight": None, "grad_input": None, "grad_weight": None}
    return {
        "input": {"bits": spec.a_bits, "scheme": spec.a_scheme, "granularity": spec.a_gran},
        "weight": {"bits": spec.b_bits, "scheme": spec.b_scheme, "granularity": spec.b_gran},
        "grad_input": {"kind": spec.gi_kind, "bits": spec.gi_bits},  # Q_b1
        "grad_weight": {"kind": spec.gw_kind, "bits": spec.gw_bits},  # Q_b2
    }


def _lower_decisions(records: Sequence[GraphRecord]) -> tuple[bool, dict[tuple[str, str], list[Any]]]:
    """Whether the lowering pass ran on any graph, and its decisions by (module, gemm)."""
    ran = False
    by_key: dict[tuple[str, str], list[Any]] = {}
    for rec in records:
        for kind in ("forward", "backward", "inference"):
            for name, result in (rec.aten_passes or {}).get(kind, []):
                if name != _LOWER_PASS:
                    continue
                ran = True
                for d in getattr(result, "decisions", None) or []:
                    module = re.sub(r"\[[^\]]*\]$", "", str(getattr(d, "module", "")))  # sdpa "[q@k]"
                    by_key.setdefault((module, str(getattr(d, "gemm", ""))), []).append(d)
    return ran, by_key


def _gemm_status(decisions: list[Any], ran: bool) -> GemmStatus:
    if not ran:
        return GemmStatus("simulated", _NOT_RUN)
    if not decisions:
        return GemmStatus("absent", "not in the graphs (no gradient needed on this path)")
    lowered = [bool(getattr(d, "lowered", False)) for d in decisions]
    reasons = list(dict.fromkeys(str(getattr(d, "reason", "")) for d in decisions))
    mkn = [[int(v) for v in getattr(d, "mkn", ())] for d in decisions]
    status = "lowered" if all(lowered) else "simulated" if not any(lowered) else "partial"
    work = [math.prod(m) if m and min(m) >= 0 else -1 for m in mkn]  # (M, K, N) or (B, M, K, N)
    if any(w < 0 for w in work) or not sum(work):
        work = [1] * len(decisions)  # symbolic sizes: weigh calls equally
    fraction = sum(w for w, low in zip(work, lowered) if low) / sum(work)
    return GemmStatus(status, "; ".join(r for r in reasons if r), mkn, fraction)


def _fmt_flops(f: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if f >= div:
            return f"{f / div:.3g}{unit}"
    return f"{f:.0f}"


def _fmt_shape(s: Sequence[int] | None) -> str:
    return "x".join("?" if v < 0 else str(v) for v in s) if s else "?"


_SHORT = {"lowered": "int", "simulated": "sim", "partial": "part", "absent": "-", "full_precision": "fp"}
_GRAN = {"tensor": "T", "channel": "C"}
_SCHEME = {"affine_zero": "", "affine": "a", "symmetric": "s"}


@dataclass
class Report:
    """The inspection report. ``print(report)`` shows a table; :meth:`to_dict` /
    :meth:`to_json` give the same content as data (schema :data:`SCHEMA`)."""

    model: str
    config: FQTConfig
    rows: list[Row]
    full_precision: list[dict[str, Any]]  # other ops left in full precision: module, node, op, reason
    graphs: int
    lowering_pass_run: bool
    training: bool
    forward_graph: str = ""  # aten forward graph(s), readable text
    backward_graph: str = ""  # aten backward graph(s)
    #: stochastic gradient quantizers (``fqt::sr_quantize`` nodes) in the backward graph(s),
    #: and the distinct seed nodes they read (equal when every quantizer draws its own seed)
    stochastic_quantizers: int = 0
    seeds: int = 0
    #: fused kernels put in by ``passes/fuse_softmax.py``: softmax + its output's quantizer
    #: (forward graphs, and backward graphs that recompute attention), and softmax's backward +
    #: the stochastic quantizers of its result (whose quantizers count above)
    fused_softmax: int = 0
    fused_softmax_backward: int = 0
    #: of those, the kernels that draw the attention dropout's mask inside (its seed and p are
    #: arguments: ``fqt::dropout`` of the probabilities, or of their gradient)
    fused_softmax_dropout: int = 0
    #: fused kernels put in by ``passes/fuse_gelu.py``: GELU + its output's quantizer, and GELU's
    #: backward + the bias gradient + the stochastic quantizers of its result (whose quantizers
    #: count above)
    fused_gelu: int = 0
    fused_gelu_backward: int = 0
    #: ``passes/fuse_quantizers.py``: a gradient's stochastic quantizers (two or more) and its
    #: column sums in one kernel (whose quantizers count above)
    fused_quantizers: int = 0
    #: ``passes/fuse_quantizers.py``: lone stochastic quantizers of a gradient already in memory
    #: (a graph input, a GEMM's, convolution's or ``fqt::`` kernel's output), left to the C
    #: kernel of ``fqt::sr_quantize`` instead of being inlined into an inductor kernel
    c_kernel_quantizers: int = 0
    #: ``passes/keep_codes.py`` (recompute options): forward quantizers in recompute regions
    #: whose int8 codes the step saves, and those it runs again in the backward
    recompute_kept_codes: int = 0
    recompute_requantized: int = 0
    #: ``F.dropout`` calls that drop with ``fqt::dropout`` (config.counter_dropout; quantized
    #: attention's own dropout is inside its row)
    counter_dropouts: int = 0
    #: graphs that dynamo compiled for a submodule's frame (after a graph break inside its
    #: forward): ``{"frame": path, "instances": [paths]}``, the instances whose overrides the
    #: graph's decisions hold for (one variant per group; :mod:`fqt_compile.frames`)
    frames: list[dict[str, Any]] = field(default_factory=list)
    #: torch product modules (linear, convolution, multi-head attention, bilinear) of the model
    #: that no compiled graph holds: ``{"module": path, "op": class name}``. Either the step
    #: did not call them, or they ran outside dynamo's graphs (``torch._dynamo.disable``, a
    #: frame dynamo skipped): then their products ran in float, and no row says so
    #: (:func:`unseen_product_modules`)
    unseen_modules: list[dict[str, Any]] = field(default_factory=list)
    _graph_modules: dict[str, list[fx.GraphModule]] = field(default_factory=dict, repr=False)

    # -- numbers ------------------------------------------------------------------------

    @property
    def totals(self) -> dict[str, Any]:
        flops = sum(r.flops for r in self.rows)
        covered = sum(r.flops for r in self.rows if r.quantized)
        gemm_flops = gemm_lowered = 0.0
        for r in self.rows:
            if not r.quantized:
                continue
            for s in r.gemms.values():
                if s.status == "absent":
                    continue
                gemm_flops += r.flops
                gemm_lowered += r.flops * s.lowered_fraction
        return {
            "products": len(self.rows),
            "quantized": sum(r.quantized for r in self.rows),
            "full_precision_ops": len(self.full_precision),
            "flops": flops,
            "flops_quantized": covered,
            "coverage": covered / flops if flops else 0.0,
            "gemm_flops": gemm_flops,
            "gemm_flops_lowered": gemm_lowered,
            "lowered": gemm_lowered / gemm_flops if gemm_flops else 0.0,
            "stochastic_quantizers": self.stochastic_quantizers,
            "seeds": self.seeds,
            "fused_softmax": self.fused_softmax,
            "fused_softmax_backward": self.fused_softmax_backward,
            "fused_softmax_dropout": self.fused_softmax_dropout,
            "fused_gelu": self.fused_gelu,
            "fused_gelu_backward": self.fused_gelu_backward,
            "fused_quantizers": self.fused_quantizers,
            "c_kernel_quantizers": self.c_kernel_quantizers,
            "recompute_kept_codes": self.recompute_kept_codes,
            "recompute_requantized": self.recompute_requantized,
            "counter_dropouts": self.counter_dropouts,
        }

    def row(self, key: str) -> Row:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"no row {key!r}; rows: {[r.key for r in self.rows]}")

    # -- data ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "config": self.config.to_dict(),
            "config_summary": self.config.describe(),
            "graphs": self.graphs,
            "training": self.training,
            "lowering_pass_run": self.lowering_pass_run,
            "rows": [r.to_dict() for r in self.rows],
            "full_precision": [dict(d) for d in self.full_precision],
            "frames": [dict(f) for f in self.frames],
            "unseen_modules": [dict(u) for u in self.unseen_modules],
            "totals": self.totals,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    # -- text ---------------------------------------------------------------------------

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        t = self.totals
        lines = [
            f"fqt_compile inspect: {self.model}  [{self.config.describe()}; compiler={self.config.compiler.value}]",
            f"{self.graphs} graph(s), {'train' if self.training else 'eval'} mode; "
            f"{t['products']} matmul-like ops ({t['quantized']} quantized), "
            f"{t['full_precision_ops']} other ops in full precision",
            "",
        ]
        header = ["module", "op", "operands", "in", "w", "Q_b1", "Q_b2", "output", "grad_in", "grad_w", "FLOPs", "share"]
        table = [header]
        for r in self.rows:
            q = r.quantizers
            fwd = [
                f"{q[k]['bits']}{_SCHEME.get(q[k]['scheme'], '?')}/{_GRAN.get(q[k]['granularity'], '?')}" if q[k] else "-"
                for k in ("input", "weight")
            ]
            grad = [f"{q[k]['kind']}{q[k]['bits']}" if q[k] and q[k]["kind"] != "none" else ("exact" if q[k] else "-")
                    for k in ("grad_input", "grad_weight")]
            operands = ", ".join(_fmt_shape(s) for s in r.shapes) or "?"
            share = f"{100 * r.flops / t['flops']:.1f}%" if t["flops"] else "-"
            table.append([
                r.key, r.op, operands, *fwd, *grad, *(_SHORT.get(r.gemms[g].status, "?") for g in GEMMS),
                _fmt_flops(r.flops), share,
            ])  # fmt: skip
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        right = {len(header) - 2, len(header) - 1}
        for i, row in enumerate(table):
            cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [
            "in/w: bits and range (T per tensor, C per channel; a = affine, s = symmetric, else zero-aligned affine)",
            "GEMMs: int = integer kernel, sim = simulated (dequantize + float GEMM), part = some calls lowered,",
            "       - = not in the graphs, fp = full precision",
        ]
        # why: grouped reasons
        notes: dict[str, list[str]] = {}
        for r in self.rows:
            if not r.quantized:
                notes.setdefault(f"full precision: {r.reason}", []).append(r.key)
                continue
            for g in GEMMS:
                s = r.gemms[g]
                if s.status != "lowered":
                    notes.setdefault(f"{s.status}: {s.reason}", []).append(f"{r.key}:{g}")
        if notes:
            lines += ["", "Why not lowered / not quantized:"]
            for reason, where in notes.items():
                shown = ", ".join(where[:6]) + (f", ... ({len(where)} in all)" if len(where) > 6 else "")
                lines.append(f"  {reason}  [{shown}]")
        if self.full_precision:
            lines += ["", "Other ops in full precision:"]
            w = max(len(d["module"] or "<root>") for d in self.full_precision)
            for d in self.full_precision:
                lines.append(f"  {(d['module'] or '<root>').ljust(w)}  {d['op']}: {d['reason']}")
        lines += [
            "",
            f"Totals: {_fmt_flops(t['flops'])} forward FLOPs in matmul-like ops; "
            f"quantized (FQT) {100 * t['coverage']:.1f}%; "
            f"lowered to integer GEMMs {100 * t['lowered']:.1f}% of GEMM FLOPs"
            + ("" if self.lowering_pass_run else f" ({_NOT_RUN})"),
        ]
        if self.stochastic_quantizers:
            shared = self.stochastic_quantizers - self.seeds
            lines.append(
                f"Backward: {self.stochastic_quantizers} stochastic gradient quantizers, {self.seeds} seeds"
                + (" (one per quantizer: independent rounding)" if not shared else
                   f" ({shared} quantizers share a seed with another: their roundings are correlated)")
            )
        if (self.fused_softmax or self.fused_softmax_backward or self.fused_gelu or self.fused_gelu_backward
                or self.fused_quantizers):
            lines.append(
                f"Fused kernels: {self.fused_softmax} softmax + quantizer of its output (fqt::softmax_quantize), "
                f"{self.fused_softmax_backward} softmax backward + its stochastic quantizers "
                f"(fqt::softmax_backward_sr_quantize), {self.fused_gelu} GELU + quantizer of its output "
                f"(fqt::gelu_quantize), {self.fused_gelu_backward} GELU backward + bias gradient + its stochastic "
                f"quantizers (fqt::gelu_backward_sr_quantize), {self.fused_quantizers} gradient's stochastic "
                "quantizers + column sums (fqt::sr_quantize_multi)"
                + (f"; {self.fused_softmax_dropout} of the softmax kernels draw the attention dropout's mask inside"
                   if self.fused_softmax_dropout else "")
            )
        if self.c_kernel_quantizers:
            lines.append(
                f"C quantize kernels: {self.c_kernel_quantizers} stochastic gradient quantizers read a tensor "
                "already in memory (a graph input or an extern kernel's output) and run as fqt::sr_quantize's "
                "C kernel, not inlined into inductor's"
            )
        if self.recompute_kept_codes or self.recompute_requantized:
            lines.append(
                f"Recomputed in the backward (config.sdpa='recompute' / recompute_mlp): {self.recompute_kept_codes} "
                "quantizers of the recomputed products' inputs keep their int8 codes for it, "
                f"{self.recompute_requantized} quantize again (of parameters, or of values recomputed there)"
            )
        if self.counter_dropouts:
            lines.append(
                f"Dropout: {self.counter_dropouts} F.dropout calls use fqt::dropout's counter-based mask "
                "(config.counter_dropout): the backward keeps a seed, not a mask"
            )
        checkpointed = [r for r in self.rows if r.region and r.quantized]
        if checkpointed:
            regions = len({r.region for r in checkpointed})
            lines.append(
                f"Checkpoint regions (torch.utils.checkpoint): {len(checkpointed)} quantized products in {regions} "
                "region(s), recomputed in the backward by their region: "
                + ", ".join(dict.fromkeys(r.key for r in checkpointed))
            )
        if self.unseen_modules:
            lines.append(
                f"Not in any compiled graph: {len(self.unseen_modules)} product module(s), either not called by this "
                "step or run outside dynamo's graphs (torch._dynamo.disable, a frame dynamo skipped), where their "
                "products run in float: " + ", ".join(f"{u['module'] or '<root>'} ({u['op']})" for u in self.unseen_modules)
            )
        if self.frames:
            seen = list(dict.fromkeys(f"{f['frame']} (for {', '.join(f['instances'])})" for f in self.frames))
            lines.append(
                f"Submodule frames: {len(self.frames)} graph(s) compiled for a submodule's own frame (a graph break "
                "inside its forward; paths named in full, one variant per group of instances the overrides treat "
                "alike): " + "; ".join(seen)
            )
        return "\n".join(lines)

    # -- drawing ------------------------------------------------------------------------

    def draw(self, path: str | os.PathLike[str], *, graph: str = "forward") -> str:
        """Render a graph to ``path``: ``.svg``/``.png``/``.pdf`` (needs pydot and the Graphviz
        ``dot`` program) or ``.dot`` (pydot only). ``graph``: ``"forward"``, ``"backward"``
        (aten graphs) or ``"torch"`` (the torch-level graph after ``insert_qdq``). fqt ops are
        filled orange. Returns the path written."""
        path = os.fspath(path)
        if graph not in self._graph_modules:
            raise ValueError(f"draw: graph must be one of {sorted(self._graph_modules)}, got {graph!r}")
        gms = self._graph_modules[graph]
        if not gms:
            raise ValueError(f"draw: this report has no {graph} graph")
        fmt = os.path.splitext(path)[1].lstrip(".").lower()
        if fmt not in ("svg", "png", "pdf", "dot"):
            raise ValueError(f"draw: file type must be .svg, .png, .pdf or .dot, got {path!r}")
        try:
            import pydot  # noqa: F401
        except ImportError:
            raise ImportError(
                "Report.draw needs pydot (pip install pydot) and, for .svg/.png/.pdf, the Graphviz "
                "'dot' program (apt install graphviz / brew install graphviz / conda install graphviz)"
            ) from None
        if fmt != "dot" and shutil.which("dot") is None:
            raise RuntimeError(
                f"Report.draw: rendering .{fmt} needs the Graphviz 'dot' program, which is not on PATH "
                "(apt install graphviz / brew install graphviz / conda install graphviz); "
                "a .dot file can be written without it"
            )
        from torch.fx.passes.graph_drawer import FxGraphDrawer

        dot = FxGraphDrawer(gms[0], f"{self.model}_{graph}").get_dot_graph()
        fqt_nodes = {n.name for n in gms[0].graph.nodes if str(n.target).startswith("fqt.")}
        for node in dot.get_nodes():
            if node.get_name().strip('"') in fqt_nodes:
                node.set("fillcolor", "#ffb347")
        if fmt == "dot":
            with open(path, "w", encoding="utf-8") as f:
                f.write(dot.to_string())
        else:
            dot.write(path, format=fmt)
        return path


# ---------------------------------------------------------------------------------------------
# building the report
# ---------------------------------------------------------------------------------------------


def report_from_records(
    records: Sequence[GraphRecord], *, model: str = "model", config: FQTConfig | None = None, training: bool = True
) -> Report:
    """A :class:`Report` from the records of a compiled model (``fqt_compile.records``)."""
    cfg = config if config is not None else (records[0].config if records else FQTConfig())
    ran, lower = _lower_decisions(records)
    rows: list[Row] = []
    full_precision: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for rec in records:
        for d in rec.insert.decisions:
            if d.kind is None:  # noted op (normalization, embedding, softmax ...)
                full_precision.append({"module": d.module, "node": d.node, "op": d.op,
                                       "reason": d.reason.removeprefix("full precision: ")})
                continue
            base = d.module or "<root>"
            n = seen.get(base, 0)
            seen[base] = n + 1
            if d.quantized:
                gemms = {g: _gemm_status(lower.get((d.module, g), []), ran) for g in GEMMS}
            else:
                gemms = {g: GemmStatus("full_precision", d.reason) for g in GEMMS}
            rows.append(Row(
                key=base if n == 0 else f"{base}#{n}", module=d.module, node=d.node, op=d.op, kind=d.kind,
                quantized=d.quantized, mode=d.mode, reason=d.reason,
                shapes=[list(s) for s in d.shapes], out_shape=list(d.out_shape) if d.out_shape else None,
                flops=int(d.flops), quantizers=_quantizers(d.spec), gemms=gemms, overrides=list(d.overrides),
                region=getattr(d, "region", ""),
            ))  # fmt: skip

    quantizers = seeds = 0
    joint = {"kept": 0, "recomputed": 0}
    for rec in records:
        for name, result in (rec.aten_passes or {}).get("joint", []):
            if name == "keep_codes":
                joint = {k: joint[k] + int(result.get(k, 0)) for k in joint}
    fused = {"forward": 0, "backward": 0, "gelu": 0, "gelu_backward": 0, "multi": 0, "c_kernel": 0, "dropout": 0}
    for rec in records:
        for gm in (rec.forward, rec.backward, rec.inference):
            if gm is not None:
                fused["forward"] += sum(n.target is _FUSED_FWD for n in gm.graph.nodes)
                fused["gelu"] += sum(n.target is _FUSED_GELU for n in gm.graph.nodes)
                fused["dropout"] += sum(_drops_inside(n) for n in gm.graph.nodes)
        if rec.backward is not None:
            nodes = rec.backward.graph.nodes
            fused["backward"] += sum(n.target is _FUSED_BWD for n in nodes)
            fused["gelu_backward"] += sum(n.target is _FUSED_GELU_BWD for n in nodes)
            fused["multi"] += sum(n.target is _FUSED_MULTI for n in nodes)
            fused["c_kernel"] += sum(n.target is _SR and bool(n.meta.get(C_KERNEL)) for n in nodes)
            draws = gradient_quantizer_seeds(rec.backward)
            quantizers += len(draws)
            seeds += len(set(draws))

    def text(kind: str) -> str:
        gms = [getattr(r, kind) for r in records if getattr(r, kind) is not None]
        parts = []
        for i, gm in enumerate(gms):
            head = f"# graph {i} of {len(gms)}\n" if len(gms) > 1 else ""
            parts.append(head + gm.print_readable(print_output=False, include_stride=False, colored=False))
        return "\n".join(parts)

    return Report(
        model=model, config=cfg, rows=rows, full_precision=full_precision, graphs=len(records),
        lowering_pass_run=ran, training=training, forward_graph=text("forward"), backward_graph=text("backward"),
        stochastic_quantizers=quantizers, seeds=seeds, fused_softmax=fused["forward"],
        fused_softmax_backward=fused["backward"], fused_softmax_dropout=fused["dropout"], fused_gelu=fused["gelu"],
        fused_gelu_backward=fused["gelu_backward"], fused_quantizers=fused["multi"], c_kernel_quantizers=fused["c_kernel"],
        recompute_kept_codes=joint["kept"], recompute_requantized=joint["recomputed"],
        counter_dropouts=sum(r.insert.counter_dropouts for r in records if r.insert is not None),
        frames=[{"frame": r.frame, "instances": list(r.instances)} for r in records if r.frame is not None],
        _graph_modules={
            "forward": [r.forward for r in records if r.forward is not None],
            "backward": [r.backward for r in records if r.backward is not None],
            "torch": [r.torch_graph for r in records],
        },
    )  # fmt: skip


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Everything a traced step touches, put back afterwards: grads (the same tensor objects),
    buffers (batch-norm statistics), RNG state, the torch.compile wrapper and its records."""
    from . import frontend

    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    compiled = model.__dict__.get("_compiled_call_impl")
    backend = frontend._BACKENDS.get(model)
    rng = torch.random.get_rng_state()
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(rng)
        model._compiled_call_impl = compiled
        if backend is not None:
            frontend._BACKENDS[model] = backend
        else:
            frontend._BACKENDS.pop(model, None)


def _loss(out: Any) -> torch.Tensor | None:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
    if not leaves:
        return None
    return sum(t.float().mean() for t in leaves)  # type: ignore[return-value]


#: torch modules whose forward is a product that insert_qdq rewrites or names
_PRODUCT_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Bilinear)


def unseen_product_modules(model: nn.Module, records: Sequence[GraphRecord]) -> list[dict[str, Any]]:
    """The product modules of ``model`` (:data:`_PRODUCT_MODULES`; not those inside an
    ``nn.MultiheadAttention``, whose weights it uses itself) that no decision of ``records``
    names: ``{"module": path, "op": class name}``. Module paths are the records' (full paths:
    :func:`fqt_compile.compile` binds the backend to the model)."""
    seen = {d.module for r in records for d in r.insert.decisions}
    inside_mha = {f"{path}.{sub}" for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for sub, _ in m.named_modules() if sub}
    return [{"module": path, "op": type(m).__name__} for path, m in model.named_modules()
            if isinstance(m, _PRODUCT_MODULES) and path not in seen and path not in inside_mha]


def inspect(
    model: nn.Module,
    example_inputs: Any,
    config: FQTConfig | str | dict | None = None,
    *,
    compiler: str | InnerCompiler | None = "eager",
    backward: bool = True,
) -> Report:
    """Inspect what FQT does to ``model``: one row per matmul-like op (see :class:`Report`).

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    ``config``: an :class:`FQTConfig`, a recipe name, a dict, or None (defaults).
    ``compiler``: the inner compiler to trace with (``"eager"`` by default: the aten graphs
    and pass decisions are the same, without inductor's compile time); None keeps the
    config's. One forward and (``backward=True``) one backward run on the inputs, in the
    model's current train/eval mode, to obtain the aten graphs; the model is left as it was
    (grads, buffers, RNG state, compile wrapper).
    """
    from .frontend import compile as fqt_compile_model
    from .frontend import records as fqt_records
    from .frontend import untraced_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect() takes an nn.Module, got {type(model).__name__}")
    cfg = resolve_config(config)
    if compiler is not None:
        cfg = dataclasses.replace(cfg, compiler=compiler)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(
            "inspect(): example_inputs must be a Tensor, a tuple of positional inputs or a dict of "
            f"keyword inputs, got {type(example_inputs).__name__}"
        )
    with _restored(model):
        fqt_compile_model(model, cfg)
        recs = fqt_records(model)
        out = model(*args, **kwargs)
        if backward:
            loss = _loss(out)
            if loss is not None:
                loss.backward()
        recs = list(recs)
    # the records' config: the backend may have changed the inner compiler (old torch)
    report = report_from_records(recs, model=type(model).__name__, config=recs[0].config if recs else cfg,
                                 training=model.training)
    # submodules dynamo ran outside every graph (recurrent layers): no record names them
    report.full_precision += [{"module": path, "node": "", "op": cls, "reason": why}
                              for path, cls, why in untraced_modules(model)]
    report.unseen_modules = unseen_product_modules(model, recs)
    return report
