"""Kernel-level profile of one training step of one GPT block (d 1024, 16 heads, MLP 4096,
batch 8 x 512, AdamW), or of the CNN of ``bench_training.py`` (``--model cnn``: ``SmallCNN``
width 32, 2 residual blocks, batch 128 of 1 x 28 x 28): the tables docs/performance.md quotes
for where an fqt step's time goes.

    python benchmarks/profile_step.py                      # fqt (default config), malloc keep
    python benchmarks/profile_step.py --variant fp32       # fp32 eager, for comparison
    python benchmarks/profile_step.py --variant bf16       # bf16 autocast eager, for comparison
    python benchmarks/profile_step.py --config 'FQTConfig(sdpa="full_precision")' --rows 30
    python benchmarks/profile_step.py --batch 1            # 1 x 512 tokens instead of 8 x 512
    python benchmarks/profile_step.py --model cnn          # the CNN (--layers, --batch unused)
    python benchmarks/profile_step.py --shapes --rows 40   # a row per op and input shapes

Compiles, runs 2 warm-up steps and 3 timed steps (median printed), then profiles one step with
``torch.profiler`` and inductor's per-kernel profiling (``cpp.enable_kernel_profile``), so every
fused inductor kernel is one row, and prints the rows sorted by self CPU time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig, GradSpec  # noqa: E402,F401  (for --config expressions)
from fqt_compile.models import GPT, SmallCNN  # noqa: E402
from malloc_option import add_malloc_argument, apply_malloc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("gpt", "cnn"), default="gpt")
    ap.add_argument("--variant", choices=("fqt", "fp32", "bf16"), default="fqt")
    ap.add_argument("--config", default="FQTConfig()", help="FQTConfig expression for --variant fqt")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 512 tokens per step")
    ap.add_argument("--rows", type=int, default=25, help="rows of the kernel table")
    ap.add_argument("--shapes", action="store_true",
                    help="one row per op and input shapes (which GEMMs cost what: aten::_int_mm per shape)")
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True
    args.malloc = apply_malloc(args.malloc)
    torch.manual_seed(0)
    if args.model == "gpt":
        model = GPT(vocab=256, d_model=1024, n_heads=16, n_layers=args.layers, max_len=512, d_ff=4096)
        x, y = torch.randint(0, 256, (args.batch, 512)), torch.randint(0, 256, (args.batch, 512))
    else:
        model = SmallCNN(in_ch=1, width=32, n_classes=10, blocks=2)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    if args.variant == "fqt":
        fqt_compile.compile(model, eval(args.config))  # noqa: S307 - a command-line config expression
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.variant == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{args.variant} {args.config if args.variant == 'fqt' else ''} malloc={args.malloc}: "
          f"step {statistics.median(times):.3f} s (median of {', '.join(f'{t:.3f}' for t in times)})")
    with torch.profiler.profile(record_shapes=args.shapes) as prof:
        step()
    if args.shapes:
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40, max_shapes_column_width=60))
    else:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=100))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
