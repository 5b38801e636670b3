"""The integer GEMMs of one fqt training step of a GPT block, replayed one by one.

    python benchmarks/bench_step_gemms.py                       # 1 block, batch 8 x 512
    python benchmarks/bench_step_gemms.py --out benchmarks/results/step_gemms.json

Compiles the one-block GPT of ``profile_step.py`` (d 1024, 16 heads, MLP 4096) with the default
``FQTConfig``, runs two steps, then records the operands of every ``fqt::int_mm_amx`` /
``fqt::int_mm_amx_sums`` call of a third step (shapes and strides: K-major operands stay
K-major). Each recorded product is then replayed on random int8 codes of the same layout
(2 warm-up calls, median of ``--repeats``), with and without the sums, and the table gives ms
and TOPS (2 x multiply-adds per second) per call. Replayed operands are warmer in cache than in
the step (the step's took 1.1-1.4x longer in ``torch.profiler``); compare rows and runs of this
script, not against the profile. Needs the AMX kernel (``fqt_compile.amx.available()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig, amx  # noqa: E402
from fqt_compile.models import GPT  # noqa: E402
from bench_conv import bench  # noqa: E402
from malloc_option import add_malloc_argument, apply_malloc  # noqa: E402


def record_layouts(batch: int) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(vocab=256, d_model=1024, n_heads=16, n_layers=1, max_len=512, d_ff=4096)
    fqt_compile.compile(model, FQTConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randint(0, 256, (batch, 512)), torch.randint(0, 256, (batch, 512))

    def step() -> None:
        F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    seen: list[dict] = []
    check = amx._check

    def recording_check(a: torch.Tensor, b: torch.Tensor) -> None:  # every call of both ops passes here
        seen.append({"a_shape": list(a.shape), "a_stride": list(a.stride()), "b_shape": list(b.shape),
                     "b_stride": list(b.stride())})
        check(a, b)

    amx._check = recording_check
    try:
        step()
    finally:
        amx._check = check
    return seen


def _codes(shape: list[int], stride: list[int], gen: torch.Generator) -> torch.Tensor:
    n = sum((s - 1) * st for s, st in zip(shape, stride)) + 1
    return torch.randint(-128, 128, (n,), dtype=torch.int8, generator=gen).as_strided(shape, stride)


def _median_ms(fn, repeats: int) -> float:
    fn()  # a second warm-up call; bench() makes the first
    return bench(fn, repeats) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    malloc = apply_malloc(args.malloc)
    if not amx.available():
        print(f"the AMX kernel is {amx.status()}: nothing to replay")
        return 1
    layouts = record_layouts(args.batch)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'#':>2} {'A shape':16} {'A strides':18} {'B shape':16} {'B strides':18} {'ms':>7} {'+sums ms':>8} {'TOPS':>5}")
    for i, lay in enumerate(layouts):
        a, b = _codes(lay["a_shape"], lay["a_stride"], gen), _codes(lay["b_shape"], lay["b_stride"], gen)
        ms = _median_ms(lambda: torch.ops.fqt.int_mm_amx(a, b), args.repeats)
        ms_sums = _median_ms(lambda: torch.ops.fqt.int_mm_amx_sums(a, b), args.repeats)
        macs = a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        rows.append({**lay, "ms": ms, "ms_with_sums": ms_sums, "tops": 2 * macs / ms / 1e9})
        print(f"{i:2d} {str(tuple(a.shape)):16} {str(a.stride()):18} {str(tuple(b.shape)):16} {str(b.stride()):18} "
              f"{ms:7.2f} {ms_sums:8.2f} {rows[-1]['tops']:5.2f}")
    total, total_sums = sum(r["ms"] for r in rows), sum(r["ms_with_sums"] for r in rows)
    print(f"total {total:.1f} ms ({total_sums:.1f} ms with the sums) over {len(rows)} products")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "machine": platform.machine(),
                       "cpu": fqt_compile.cpu.describe(), "threads": torch.get_num_threads(),
                       "malloc": malloc, "batch": args.batch, "repeats": args.repeats, "rows": rows,
                       "total_ms": total, "total_ms_with_sums": total_sums}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
