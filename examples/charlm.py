"""Train a character-level GPT on the Python standard library's own source with FQT.

    python examples/charlm.py --recipe bhq5 --steps 300
    python examples/charlm.py --recipe off          # float baseline

The corpus is the sorted top-level ``*.py`` files of the running Python's standard library,
split into train and validation by file (see ``workloads.stdlib_corpus``). Prints the
validation loss in nats per character.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import charlm, stdlib_corpus  # noqa: E402

import fqt_compile  # noqa: E402
from fqt_compile import FQTConfig  # noqa: E402


def fit(workload, model, steps: int, batches, *, weight_decay: float = 0.0, log_every: int = 0):
    """``steps`` AdamW steps of ``model`` on ``batches``; returns the model."""
    opt = torch.optim.AdamW(model.parameters(), lr=workload.lr, weight_decay=weight_decay)
    for step in range(steps):
        x, y = next(batches)
        loss = workload.loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:5d}  train loss {loss.item():.3f}", flush=True)
    return model


def train(workload, recipe: str, steps: int, seed: int, *, log_every: int = 0) -> dict[str, float]:
    """Train a fresh model of ``workload`` under ``recipe`` ("off": float) with AdamW."""
    torch.manual_seed(seed)
    model = workload.make_model()
    if recipe != "off":
        fqt_compile.compile(model, FQTConfig.recipe(recipe, compiler="eager"))
    return workload.evaluate(fit(workload, model, steps, workload.train_batches(seed), log_every=log_every))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="bhq5", help="FQT recipe (qat8, psq4, bhq5, ...) or 'off'")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tr, va, files = stdlib_corpus()
    print(f"corpus: {len(files)} files, {len(tr)} train / {len(va)} validation characters")
    t = time.time()
    res = train(charlm(), args.recipe, args.steps, args.seed, log_every=50)
    print(f"{args.recipe}: validation loss {res['loss']:.4f} nats/char, "
          f"next-char accuracy {res['accuracy']:.4f} ({time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
