"""Train a small CNN on scikit-learn's 8x8 digits under several FQT configs, side by side.

    python examples/train_digits.py                      # what `make demo` runs
    python examples/train_digits.py --quick              # a smoke run (3 epochs, 3 configs)
    python examples/train_digits.py --configs float,psq8,bhq5,bhq4 --epochs 30
    python examples/train_digits.py --compiler inductor --json /tmp/digits.json

Data: ``sklearn.datasets.load_digits`` (1797 images, ships with scikit-learn, nothing is
downloaded), a stratified 80/20 train/validation split with a fixed seed, pixels standardized
with the training set's mean and standard deviation.

Configs: ``float`` is the plain, uncompiled model (the baseline); any other name is an
``FQTConfig`` recipe (``off``, ``qat8``, ``ptq8``, ``psq8``, ``bhq5``, ``ptq4`` ...), or
``ptq``/``psq``/``bhq`` with fewer bits than the recipes (``ptq2``, ``bhq3``), applied with
``fqt_compile.compile``. Every config starts from the same initial weights and sees the
batches in the same order. After training, the table lists the final training loss, the
validation accuracy (measured with the config's own quantized forward), the wall time
(compilation included), and what the compiler did, read from ``fqt_compile.records``: the
products quantized, the stochastic gradient quantizers in the aten backward graph
(``fqt::sr_quantize`` nodes and those inside fused kernels,
``fqt_compile.inspect.gradient_quantizer_seeds``), and the GEMMs of the training graphs that
run as integer GEMMs.

Default inner compiler: ``eager``. On a 2-core CPU a cold inductor compile of one config's
training and evaluation graphs costs 20-50 s, more than the training itself for a model this
small (the default run: about 4 minutes with inductor, under 2 with eager); the eager inner
compiler runs the same quantized graphs unfused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import fqt_compile
from fqt_compile import RECIPES, FQTConfig, GradKind, GradSpec
from fqt_compile.inspect import gradient_quantizer_seeds
from fqt_compile.models import MLP, SmallCNN

DEFAULT_CONFIGS = "float,qat8,ptq8,psq8,bhq5,ptq2,psq2,bhq2"
QUICK_CONFIGS = "float,psq8,bhq5"


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float tensors, standardized with the training set's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr = torch.tensor(x_tr, dtype=torch.float32).view(-1, 1, 8, 8)
    x_va = torch.tensor(x_va, dtype=torch.float32).view(-1, 1, 8, 8)
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, torch.tensor(y_tr), (x_va - mean) / std, torch.tensor(y_va)


def config_for(name: str, compiler: str) -> FQTConfig:
    """A recipe (``FQTConfig.recipe``), or ``ptq<b>``/``psq<b>``/``bhq<b>`` below the recipes'
    4 bits (``ptq3``, ``bhq2`` ...) built with the recipes' split: Q_b1 at b bits, Q_b2 8-bit
    (per-tensor with PTQ, per-column with PSQ/BHQ)."""
    m = re.fullmatch(r"(ptq|psq|bhq)([0-9])", name)
    if name in RECIPES or m is None:
        return FQTConfig.recipe(name, compiler=compiler)
    kind, bits = GradKind(m.group(1)), int(m.group(2))
    q_b2 = GradSpec(GradKind.PTQ if kind is GradKind.PTQ else GradKind.COLUMN, 8)
    return FQTConfig(grad_input=GradSpec(kind, bits), grad_weight=q_b2, compiler=compiler)


def make_model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same initial weights for every config
    return SmallCNN() if arch == "cnn" else MLP(d_in=64)


def compiler_counts(model: nn.Module) -> dict[str, int]:
    """Products quantized, gradient quantizer nodes and lowered integer GEMMs of the training
    graph(s) the fqt backend compiled for ``model``."""
    out = {"quantized": 0, "sr_quantize": 0, "int_gemms": 0, "gemms": 0}
    for rec in fqt_compile.records(model):
        if rec.backward is None:  # the evaluation (inference) graph
            continue
        out["quantized"] += len(rec.insert.quantized)
        out["sr_quantize"] += len(gradient_quantizer_seeds(rec.backward))
        for kind in ("forward", "backward"):
            for name, result in rec.aten_passes.get(kind, []):
                if name == "lower_int_gemm":
                    out["gemms"] += len(result.decisions)
                    out["int_gemms"] += len(result.lowered)
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
    """tqdm when it is installed (not a dependency), else the bare iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def run_config(name: str, data, args: argparse.Namespace) -> dict[str, Any]:
    x_tr, y_tr, x_va, y_va = data
    model = make_model(args.arch, args.seed)
    t0 = time.perf_counter()
    if name != "float":
        fqt_compile.compile(model, config_for(name, args.compiler))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    order = torch.Generator().manual_seed(args.seed)  # same batch order for every config
    steps = len(x_tr) // args.batch_size  # drop the last partial batch: one static shape
    torch.manual_seed(args.seed)  # same stochastic-rounding draws where the configs agree
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_tr), generator=order)
        total = 0.0
        for i in _progress(range(steps), steps, f"{name} {epoch}/{args.epochs}", args.tqdm):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_va).argmax(1) == y_va).float().mean().item()
        history.append({"epoch": epoch, "train_loss": total / steps, "val_acc": acc})
        print(
            f"  {name:>6} epoch {epoch:3d}/{args.epochs}  loss {total / steps:.4f}  "
            f"val acc {100 * acc:5.1f}%  {time.perf_counter() - t0:6.1f}s",
            file=sys.stderr,
            flush=True,
        )
    wall = time.perf_counter() - t0
    counts = compiler_counts(model) if name != "float" else {}
    return {
        "config": name,
        "describe": "float (not compiled)" if name == "float" else config_for(name, args.compiler).describe(),
        "train_loss": history[-1]["train_loss"],
        "val_acc": history[-1]["val_acc"],
        "wall_s": wall,
        **counts,
        "history": history,
    }


