"""FQT on ``torch.distributed``: per-rank seeds, a compressed unbiased all-reduce, a launcher.

- :func:`seed_everything` seeds each rank with :func:`rank_seed` ``(base_seed, rank)`` so that
  the stochastic rounding of Q_b1 / Q_b2 (seeds drawn from the global generator, one per
  quantizer call, see :mod:`fqt_compile.rng`) is distinct across ranks and reproducible.
- :func:`quantized_allreduce_hook` is a DDP communication hook that sends gradient buckets as
  8-bit codes: every rank rounds its bucket stochastically (the project's
  :func:`~fqt_compile.quantizers.stochastic_quantize`, unbiased) on a *shared* per-block range,
  so the codes of all ranks sum exactly in a ``uint8`` all-reduce, and the mean it returns is
  an unbiased estimator of the float all-reduce mean.
- :func:`report` is the inspection report of a model compiled with ``fqt_compile.compile``
  (directly, inside ``DistributedDataParallel``, or as FSDP2 sub-units).
- :func:`launch` runs a function on ``world_size`` local processes (gloo, 127.0.0.1) with a
  hard timeout, and raises naming the rank that failed instead of hanging.

See docs/distributed.md for the supported wrapping orders and what "equivalent to
single-process training" means with stochastic gradients.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .quantizers import stochastic_quantize
from .rng import new_seed

__all__ = [
    "RANK_SEED_STRIDE",
    "rank_seed",
    "seed_everything",
    "QuantizedAllReduce",
    "quantized_all_reduce",
    "quantized_allreduce_hook",
    "report",
    "launch",
    "DistributedLaunchError",
]

log = logging.getLogger(__name__)

#: Rank ``r`` is seeded with ``base_seed + r * RANK_SEED_STRIDE`` (mod 2^63): a prime, so the
#: seeds of different ranks of one run never coincide with those of nearby base seeds.
RANK_SEED_STRIDE = 2_147_483_647  # 2^31 - 1
_SEED_MOD = 2**63


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def _rank(rank: int | None) -> int:
    if rank is not None:
        return int(rank)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def rank_seed(base_seed: int, rank: int | None = None) -> int:
    """``(base_seed + rank * RANK_SEED_STRIDE) mod 2^63``. ``rank``: default the process
    group's rank (or ``$RANK``, or 0 outside a distributed run)."""
    return (int(base_seed) + _rank(rank) * RANK_SEED_STRIDE) % _SEED_MOD


def seed_everything(base_seed: int, rank: int | None = None) -> int:
    """Seed torch's global generator (and Python's ``random``) with :func:`rank_seed`.

    Every quantizer call draws its seed from the global generator, so after this each rank
    rounds with its own stream (distinct across ranks, the same in every run). Model
    initialization is unaffected in DDP, which broadcasts rank 0's parameters and buffers.
    Returns the seed used."""
    import random

    seed = rank_seed(base_seed, rank)
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


# ---------------------------------------------------------------------------------------------
# Compressed all-reduce
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizedAllReduce:
    """State of :func:`quantized_allreduce_hook` (pass it to ``register_comm_hook``).

    ``bits``: the most bits per element a rank's quantizer may use; the wire carries ``uint8``
    sums of ``world_size`` ranks' levels, so each rank uses
    ``per_rank_bits = min(bits, floor(log2(255 / world_size + 1)))`` (7 bits on 2 ranks, 6 on
    3-4, 5 on 5-8, ...). ``block``: elements per range (one shared ``[lo, hi]`` per block).
    Counters: ``calls``, ``bytes_sent`` (payload handed to all-reduce by this rank: uint8 codes
    plus two float32 per block for the range) and ``bytes_float32`` (what the uncompressed
    float32 all-reduce hands over). Both go through the same all-reduce algorithm, so the
    ratio is also the ratio of bytes on the wire.
    """

    bits: int = 8
    block: int = 1024
    process_group: Any = None
    calls: int = 0
    bytes_sent: int = 0
    bytes_float32: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantizedAllReduce.bits must be an integer in [2, 8], got {self.bits!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"QuantizedAllReduce.block must be a positive integer, got {self.block!r}")

    def per_rank_bits(self, world_size: int) -> int:
        fit = int(math.floor(math.log2(255 / world_size + 1)))
        if fit < 2:
            raise ValueError(
                f"QuantizedAllReduce: {world_size} ranks leave fewer than 2 bits per rank in a uint8 "
                "sum (at most 85 ranks); use the default all-reduce or hierarchical reduction"
            )
        return min(self.bits, fit)

    @property
    def ratio(self) -> float:
        """``bytes_sent / bytes_float32`` so far (about 0.25 + 2 / block)."""
        return self.bytes_sent / self.bytes_float32 if self.bytes_float32 else float("nan")


