"""The benchmarks' shared ``--malloc keep|default`` option.

``keep`` (the default) calls ``fqt_compile.keep_freed_memory()`` before anything is measured, so
large outputs reuse freed memory instead of being page-faulted in on every call or step (glibc;
see docs/performance.md); ``default`` leaves malloc as it is. The choice is recorded in each
script's JSON.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_malloc_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--malloc", choices=("default", "keep"), default="keep",
                    help="keep: fqt_compile.keep_freed_memory() first (freed blocks reused instead of "
                         "page-faulted in afresh); default: leave malloc as is")


def apply_malloc(choice: str) -> str:
    """Apply ``--malloc``; returns the label to record (``keep`` may not apply off glibc)."""
    if choice != "keep":
        return choice
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fqt_compile.cpu import keep_freed_memory

    if keep_freed_memory():
        return "keep"
    print("--malloc keep: not applied on this C library; running with the default allocator", file=sys.stderr)
    return "default (keep not applied)"