def format_table(results: list[dict[str, Any]]) -> str:
    head = ("config", "train loss", "val acc", "wall s", "quantized", "Q_b nodes (bw)", "int GEMMs")
    rows = []
    for r in results:
        compiled = "quantized" in r
        rows.append((
            r["config"],
            f"{r['train_loss']:.4f}",
            f"{100 * r['val_acc']:.1f}%",
            f"{r['wall_s']:.1f}",
            str(r["quantized"]) if compiled else "-",
            str(r["sr_quantize"]) if compiled else "-",
            f"{r['int_gemms']}/{r['gemms']}" if compiled else "-",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(row) for row in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help=f"comma-separated: 'float', recipe names, or ptq/psq/bhq with 2-3 bits such as 'bhq3' (default: {DEFAULT_CONFIGS})")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per config (default 20; 3 with --quick)")
    p.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                   help="inner compiler of the fqt backend (default eager: see the module docstring)")
    p.add_argument("--arch", choices=("cnn", "mlp"), default="cnn", help="SmallCNN (default) or MLP")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tensors are tiny; OpenMP threads "
                        "cost more than they save and collapse when the cores are shared)")
    p.add_argument("--json", metavar="PATH", help="write the results (per-epoch history included) here")
    p.add_argument("--quick", action="store_true", help=f"3 epochs of {QUICK_CONFIGS}")
    p.add_argument("--tqdm", action="store_true", help="per-batch progress bars (if tqdm is installed)")
    args = p.parse_args(argv)
    args.configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    args.epochs = args.epochs or (3 if args.quick else 20)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n != "float":
            config_for(n, args.compiler)  # fail before any training on a misspelt name
    torch.set_num_threads(args.threads)

    data = load_data(args.seed)
    print(
        f"digits: {len(data[0])} train / {len(data[2])} val, {args.arch}, {args.epochs} epochs, "
        f"batch {args.batch_size}, compiler {args.compiler}, {args.threads} thread(s)",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    results = [run_config(n, data, args) for n in names]
    total = time.perf_counter() - t0

    print(format_table(results))
    print(f"total {total:.0f} s; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(torch=torch.__version__, cpus=os.cpu_count(), total_s=total)
        with open(args.json, "w") as f:
            json.dump({"args": meta, "results": results}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
