"""Would an im2col integer lowering make the FQT convolutions faster on this CPU?

For each conv shape, times the float convolution the simulated path runs (on dequantized
codes) against the im2col formulation an integer lowering would run for the output GEMM:
unfold the int8 input codes into (B*L, C*k*k) columns, one int8 x int8 -> int32 GEMM
(torch._int_mm) with the (C*k*k, O) weight codes, and the reshape back; the float epilogue is
not even counted. The lowering rule of issue 4 is "lower where faster than the float
convolution, keep simulated where not": the JSON and table say which way each shape falls.

    python benchmarks/bench_conv.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (batch, in_ch, out_ch, side, kernel, stride)
    (128, 32, 32, 28, 3, 1),   # SmallCNN width 32 (bench_training --models cnn)
    (128, 32, 64, 28, 3, 2),
    (32, 64, 64, 56, 3, 1),    # a ResNet stage-1 conv
    (32, 256, 256, 14, 3, 1),  # a ResNet stage-3 conv
    (32, 256, 1024, 14, 1, 1), # a 1x1 bottleneck conv
]


def bench(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conv.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"{'B x C -> O, side, k, s':28s} {'float conv ms':>14s} {'im2col int8 ms':>15s} {'(GEMM only)':>12s} {'faster':>8s}")
    for b, c, o, side, k, s in SHAPES:
        g = torch.Generator().manual_seed(0)
        x8 = torch.randint(-128, 128, (b, c, side, side), dtype=torch.int8, generator=g)
        w8 = torch.randint(-128, 128, (o, c, k, k), dtype=torch.int8, generator=g)
        xf, wf = x8.float(), w8.float()
        pad = k // 2
        out_side = (side + 2 * pad - k) // s + 1
        w_cols = w8.reshape(o, -1).t().contiguous()  # (C*k*k, O)

        def float_conv():
            return F.conv2d(xf, wf, None, s, pad)

        def im2col_int8():
            # unfold has no int8 kernel on CPU: unfold the codes as float, cast back (exact)
            cols = F.unfold(x8.float(), k, padding=pad, stride=s).to(torch.int8)  # (B, C*k*k, L)
            cols = cols.transpose(1, 2).reshape(-1, c * k * k).contiguous()
            acc = torch._int_mm(cols, w_cols)  # (B*L, O)
            return acc.reshape(b, out_side * out_side, o).transpose(1, 2).reshape(b, o, out_side, out_side)

        cols = F.unfold(xf, k, padding=pad, stride=s).to(torch.int8).transpose(1, 2).reshape(-1, c * k * k).contiguous()
        t_f, t_i = bench(float_conv), bench(im2col_int8)
        t_g = bench(lambda: torch._int_mm(cols, w_cols))
        exact = torch.equal(im2col_int8().to(torch.float64), F.conv2d(x8.double(), w8.double(), None, s, pad))
        row = dict(batch=b, in_ch=c, out_ch=o, side=side, kernel=k, stride=s, float_conv_s=t_f,
                   im2col_int8_s=t_i, int8_gemm_only_s=t_g, exact=exact, im2col_faster=t_i < t_f)
        rows.append(row)
        label = f"{b}x{c}->{o}, {side}, {k}, {s}"
        print(f"{label:28s} {t_f * 1e3:14.2f} {t_i * 1e3:15.2f} {t_g * 1e3:12.2f} {'im2col' if t_i < t_f else 'float':>8s}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