def quantized_all_reduce(tensor: torch.Tensor, state: QuantizedAllReduce) -> torch.futures.Future:
    """Mean of ``tensor`` over the ranks of ``state.process_group``, sent as 8-bit codes.

    Per block of ``state.block`` elements (the flat tensor is zero-padded to whole blocks)::

        lo, hi   = all_reduce_max(-min x_r), all_reduce_max(max x_r)    shared by every rank
        k_r      = floor((x_r - lo) / s + u),  s = (hi - lo) / B        B = 2^per_rank_bits - 1
        mean     = (sum_r k_r) * s / W + lo                              sum_r k_r <= W B <= 255

    ``E[k_r] = (x_r - lo) / s`` because [lo, hi] contains every x_r (the clamp never bites),
    so ``E[mean] = sum_r x_r / W``: unbiased, with variance per element ``<= s^2 / (4 W)``.
    Every rank computes ``s`` from the same all-reduced floats, so the scales agree bit for
    bit. Returns a future of the mean, in ``tensor``'s shape and dtype.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    bits = state.per_rank_bits(world)
    n = tensor.numel()
    flat = tensor.detach().reshape(-1).to(torch.float32)
    n_blocks = max(1, -(-n // state.block))
    pad = n_blocks * state.block - n
    x2d = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, state.block)  # (N, block)
    ranges = torch.stack([-x2d.amin(dim=1), x2d.amax(dim=1)])  # (2, N): one MAX gives both ends
    seed = new_seed(tensor.device)
    state.calls += 1
    state.bytes_sent += ranges.numel() * 4 + x2d.numel()
    state.bytes_float32 += n * 4
    half = 2 ** (bits - 1)

    # The range all-reduce is tiny (2 floats per block) and waited for here, on the caller's
    # thread; the code all-reduce is asynchronous and its callback never blocks (a callback that
    # waits on another collective can starve gloo's worker threads).
    dist.all_reduce(ranges, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -ranges[0], ranges[1]  # (N,)
    # Appending lo and hi as two extra columns makes each row's range exactly the shared
    # [lo, hi] (it contains the rank's own values), so the project's per-row (PSQ) quantizer
    # rounds every rank on the same grid.
    q = stochastic_quantize(torch.cat([x2d, lo[:, None], hi[:, None]], dim=1), bits, "row", seed)
    levels = (q.codes[:, : state.block].to(torch.int16) + half).to(torch.uint8)  # (N, block) in [0, B]
    scale = q.scale / world  # (N, 1)

    def dequantize_mean(fut: torch.futures.Future) -> torch.Tensor:
        total = fut.value()[0]
        mean = total.to(torch.float32) * scale + lo[:, None]
        return mean.reshape(-1)[:n].reshape(tensor.shape).to(tensor.dtype)

    return dist.all_reduce(levels, group=group, async_op=True).get_future().then(dequantize_mean)


def quantized_allreduce_hook(state: QuantizedAllReduce, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP communication hook: ``ddp.register_comm_hook(QuantizedAllReduce(), quantized_allreduce_hook)``.
    Returns the unbiased 8-bit estimate of the mean gradient bucket (see
    :func:`quantized_all_reduce`)."""
    return quantized_all_reduce(bucket.buffer(), state)


