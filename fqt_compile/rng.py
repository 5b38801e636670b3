"""Counter-based uniform random numbers for stochastic rounding.

A uniform draw is a pure function of ``(seed, element index)``: an integer hash, written only
with elementwise int32 tensor ops (xor, shift, mask, wrapping multiply), so that

* the same seed gives the same draws on every call path (eager, fake, inductor-compiled),
* a compiler can fuse the generator into the quantize kernel (no ``torch.rand`` call, which is
  slow on CPU and is a separate kernel), in 32-bit vector lanes (twice as many per
  instruction as int64, and no 64-bit multiplies),
* a run is reproducible under ``torch.manual_seed``: seeds themselves come from the global
  generator through :func:`new_seed`, one draw per quantizer call, so no seed is ever reused
  by design (a graph never bakes a seed in as a constant).

The hash is the 32-bit "xorshift-multiply" finalizer (multiplier 0x45D9F3B) on the bits of an
int32 tensor read as unsigned: the right shift is arithmetic on int32, so ``(x >> 16) & 0xFFFF``
writes the logical shift; the multiply wraps modulo 2**32 (two's complement). It is applied
twice, with the seed's two halves (each hashed) mixed in before each. The top 24 bits of the
result give ``u = k * 2**-24``, which is exact in float32 and lies in ``[0, 1)``.

:func:`new_seed` is the custom op ``fqt::new_seed`` (tagged ``nondeterministic_seeded``): inside
a compiled graph it stays one call that writes a 0-d tensor, which the quantize kernels read.
The tag does not stop AOTAutograd's CSE from merging identical ``new_seed`` calls; the
backend's ``passes/split_seeds.py`` splits them again (one seed node per quantizer). A ``torch.randint`` node there would instead be inlined
by inductor into every kernel that reads the seed and re-run (a Philox draw) for every vector of
16 elements.
"""

from __future__ import annotations

import torch

import contextlib
from typing import Iterator

__all__ = [
    "new_seed",
    "rounding_generator",
    "ROUNDING_STREAM",
    "DROPOUT_STREAM",
    "uniform_from_seed",
    "uniform_at",
    "hash32",
    "seed_words",
    "seed_words_int",
]

_MULT = 0x45D9F3B
_SEED_BOUND = 2**62
_SEED_HI_SALT = 0x5BD1E995

#: ``stream`` of a seed that stochastic rounding uses (every quantizer of a gradient, of a
#: collective's payload).
ROUNDING_STREAM = 0
#: ``stream`` of a counter-based dropout's seed (``fqt::dropout``).
DROPOUT_STREAM = 1

# The generator that rounding seeds come from while :func:`rounding_generator` is active.
_rounding_generator: torch.Generator | None = None

torch.library.define(
    "fqt::new_seed",
    "(Device device, int stream=0) -> Tensor",
    tags=(torch.Tag.nondeterministic_seeded,),
)


@torch.library.impl("fqt::new_seed", "CompositeExplicitAutograd")
def _new_seed_impl(device: torch.device, stream: int = ROUNDING_STREAM) -> torch.Tensor:
    gen = _rounding_generator if stream == ROUNDING_STREAM else None
    if gen is None:
        return torch.randint(0, _SEED_BOUND, (), dtype=torch.int64, device=device)
    # the generator lives on the CPU: one 8-byte copy to another device
    return torch.randint(0, _SEED_BOUND, (), dtype=torch.int64, generator=gen).to(device)


@torch.library.register_fake("fqt::new_seed")
def _new_seed_fake(device: torch.device, stream: int = ROUNDING_STREAM) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device=device)


@contextlib.contextmanager
def rounding_generator(generator: torch.Generator) -> Iterator[torch.Generator]:
    """While active, the seeds of stochastic rounding (``stream`` 0) are drawn from
    ``generator`` (a CPU ``torch.Generator``) instead of the global generator, in eager and in
    compiled graphs alike (the draw is an op that runs every call). Dropout seeds and
    everything else that is random keep drawing from the global generator, so that
    reseeding the global generator repeats the same dropout masks while the rounding changes:
    how :func:`fqt_compile.gradient_variance` holds the masks fixed across the passes on one
    batch. Not thread-safe (one process-wide setting); nests."""
    global _rounding_generator
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"rounding_generator: expected a CPU torch.Generator, got {generator!r}")
    before, _rounding_generator = _rounding_generator, generator
    try:
        yield generator
    finally:
        _rounding_generator = before


def _exempt_from_aot_cse() -> bool:
    """Add ``fqt::new_seed`` to the random ops that AOTAutograd's CSE leaves alone (its list
    ``torch._functorch.compile_utils.rand_ops``; the CSE does not read the op's tag), so that a
    graph compiled by any backend, plain inductor included, keeps one seed draw per quantizer.
    The fqt backend does not rely on this: its first pass, ``passes/split_seeds.py``, splits
    merged draws again. False where this torch has no such list."""
    try:
        from torch._functorch import compile_utils
    except ImportError:  # pragma: no cover - torch without functorch's compile utils
        return False
    ops = getattr(compile_utils, "rand_ops", None)
    if not isinstance(ops, list):
        return False
    if torch.ops.fqt.new_seed not in ops:
        ops.append(torch.ops.fqt.new_seed)
    return True


