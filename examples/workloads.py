"""The two real-data workloads of the reproductions, with nothing downloaded:

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 images), a small ResNet-style CNN
  (``fqt_compile.models.SmallCNN``); a fixed 80/20 train/validation split.
* ``charlm``: a character-level GPT (``fqt_compile.models.GPT``) on the source code of the
  Python standard library that runs this script (the top-level ``*.py`` files next to
  ``os.py``, sorted by name; every 10th file is validation, so the split is by file).

Each workload gives a model, a stream of training batches, a loss and an evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fqt_compile.models import GPT, SmallCNN

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    train_batches: Callable[[int], Iterator[Batch]]  # seed -> endless batches
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    val: list[Batch]
    metric: str  # "accuracy" or "loss"
    lr: float

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation loss (and accuracy) with the model in eval mode."""
        was = model.training
        model.eval()
        loss = correct = count = 0.0
        for x, y in self.val:
            out = model(x)
            n = y.numel()
            loss += float(self.loss_fn(out, y)) * n
            correct += float((out.argmax(-1) == y).sum())
            count += n
        model.train(was)
        return {"loss": loss / count, "accuracy": correct / count}


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def digits(batch_size: int = 64) -> Workload:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_val = len(y) // 5
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_tr, y_tr = x[train_idx], y[train_idx]

    def batches(seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(y_tr), generator=g).split(batch_size):
                if len(idx) == batch_size:  # one shape: one compiled graph
                    yield x_tr[idx], y_tr[idx]

    val = [(x[i], y[i]) for i in val_idx.split(180)]
    return Workload("digits", lambda: SmallCNN(width=16, blocks=1), batches, F.cross_entropy, val,
                    "accuracy", 3e-3)


# ---------------------------------------------------------------------------------------------
# character-level language model on the standard library's source
# ---------------------------------------------------------------------------------------------

VOCAB = 128  # bytes, clipped to 7 bits (non-ASCII bytes map to 127)


def stdlib_corpus(max_files: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train codes, validation codes, file names): the sorted top-level ``*.py`` files of the
    standard library; files ``0, 10, 20, ...`` of the sorted list are validation."""
    root = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    if max_files is not None:
        files = files[:max_files]
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        with open(os.path.join(root, f), "rb") as fh:
            (val if i % 10 == 0 else train).extend(fh.read() + b"\n\n")
    enc = lambda b: torch.frombuffer(b, dtype=torch.uint8).clamp(max=VOCAB - 1).long()  # noqa: E731
    return enc(train), enc(val), files


def charlm(batch_size: int = 16, seq: int = 64, d_model: int = 64, n_layers: int = 2,
           val_windows: int = 64) -> Workload:
    train, val, _ = stdlib_corpus()

    def windows(codes: torch.Tensor, starts: torch.Tensor) -> Batch:
        idx = starts[:, None] + torch.arange(seq + 1)
        w = codes[idx]
        return w[:, :-1], w[:, 1:]

    def batches(seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        while True:
            yield windows(train, torch.randint(0, len(train) - seq - 1, (batch_size,), generator=g))

    starts = torch.linspace(0, len(val) - seq - 2, val_windows).long()
    val_batches = [windows(val, s) for s in starts.split(32)]

    def lm_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    return Workload("charlm", lambda: GPT(VOCAB, d_model, 4, n_layers, max_len=seq), batches, lm_loss,
                    val_batches, "loss", 2e-3)


WORKLOADS = {"digits": digits, "charlm": charlm}