# DDP checks these annotations by identity; under ``from __future__ import annotations`` they
# would be strings.
quantized_allreduce_hook.__annotations__.update(bucket=dist.GradBucket, state=QuantizedAllReduce,
                                                 **{"return": torch.futures.Future[torch.Tensor]})


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------


def report(*compiled: Any, model: str = "model", training: bool = True) -> Any:
    """The inspection report (:class:`fqt_compile.inspect.Report`) of modules compiled with
    ``fqt_compile.compile``, after at least one training step. Pass the model itself, or the
    ``DistributedDataParallel`` wrapping it, or several sub-modules compiled one by one (the
    FSDP2 recipe). ``training``: only the training graphs (evaluation under ``no_grad``
    compiles inference graphs of the same products). Raises ``ValueError`` when nothing was compiled: a model that fell back to
    eager (e.g. a ``fully_shard`` unit compiled as a whole) trains unquantized."""
    from .frontend import records
    from .inspect import report_from_records

    recs = []
    for m in compiled:
        try:
            recs.extend(records(m))
        except ValueError:
            inner = getattr(m, "module", None)  # DistributedDataParallel around a compiled model
            if inner is None:
                raise
            recs.extend(records(inner))
    if training:
        recs = [r for r in recs if r.inference is None]
    if not recs:
        raise ValueError(
            "fqt_compile.distributed.report: no graph was compiled for these modules, so they "
            "ran in eager mode without quantization. Run a training step first; with FSDP2, "
            "compile the children of each fully_shard unit (its hooks disable TorchDynamo on "
            "the unit's own frame); see docs/distributed.md"
        )
    return report_from_records(recs, model=model, training=training)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


class DistributedLaunchError(RuntimeError):
    """A rank of :func:`launch` failed or the run exceeded its timeout."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, fn: Callable[..., Any], world_size: int, port: int, threads: int | None,
              args: Sequence[Any], dump_after_s: float) -> None:
    # a rank still running shortly before the launch's timeout prints every thread's stack to
    # stderr (where it waits), for the error the launcher then raises
    faulthandler.dump_traceback_later(dump_after_s, exit=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    if threads is not None:
        torch.set_num_threads(threads)
    fn(*args)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    threads_per_rank: int | None = 1,
) -> None:
    """Run ``fn(*args)`` in ``world_size`` spawned processes, with the environment ``torchrun``
    sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), so ``fn``
    calls ``dist.init_process_group("gloo")`` as under torchrun. ``fn`` must be importable
    (a module-level function).

    When a rank raises or dies, the others are terminated and :class:`DistributedLaunchError`
    names the rank and carries its traceback; when the run is not done after ``timeout_s``
    seconds (a rank stuck in a collective), every rank is killed and the error says so; 5 s
    before that, each rank still running prints the stacks of its threads to stderr
    (``faulthandler``), to show where it waits.
    """
    if world_size < 1:
        raise ValueError(f"launch: world_size must be >= 1, got {world_size}")
    ctx = mp.start_processes(
        _run_rank, args=(fn, world_size, _free_port(), threads_per_rank, tuple(args), max(1.0, timeout_s - 5.0)),
        nprocs=world_size, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                raise DistributedLaunchError(
                    f"fqt_compile.distributed.launch: {fn.__name__} did not finish within "
                    f"{timeout_s:g} s; ranks still running {alive} were killed (a rank waiting "
                    "in a collective for a peer that never arrives?)"
                )
    except mp.ProcessRaisedException as e:
        raise DistributedLaunchError(
            f"fqt_compile.distributed.launch: rank {e.error_index} of {world_size} failed; "
            f"the other ranks were terminated.\n{e}"
        ) from e
    except mp.ProcessExitedException as e:
        raise DistributedLaunchError(
            f"fqt_compile.distributed.launch: rank {e.error_index} of {world_size} exited with "
            f"code {e.exit_code}; the other ranks were terminated.\n{e}"
        ) from e
