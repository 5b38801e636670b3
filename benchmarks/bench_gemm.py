"""GEMM kernels side by side: int8 x int8 -> int32 (torch._int_mm, inductor's CPP GEMM template
under max-autotune on CPU, and on AMX CPUs our fqt::int_mm_amx with B row-major and, as the
lowering passes a weight, B transposed), float32 and bfloat16 matmul, at the shapes of the
training benchmark (tokens x d_model x d_ff), plus attention's per-head products (128 heads,
batched). Medians of repeated calls; JSON out.

    python benchmarks/bench_gemm.py [--device cpu|cuda] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from malloc_option import add_malloc_argument, apply_malloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fqt_compile import amx  # noqa: E402

SHAPES = [(4096, 1024, 1024), (4096, 1024, 4096), (4096, 4096, 1024), (1024, 4096, 4096), (512, 64, 512)]
QUICK = [(1024, 256, 1024), (512, 64, 512)]


def bench(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-autotune", action="store_true", help="skip the inductor max-autotune int8 variant")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gemm.json"))
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    args.malloc = apply_malloc(args.malloc)
    dev = args.device
    rows = []
    compiled = None
    if not args.no_autotune:
        import torch._inductor.config as ic

        with ic.patch({"max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN" if dev == "cpu" else "TRITON,ATEN"}):
            compiled = torch.compile(lambda a, b: torch._int_mm(a, b), dynamic=False)
    for m, k, n in QUICK if args.quick else SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g).to(dev)
        b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g).to(dev)
        af, bf = a8.float(), b8.float()
        ab, bb = af.bfloat16(), bf.bfloat16()
        row = {"m": m, "k": k, "n": n}
        row["int8_int_mm_s"] = bench(lambda: torch._int_mm(a8, b8), dev, args.reps)
        if dev == "cpu" and amx.available():
            bt8 = b8.t().contiguous().t()  # (K, N) view of an (N, K) weight
            assert torch.equal(torch.ops.fqt.int_mm_amx(a8, b8), torch._int_mm(a8, b8))
            row["int8_amx_s"] = bench(lambda: torch.ops.fqt.int_mm_amx(a8, b8), dev, args.reps)
            row["int8_amx_weight_t_s"] = bench(lambda: torch.ops.fqt.int_mm_amx(a8, bt8), dev, args.reps)
        if compiled is not None:
            try:
                row["int8_inductor_autotune_s"] = bench(lambda: compiled(a8, b8), dev, args.reps)
            except Exception as e:  # noqa: BLE001  (report, do not fail the run)
                row["int8_inductor_autotune_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["fp32_s"] = bench(lambda: af @ bf, dev, args.reps)
        row["bf16_s"] = bench(lambda: ab @ bb, dev, args.reps)
        exact = torch.equal(torch._int_mm(a8[:64], b8), (a8[:64].double() @ b8.double()).to(torch.int32))
        row["int_mm_exact"] = bool(exact)
        best_int = min(v for key, v in row.items() if key.startswith("int8_") and key.endswith("_s"))
        row["fp32_over_int8"] = row["fp32_s"] / best_int
        row["bf16_over_int8"] = row["bf16_s"] / best_int
        rows.append(row)
        print(
            f"{m:5d}x{k:5d}x{n:5d}  int8 {row['int8_int_mm_s'] * 1e3:8.2f} ms"
            + (f"  amx {row['int8_amx_s'] * 1e3:8.2f} ms  amx(W^T) {row['int8_amx_weight_t_s'] * 1e3:8.2f} ms"
               if "int8_amx_s" in row else "")
            + (f"  int8+autotune {row['int8_inductor_autotune_s'] * 1e3:8.2f} ms" if "int8_inductor_autotune_s" in row else "")
            + f"  fp32 {row['fp32_s'] * 1e3:8.2f} ms  bf16 {row['bf16_s'] * 1e3:8.2f} ms"
            + f"  fp32/int8 {row['fp32_over_int8']:.2f}x  bf16/int8 {row['bf16_over_int8']:.2f}x",
            flush=True,
        )
    if dev == "cpu" and amx.available() and not args.quick:
        # attention's per-head products of the GPT benchmark: 8 x 16 heads, 512 tokens, 64 dims
        g = torch.Generator(device="cpu").manual_seed(0)
        for name, (m, k, n) in (("q@k^T", (512, 64, 512)), ("p@v", (512, 512, 64))):
            a8 = torch.randint(-128, 128, (128, m, k), dtype=torch.int8, generator=g)
            b8 = torch.randint(-128, 128, (128, k, n), dtype=torch.int8, generator=g)
            row = {"batched": name, "b": 128, "m": m, "k": k, "n": n}
            row["int8_bmm_int8_s"] = bench(lambda: torch.ops.fqt.bmm_int8(a8, b8), dev, args.reps)
            row["int8_amx_s"] = bench(lambda: torch.ops.fqt.int_mm_amx(a8, b8), dev, args.reps)
            ab16, bb16 = a8.bfloat16(), b8.bfloat16()
            row["bf16_s"] = bench(lambda: torch.bmm(ab16, bb16), dev, args.reps)
            rows.append(row)
            print(f"128 x {name}  fqt.bmm_int8 (_int_mm per head) {row['int8_bmm_int8_s'] * 1e3:8.2f} ms"
                  f"  amx {row['int8_amx_s'] * 1e3:8.2f} ms  bf16 bmm {row['bf16_s'] * 1e3:8.2f} ms", flush=True)
    out = {"device": dev, "amx": amx.status(), "name": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc": args.malloc, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
