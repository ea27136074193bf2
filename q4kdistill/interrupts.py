"""Ctrl-C for the command line: exit status 130 and one line, at any moment, never a traceback.

Two handlers, one per phase of a run:

    exit_at_once     while modules load (before ``cli.main``'s try): prints the line and leaves
                     with os._exit(130), because no Python frame is there to catch anything and
                     an import must not swallow it
    raise_interrupt  inside ``cli.main``: records the Ctrl-C and raises KeyboardInterrupt, which
                     ``main`` prints as the line; ``seen()`` lets main exit 130 even when a
                     library caught the KeyboardInterrupt and carried on

``install_early`` is called first thing by ``q4kdistill/__init__.py`` and does something only in a
process started as the command (``python -m q4kdistill`` or the ``q4kdistill`` script), never in
a program or test that imports the package. The distill loop installs its own handler while it
trains (first Ctrl-C: finish the step and save) and puts the previous one back after.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

LINE = b"q4kdistill: interrupted\n"
_seen = threading.Event()


def exit_at_once(signum, frame):
    try:
        os.write(2, LINE)
    finally:
        os._exit(130)


def raise_interrupt(signum, frame):
    _seen.set()
    raise KeyboardInterrupt


def seen() -> bool:
    return _seen.is_set()


def started_as_command() -> bool:
    """True in ``python -m q4kdistill ...`` (argv[0] is "-m" while the package loads) and in the
    console script (argv[0] is its path)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) in ("q4kdistill", "q4kdistill.exe")


def install_early() -> None:
    if started_as_command() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, exit_at_once)


def install():
    """``cli.main``'s handler (main thread only: elsewhere signals cannot be handled); returns the
    handler it replaced, for ``restore``."""
    _seen.clear()
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGINT, raise_interrupt)
    return None


def restore(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)
