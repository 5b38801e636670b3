"""Tests of :mod:`fqt_compile.cpu`.

``keep_freed_memory`` changes the whole process, so each case runs in a fresh interpreter.
What it must change is counted, not timed: the minor page faults of re-allocating and writing
a 64 MiB tensor after freeing some of the same size (16384 pages of 4 KiB when the memory is
mapped fresh; near 0 when it is reused).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_PROBE = """
import resource, sys, torch
import fqt_compile.cpu as cpu
applied = cpu.keep_freed_memory() if sys.argv[1] == "keep" else None
def refill():
    t = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
    t.fill_(1.0)
    return t
for _ in range(8):  # warm up: the heap settles (a small block may split the first free one;
    # with torch 2.14's build one of the first 4 re-allocations was still fresh in most runs)
    del_me = refill(); del del_me
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    t = refill(); del t
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    _, default = _faults("default")
    applied, kept = _faults("keep")
    assert applied == "True"
    # default glibc: each 64 MiB block is a fresh mapping, 4 x 16384 pages faulted in (fewer
    # with transparent huge pages, but thousands); kept: the freed block is reused.
    assert default > 4 * 1000, default
    assert kept < 500, kept


def test_describe_names_the_cpu_and_its_kernel_isa():
    """Benchmark results record which CPU they ran on and whether it has the instruction sets
    the kernels choose by (AMX, AVX-512): the flags are a subset of /proc/cpuinfo's."""
    import fqt_compile.cpu as cpu_mod
    from fqt_compile.cbuild import cpu_flags

    d = cpu_mod.describe()
    assert isinstance(d["model"], str) and d["model"]
    assert set(d["isa"]) <= cpu_flags()
    assert ("amx_int8" in d["isa"]) == ("amx_int8" in cpu_flags())
    # the generation, where the model name hides it (/proc/cpuinfo on x86 Linux has both)
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        assert isinstance(d["family"], int) and isinstance(d["model_number"], int)
