"""Throughput of the quantizers, eager and torch.compile, next to a plain copy.

    python benchmarks/bench_quantizers.py            # full run
    python benchmarks/bench_quantizers.py --quick    # fewer repeats
    python benchmarks/bench_quantizers.py --out results.json --no-compile

Every variant quantizes and dequantizes one (N, D) float32 tensor (default 8192 x 1024):
the forward quantizer (``fake_quantize_forward``, 8-bit per-tensor zero-aligned affine) and
each gradient quantizer (``fake_quantize_grad``: ptq, psq, column, bhq, hadamard) with a fresh
seed tensor every call. GB/s is the bytes of the float input read (N * D * 4) per second; the
copy row (``x.clone()``) is the memory-bound reference, so ``vs_copy`` = time / copy time.
Times are medians of repeated rounds after warm-up (the first compiled call compiles); each
round runs every variant of a mode once, in turn, and ``vs_copy`` is the median over rounds of
the time divided by the same round's copy time (``vs_copy_range``: its smallest and largest
value), so drift of the machine between rounds does not favour one variant. A kind that
fails to compile is recorded with its error, not raised. Mode "compiled" is torch.compile of the
reference functions (they break the graph at the NaN/Inf check); mode "fqt" is the op library
compiled by the fqt backend, the path training takes: a gradient quantizer whose input is in
memory anyway (here a graph input) runs as the C kernel, "(codes)"; the "(inductor)" rows are
the same quantizers inlined into inductor's loops with the counter-based generator
(``fuse_quantizers=False``), the form a quantizer fused with the op producing its input takes.

The second table is BHQ's cost at N = 1024 and 8192 rows (D = 1024): DESIGN.md section 3 says
the transform is O(N * D), so time per element should stay about flat as N grows 8x.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fqt_compile  # noqa: E402
from fqt_compile import quantizers as Q  # noqa: E402
from fqt_compile.backend import FQTBackend, resolve_config  # noqa: E402
from fqt_compile.config import FQTConfig  # noqa: E402
from malloc_option import add_malloc_argument, apply_malloc  # noqa: E402

GRAD_BITS = 8


def _median_seconds(fn: Callable[[int], torch.Tensor], repeats: int, warmup: int) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _variants(x: torch.Tensor) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    def forward(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return Q.fake_quantize_forward(t, 8, "affine_zero", "tensor")

    def grad(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def f(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
            return Q.fake_quantize_grad(t, kind, GRAD_BITS, seed=seed)

        f.__name__ = f"grad_{kind}"
        return f

    def copy(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return t.clone()

    return {"copy": copy, "forward": forward, **{k: grad(k) for k in Q.GRAD_KINDS}}


def _fqt_variants() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The op-library form, as the fqt backend compiles it: passes.decompose_fqt inlines the
    ops and inductor fuses range, counter-based generator, rounding and cast (mode "fqt")."""
    ops = torch.ops.fqt

    def forward(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return ops.quantize(t, 8, "affine_zero", "tensor", 0)[0]

    def grad(gran: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def f(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
            return ops.sr_quantize(t, seed, GRAD_BITS, gran)[0]

        return f

    def copy(t: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return t.clone()

    return {"copy": copy, "forward(codes)": forward, "ptq(codes)": grad("tensor"),
            "psq(codes)": grad("row"), "column(codes)": grad("column"),
            "ptq(inductor)": grad("tensor"), "psq(inductor)": grad("row"), "column(inductor)": grad("column")}


def _fqt_config(name: str) -> FQTConfig:
    """The backend config of a mode-"fqt" variant: the "(codes)" quantizers of a graph input run
    as the C kernel (passes/fuse_quantizers.py marks them), the "(inductor)" ones are inlined
    into inductor's loops (fuse_quantizers=False), as a quantizer fused with its producer is."""
    cfg = resolve_config("psq8")
    return dataclasses.replace(cfg, fuse_quantizers=False) if name.endswith("(inductor)") else cfg


def _error_text(e: Exception) -> str:
    """A failed variant's error as recorded in its row: type and first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def bench_throughput(n: int, d: int, repeats: int, warmup: int, compile_: bool) -> list[dict]:
    """Per mode: compile every variant (first call), then ``warmup`` + ``repeats`` rounds, each
    calling every variant once in turn with a fresh seed. ``ms`` is a variant's median over the
    rounds; ``vs_copy`` is the median over rounds of (variant time / copy time in the same
    round), so the machine's drift between rounds (it runs 25-35% apart on this 2-core VM)
    cancels instead of landing on whichever variant ran during a slow stretch."""
    torch.manual_seed(0)
    # Rows with unequal ranges, as gradients have (BHQ's grouping then does real work).
    x = torch.randn(n, d) * torch.logspace(-3, 1, n)[torch.randperm(n)][:, None]
    nbytes = x.numel() * x.element_size()
    rows = []

    for mode in ("eager", "compiled", "fqt") if compile_ else ("eager",):
        ready: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        mode_rows: dict[str, dict] = {}
        for name, fn in (_fqt_variants() if mode == "fqt" else _variants(x)).items():
            row = mode_rows[name] = {"name": name, "mode": mode, "n": n, "d": d}
            try:
                if mode == "fqt":
                    f = torch.compile(fn, backend=FQTBackend(_fqt_config(name)))
                else:
                    f = torch.compile(fn) if mode == "compiled" else fn
                breaks = sum(counters["graph_break"].values())
                t_compile = time.perf_counter()
                f(x, torch.tensor(0))  # compiles (compiled mode)
                row["first_call_s"] = round(time.perf_counter() - t_compile, 3)
                if mode != "eager":
                    row["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
                ready[name] = f
            except Exception as e:  # noqa: BLE001 - a benchmark records failures, it does not stop
                row["error"] = _error_text(e)
        times: dict[str, list[float]] = {name: [] for name in ready}
        for r in range(warmup + repeats):
            for name, f in list(ready.items()):
                seed = torch.tensor(r + 1)
                try:
                    t0 = time.perf_counter()
                    f(x, seed)
                    dt = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    mode_rows[name]["error"] = _error_text(e)
                    del ready[name], times[name]
                    continue
                if r >= warmup:
                    times[name].append(dt)
        for name, row in mode_rows.items():
            if name in times:
                s = statistics.median(times[name])
                row.update(ms=s * 1e3, gbps=nbytes / s / 1e9)
                if "copy" in times:
                    ratios = [t / c for t, c in zip(times[name], times["copy"])]
                    row["vs_copy"] = statistics.median(ratios)
                    row["vs_copy_range"] = [min(ratios), max(ratios)]
                else:
                    row["vs_copy"] = None
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def bench_bhq_scaling(d: int, sizes: tuple[int, ...], repeats: int, warmup: int) -> list[dict]:
    out = []
    for n in sizes:
        torch.manual_seed(0)
        x = torch.randn(n, d) * torch.logspace(-3, 1, n)[torch.randperm(n)][:, None]
        seed = torch.tensor(1)
        s_plan = _median_seconds(lambda i: Q.bhq_plan(x), repeats, warmup)
        plan = Q.bhq_plan(x)
        s_transform = _median_seconds(lambda i: Q.bhq_transform(x, plan)[0], repeats, warmup)
        s_total = _median_seconds(lambda i: Q.fake_quantize_grad(x, "bhq", GRAD_BITS, seed=seed), repeats, warmup)
        out.append(
            {
                "n": n,
                "d": d,
                "plan_ms": s_plan * 1e3,
                "transform_ms": s_transform * 1e3,
                "total_ms": s_total * 1e3,
                "ns_per_element": s_total / (n * d) * 1e9,
                "groups": plan.num_groups,
            }
        )
    return out


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:<14} {r['mode']:<9} {'error: ' + r['error']}"
    vs = f"{r['vs_copy']:8.1f}x" if r.get("vs_copy") is not None else f"{'-':>9}"
    gb = f"{r['graph_breaks']:>7}" if "graph_breaks" in r else f"{'-':>7}"
    return f"{r['name']:<14} {r['mode']:<9} {r['ms']:10.2f} {r['gbps']:8.2f} {vs} {gb}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantizers.json")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (3 instead of 20)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    args.malloc = apply_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Graph breaks are counted per variant below; dynamo's per-break warnings would bury the table.
    torch._logging.set_logs(graph_breaks=False)
    repeats, warmup = (3, 1) if args.quick else (20, 2)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, malloc {args.malloc}")
    print(f"\n{args.rows} x {args.cols} float32, {GRAD_BITS}-bit gradient quantizers, median of {repeats}")
    print(f"{'variant':<14} {'mode':<9} {'ms':>10} {'GB/s':>8} {'vs copy':>9} {'breaks':>7}")
    rows = bench_throughput(args.rows, args.cols, repeats, warmup, not args.no_compile)

    scaling = bench_bhq_scaling(args.cols, (1024, 8192), repeats, warmup)
    print(f"\nBHQ cost vs N (D = {args.cols}, eager)")
    print(f"{'N':>6} {'plan ms':>9} {'T ms':>8} {'total ms':>9} {'ns/elem':>8} {'groups':>7}")
    for r in scaling:
        print(
            f"{r['n']:>6} {r['plan_ms']:9.2f} {r['transform_ms']:8.2f} {r['total_ms']:9.2f} "
            f"{r['ns_per_element']:8.2f} {r['groups']:>7}"
        )
    ratio = scaling[-1]["total_ms"] / scaling[0]["total_ms"]
    print(f"time ratio N=8192 / N=1024: {ratio:.2f} (linear: 8)")

    result = {
        "meta": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpu": fqt_compile.cpu.describe(),
            "python": platform.python_version(),
            "shape": [args.rows, args.cols],
            "grad_bits": GRAD_BITS,
            "repeats": repeats,
            "malloc": args.malloc,
            "quick": args.quick,
            "command": "python benchmarks/bench_quantizers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "throughput": rows,
        "bhq_scaling": scaling,
        "bhq_time_ratio_8192_over_1024": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
