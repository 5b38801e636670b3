"""Data-parallel FQT: an MLP on scikit-learn's 8x8 digits with DistributedDataParallel (gloo, CPU).

    torchrun --nproc-per-node 2 examples/train_ddp.py                    # FQT psq8, float all-reduce
    torchrun --nproc-per-node 2 examples/train_ddp.py --compress         # + 8-bit all-reduce hook
    torchrun --nproc-per-node 2 examples/train_ddp.py --recipe bhq5 --epochs 10
    python examples/train_ddp.py --spawn 2                               # without torchrun

Every rank builds the same model, compiles it with ``fqt_compile.compile`` and then wraps it in
``DistributedDataParallel`` (the documented order; see docs/distributed.md), seeds its
stochastic rounding with ``fqt_compile.distributed.seed_everything(seed)`` (distinct per rank,
reproducible), and trains on its shard of each global batch (``DistributedSampler``). With
``--compress`` the gradient buckets are all-reduced as 8-bit codes by
``quantized_allreduce_hook`` (unbiased). Rank 0 prints the loss, the validation accuracy,
the coverage report (every linear quantized, in however many graphs DDP's bucket splits
made) and the bytes the hook sent against float32.

Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fqt_compile
from fqt_compile import FQTConfig
from fqt_compile.distributed import QuantizedAllReduce, launch, quantized_allreduce_hook, report, seed_everything
from fqt_compile.models import MLP


def load_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr, x_va = (torch.tensor(a, dtype=torch.float32) for a in (x_tr, x_va))
    mean, std = x_tr.mean(), x_tr.std()
    return (TensorDataset((x_tr - mean) / std, torch.tensor(y_tr)),
            TensorDataset((x_va - mean) / std, torch.tensor(y_va)))


def main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    train, val = load_data(args.seed)

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = MLP(64, args.hidden, 10, depth=2)
    fqt_compile.compile(model, FQTConfig.recipe(args.recipe, compiler=args.compiler))
    ddp = DDP(model)
    hook_state = QuantizedAllReduce(bits=8)
    if args.compress:
        ddp.register_comm_hook(hook_state, quantized_allreduce_hook)
    seed_everything(args.seed)  # per-rank stochastic-rounding streams

    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    # global batch = args.batch_size, split across ranks
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total = torch.zeros(2)
        for x, y in loader:
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(y), len(y)])
        dist.all_reduce(total)
        ddp.eval()
        with torch.no_grad():
            acc = (model(val.tensors[0]).argmax(1) == val.tensors[1]).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1:2d}  train loss {total[0] / total[1]:.4f}  val acc {acc:.3f}", flush=True)

    if rank == 0:
        rep = report(ddp)
        quantized = sum(r.quantized for r in rep.rows)
        print(f"\n{args.recipe} on {world} ranks: {quantized}/{len(rep.rows)} products quantized "
              f"in {rep.graphs} graph(s)")
        if args.compress:
            print(f"8-bit all-reduce: {hook_state.bytes_sent} bytes sent vs {hook_state.bytes_float32} "
                  f"float32 ({hook_state.ratio:.3f}x), {hook_state.per_rank_bits(world)} bits per rank")
    # Release DDP's reducer (it holds the process group) while every rank is still here: seen
    # once, a rank whose reducer was freed after destroy_process_group hung in gloo's destructor.
    dist.barrier()
    del ddp
    dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="psq8", help="an FQTConfig recipe (psq8, bhq5, qat8, off ...)")
    p.add_argument("--compress", action="store_true", help="8-bit unbiased all-reduce of gradient buckets")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait for a peer")
    p.add_argument("--spawn", type=int, default=0, metavar="N",
                   help="start N local processes here instead of running under torchrun")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.spawn:
        launch(main, args.spawn, (args,), timeout_s=60 + args.epochs * 60)
    elif "RANK" not in os.environ:
        raise SystemExit("run under torchrun (torchrun --nproc-per-node 2 examples/train_ddp.py) or pass --spawn 2")
    else:
        main(args)
