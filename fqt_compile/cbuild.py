"""Building the small C kernels of this package (``amx.py``, ``softmax_quant.py``) at first use.

Each kernel module holds its C source as a string; :func:`build` compiles it with gcc into a
shared library cached under ``$FQT_CACHE_DIR`` (default ``~/.cache/fqt_compile``), keyed by a
hash of the source, the flags and the compiler, and the module loads it with ctypes. A build
writes to a temporary file and renames it into place, so concurrent processes are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

log = logging.getLogger(__name__)

__all__ = ["build", "cpu_flags", "load", "unsupported_platform"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unsupported_platform(needed: set[str]) -> str | None:
    """Why a kernel needing the CPU flags ``needed`` cannot run here, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.system()} {platform.machine()} (needs Linux x86-64)"
    missing = needed - cpu_flags()
    if missing:
        return f"the CPU lacks {sorted(missing)}"
    return None


def _cache_dir() -> str:
    base = os.environ.get("FQT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fqt_compile")
    try:
        os.makedirs(base, exist_ok=True)
        return base
    except OSError:
        return tempfile.gettempdir()


def build(name: str, source: str, flags: list[str]) -> str:
    """Path of the shared library compiled from ``source`` with ``flags`` (cached)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    key = hashlib.sha256((source + " ".join(flags) + cc).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"{name}_{key}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        c_file, so_file = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
        with open(c_file, "w", encoding="utf-8") as f:
            f.write(source)
        res = subprocess.run([cc, *flags, c_file, "-o", so_file], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-400:]}")
        shutil.copyfile(so_file, path + f".{os.getpid()}.tmp")
        os.replace(path + f".{os.getpid()}.tmp", path)  # atomic: concurrent builds are safe
    return path


def load(name: str, source: str, flags: list[str], *, env: str, needs: set[str],
         fallback: str) -> tuple[ctypes.CDLL | None, str]:
    """The kernel library built from ``source``, or None, and why, in words: off when the
    environment sets ``env=0``, not available where the CPU lacks a flag of ``needs`` or the
    build fails (logged, with ``fallback``: what runs instead)."""
    if os.environ.get(env, "1") == "0":
        return None, f"off ({env}=0)"
    why = unsupported_platform(needs)
    if why:
        return None, f"not available: {why}"
    try:
        return ctypes.CDLL(build(name, source, flags)), ""
    except Exception as e:  # noqa: BLE001 - any build/load failure means: the fallback runs
        log.warning("fqt %s kernel not built (%s); %s", name, e, fallback)
        return None, f"not available: build failed ({e})"
