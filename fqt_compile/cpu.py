"""CPU runtime settings that training steps on large tensors depend on.

PyTorch's CPU allocator hands every tensor to ``malloc``. With glibc, a block larger than the
mmap threshold (at most 32 MiB, and 128 KiB until a large block has been freed) is mapped
fresh and unmapped on free, and the top of the heap is trimmed back to the OS as soon as it
is free: the next step's tensor of the same size is then new memory again, and the kernel
zeroes every 4 KiB page at its first write. A compiled FQT step allocates many large
short-lived buffers (int8 codes, int32 GEMM results, gradients), so on a CPU that page
faulting can cost more than the arithmetic: a copy of an 8192 x 1024 float32 tensor took
8.1-9.7 ms on the development machine with glibc's default behaviour and 2.0-2.3 ms with freed
memory reused, and a GPT training step 3.9 s vs 3.05 s (``benchmarks/bench_quantizers.py`` and
``benchmarks/bench_training.py``, ``--malloc default`` vs ``keep``; docs/performance.md).

:func:`keep_freed_memory` asks glibc to keep freed memory for reuse instead (``mallopt``:
no mmap for large blocks, no trimming), the same effect that preloading jemalloc or tcmalloc
gives. The process then holds on to its peak heap until it exits. It changes the whole
process, so it is opt-in: the library never calls it by itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["describe", "keep_freed_memory"]

log = logging.getLogger(__name__)

#: the instruction-set flags that decide which kernels run (AMX GEMMs, AVX-512 fused kernels)
_ISA_FLAGS = ("amx_int8", "amx_bf16", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni")


def describe() -> dict[str, object]:
    """The CPU, for benchmark results: its model name and logical CPUs (``/proc/cpuinfo``;
    ``platform.processor()`` is empty on Linux) and which of the instruction sets the kernels
    depend on it has, and the x86 family and model numbers, which tell CPU generations apart
    where a VM's model name does not ("AMD EPYC" is Zen 4 at family 25, Zen 5 at family 26).
    Timings from two machines of one cloud kind can differ in all of these (docs/performance.md
    has runs on an Intel CPU with AMX and on AMD ones without)."""
    from .cbuild import cpu_flags

    model, cpus = platform.processor() or platform.machine(), 0
    ids: dict[str, int] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    model = value
                    cpus += 1
                elif key in ("cpu family", "model") and value.isdigit():
                    ids.setdefault("family" if key == "cpu family" else "model_number", int(value))
    except OSError:
        pass
    flags = cpu_flags()
    return {"model": model, "logical_cpus": cpus or None, **ids, "isa": [f for f in _ISA_FLAGS if f in flags]}


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (process-wide, not undoable).

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap, not from fresh mappings) and
    ``M_TRIM_THRESHOLD`` to its maximum (freed heap is not returned to the OS), like the
    environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` set before start.
    Returns True when both settings were applied; False (with a log message, nothing changed)
    where the C library is not glibc or refuses them.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("keep_freed_memory: not glibc (%s %s); nothing changed", platform.system(), platform.libc_ver()[0])
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    log.info("keep_freed_memory: glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=%d) %s", _INT_MAX,
             "applied" if ok else "refused")
    return ok
