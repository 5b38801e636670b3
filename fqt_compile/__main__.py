"""``python -m fqt_compile`` and the ``fqt-compile`` console script (see :mod:`fqt_compile.cli`)."""

from __future__ import annotations

import sys
from typing import Sequence

from .cli import main as _main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
