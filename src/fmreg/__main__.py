"""The ``fmreg`` console script and ``python -m fmreg``: :func:`fmreg.cli.main`, with Ctrl-C
handled from the first import on.

Importing the command line loads torch, which takes seconds; a Ctrl-C in that time would
otherwise end in a KeyboardInterrupt traceback, or, when it lands inside torch's C++ module
initialisation, in an abort ("terminate called after throwing an instance of
'pybind11::error_already_set'"). This module imports nothing heavy itself; while the command
line is imported, Ctrl-C ends the process at once with one line and status 130 (nothing has
been read or written yet, so there is nothing to clean up). Afterwards :func:`fmreg.cli.main`
handles it (staged outputs are removed, status 130).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

#: Exit status of a command ended by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
MESSAGE = "fmreg: interrupted"


def _exit_interrupted(signum: int, frame: object) -> None:
    # No exception: one raised inside a C++ extension's import would abort the process.
    print(MESSAGE, file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def _import_cli():
    """``fmreg.cli.main``, imported with Ctrl-C ending the process cleanly meanwhile."""
    try:
        previous = signal.signal(signal.SIGINT, _exit_interrupted)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        from fmreg.cli import main as cli_main
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fmreg`` command line; returns the exit status (130 when interrupted).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    try:
        return _import_cli()(argv)
    except KeyboardInterrupt:
        print(MESSAGE, file=sys.stderr, flush=True)
        return INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
