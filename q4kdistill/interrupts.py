"""Ctrl-C for the command line: exit status 130 and one line, at any moment, never a traceback.

A process started as the command (``python -m q4kdistill`` or the ``q4kdistill`` script) gets
``exit_at_once`` as its SIGINT handler from the first line of ``q4kdistill/__init__.py`` on: it
removes the half-written files registered with ``partial`` (outputs are written under a
temporary name and renamed when complete, so the previous file is intact), prints the line and
leaves with os._exit(130). Raising KeyboardInterrupt instead is not safe while modules load: an
import may swallow it (numpy turns it into an ImportError) or print it from a callback as
"Exception ignored", and the run would go on.

The distill loop installs its own handler while it trains (first Ctrl-C: finish the step and
save; second: KeyboardInterrupt, which ``cli.main`` prints as the same line) and puts this one
back after. A program or test that imports the package keeps its own handler: nothing here runs.

Not covered: Ctrl-C before Python runs our first line (interpreter start-up and the ``.pth``
hooks of site-packages) is Python's own, as for any Python program.
"""
from __future__ import annotations

import _signal          # the C module Python has loaded already: ``signal`` builds enums on import
import os
import sys

LINE = b"q4kdistill: interrupted\n"
_partial: set = set()


def exit_at_once(signum, frame):
    try:
        for path in list(_partial):
            try:
                os.remove(path)
            except OSError:
                pass
        os.write(2, LINE)
    finally:
        os._exit(130)


def started_as_command() -> bool:
    """True in ``python -m q4kdistill ...`` (argv[0] is "-m" while the package loads, then the
    path of __main__.py) and in the console script (argv[0] is its path)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) in ("q4kdistill", "q4kdistill.exe") or \
        argv0.endswith(os.path.join("q4kdistill", "__main__.py"))


def install_early() -> None:
    """``exit_at_once`` for SIGINT, in the command's process only (signals go to the main thread;
    elsewhere signal() raises ValueError and there is nothing to install)."""
    if started_as_command():
        try:
            _signal.signal(_signal.SIGINT, exit_at_once)
        except ValueError:
            pass


class partial:
    """``with partial(path):`` while inside, ``path`` is a half-written file that a Ctrl-C removes."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        _partial.add(self.path)
        return self.path

    def __exit__(self, *exc):
        _partial.discard(self.path)
        return False
