"""Counter-based uniform random numbers for stochastic rounding.

A uniform draw is a pure function of ``(seed, element index)``: an integer hash, written only
with elementwise int64 tensor ops (xor, shift, multiply, mask), so that

* the same seed gives the same draws on every call path (eager, fake, inductor-compiled),
* a compiler can fuse the generator into the quantize kernel (no ``torch.rand`` call, which is
  slow on CPU and is a separate kernel),
* a run is reproducible under ``torch.manual_seed``: seeds themselves come from the global
  generator through :func:`new_seed`, one draw per quantizer call, so no seed is ever reused
  by design (a graph never bakes a seed in as a constant).

The hash is the 32-bit "xorshift-multiply" finalizer (multiplier 0x45D9F3B, below 2**31 so
that every product of a 32-bit value fits in int64 without signed overflow), applied twice
with the seed mixed in between. The top 24 bits of the result give ``u = k * 2**-24``,
which is exact in float32 and lies in ``[0, 1)``.
"""

from __future__ import annotations

import torch

__all__ = ["new_seed", "uniform_from_seed", "hash32"]

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B
_SEED_BOUND = 2**62


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Mix the low 32 bits of an int64 tensor; returns values in ``[0, 2**32)`` as int64."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    return (x >> 16) ^ x


def new_seed(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh seed: a 0-d int64 tensor drawn from the global generator.

    Drawing it with ``torch.randint`` (and not in Python) matters inside compiled graphs: the
    draw becomes a graph node that runs every step instead of a constant baked in at trace
    time, which would repeat the same rounding every step.
    """
    return torch.randint(0, _SEED_BOUND, (), dtype=torch.int64, device=device)


def uniform_from_seed(
    seed: torch.Tensor, shape: torch.Size | tuple[int, ...], *, device: torch.device | None = None
) -> torch.Tensor:
    """Uniform ``[0, 1)`` float32 draws for every element of ``shape`` (row-major index).

    ``seed`` is a 0-d int64 tensor (see :func:`new_seed`). Element ``i`` of the flattened
    shape gets ``h(h(i_lo ^ s_lo) ^ (s_hi + i_hi))`` with ``s = seed``, ``i_lo``/``i_hi`` the low
    and high 32 bits of ``i``; different seeds give unrelated streams.
    """
    device = seed.device if device is None else device
    numel = 1
    for s in shape:
        numel *= int(s)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    seed = seed.to(device=device, dtype=torch.int64)
    s_lo = hash32(seed)
    s_hi = hash32((seed >> 32) ^ 0x5BD1E995)
    h = hash32((idx & _MASK32) ^ s_lo)
    h = hash32(h ^ ((s_hi + (idx >> 32)) & _MASK32))
    return ((h >> 8).to(torch.float32) * (1.0 / 16777216.0)).reshape(shape)