CSE_EXEMPT = _exempt_from_aot_cse()

# ``fqt::column_index(n, device)``: ``arange(n)`` as int32, a separate op on purpose.
#
# ``passes/decompose_fqt.py`` builds the generator's flat index of an (N, D) tensor on the CPU as
# ``row * D + column_index(D)``. Were the column index an iota, inductor's vectorized C++ would
# write it as ``Vectorized<int32_t>::arange(base, 1)``: sixteen scalar adds and lane inserts per
# vector of 16 draws, 17% of a per-row stochastic quantize kernel's time on the AMD machine of
# docs/performance.md ("Quantize kernels"). Read from this (D,) buffer it is one vector
# load. The op runs once per quantizer call (a D-element arange).
torch.library.define("fqt::column_index", "(SymInt n, Device device) -> Tensor")


@torch.library.impl("fqt::column_index", "CompositeExplicitAutograd")
def _column_index_impl(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=device)


@torch.library.register_fake("fqt::column_index")
def _column_index_fake(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty((n,), dtype=torch.int32, device=device)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int32 bits."""
    return (x >> n) & ((1 << (32 - n)) - 1)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Mix 32-bit values: an int32 tensor in, int32 out (bits read as unsigned). A bijection on
    32 bits. Other integer dtypes are reduced to their low 32 bits first."""
    if x.dtype != torch.int32:
        x = x.to(torch.int32)  # keeps the low 32 bits (two's complement)
    x = (_shr(x, 16) ^ x) * _MULT
    x = (_shr(x, 16) ^ x) * _MULT
    return _shr(x, 16) ^ x


def seed_words(seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two hashed 32-bit halves ``(s_lo, s_hi)`` of an int64 seed (int32 0-d tensors)."""
    seed = seed.to(torch.int64)
    return hash32(seed), hash32((seed >> 32).to(torch.int32) ^ _SEED_HI_SALT)


def _hash32_int(x: int) -> int:
    """:func:`hash32` of the low 32 bits of a Python int, as an unsigned int."""
    x &= 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * _MULT) & 0xFFFFFFFF
    return (x >> 16) ^ x


def seed_words_int(seed: int) -> tuple[int, int]:
    """:func:`seed_words` of an int64 seed given as a Python int, as unsigned 32-bit ints: what
    the C kernels take, without a dozen tensor ops on 0-d tensors per call."""
    return _hash32_int(seed), _hash32_int((seed >> 32) ^ _SEED_HI_SALT)


def new_seed(device: torch.device | str | None = None, stream: int = ROUNDING_STREAM) -> torch.Tensor:
    """A fresh seed: a 0-d int64 tensor drawn from the global generator (``fqt::new_seed``;
    rounding seeds, ``stream`` 0, from :func:`rounding_generator`'s while one is active).

    Drawing it in an op (and not in Python) matters inside compiled graphs: the draw becomes a
    graph node that runs every step instead of a constant baked in at trace time, which would
    repeat the same rounding every step.
    """
    if stream not in (ROUNDING_STREAM, DROPOUT_STREAM):
        raise ValueError(f"new_seed: stream must be {ROUNDING_STREAM} (rounding) or {DROPOUT_STREAM} (dropout), got {stream!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if stream == ROUNDING_STREAM:
        return torch.ops.fqt.new_seed(device)
    return torch.ops.fqt.new_seed(device, stream)


def uniform_from_seed(
    seed: torch.Tensor, shape: torch.Size | tuple[int, ...], *, device: torch.device | None = None
) -> torch.Tensor:
    """Uniform ``[0, 1)`` float32 draws for every element of ``shape`` (row-major index).

    ``seed`` is a 0-d int64 tensor (see :func:`new_seed`). Element ``i`` of the flattened
    shape gets ``h(h(i_lo ^ s_lo) ^ (s_hi + i_hi))`` with ``(s_lo, s_hi)`` =
    :func:`seed_words`, ``i_lo``/``i_hi`` the low and high 32 bits of ``i`` (all 32-bit
    arithmetic); different seeds give unrelated streams.
    """
    device = seed.device if device is None else device
    numel = 1
    for s in shape:
        numel *= int(s)
    dtype = torch.int32 if numel < 2**31 else torch.int64
    return uniform_at(seed.to(device=device), torch.arange(numel, dtype=dtype, device=device)).reshape(shape)


def uniform_at(seed: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The draws of :func:`uniform_from_seed` at flat indices ``idx`` (int32 below 2**31,
    else int64: its high word enters the second hash)."""
    s_lo, s_hi = seed_words(seed)
    if idx.dtype == torch.int64:
        s_hi = s_hi + (idx >> 32).to(torch.int32)
    h = hash32(hash32(idx.to(torch.int32) ^ s_lo) ^ s_hi)
    return _shr(h, 8).to(torch.float32) * (1.0 / 16777216.0)
