"""`q4kdistill` command line: one sub-command per module in this package (argument parsing only:
the work lives in the library packages beside it).

Each command module defines
    NAME = "inspect"                    # the sub-command
    HELP = "one line"
    def add_arguments(parser): ...      # argparse options
    def run(args) -> int: ...           # heavy imports inside run(), not at module top

Errors a user can cause are raised as ``Q4KError`` and printed here as one line
("q4kdistill: error: ..."), exit status 2, never a traceback; so are argparse's own errors.

Ctrl-C: as the command, ``q4kdistill/__init__.py`` installs ``interrupts.exit_at_once`` before
its first import (exit 130, one line, at any moment; see interrupts.py); a KeyboardInterrupt
that reaches ``main`` (distill's second Ctrl-C, or main called from Python) ends the same way.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import interrupts
from ..errors import Q4KError


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as our one line (exit status 2) instead of usage + message."""

    def error(self, message):
        self.exit(2, f"q4kdistill: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="q4kdistill",
        description="Knowledge distillation from a frozen, quantized (GGUF Q4_K) teacher on one GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _out_of_memory_message(exc) -> str | None:
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return ("the GPU ran out of memory: " + str(exc).splitlines()[0] +
                "\n  run `q4kdistill plan` with the same sizes to see the estimate, and lower"
                " --batch, --seq or --chunk-tokens (or turn on --checkpoint-activations)")
    return None


def main(argv=None) -> int:
    interrupts.install_early()                       # the console script may import cli first
    try:
        args = build_parser().parse_args(argv)
        return int(args._run(args) or 0)
    except Q4KError as exc:
        print(f"q4kdistill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("q4kdistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `q4kdistill inspect X | head`
        sys.stderr.close()
        return 0
    except MemoryError as exc:
        print(f"q4kdistill: error: out of host memory ({exc})", file=sys.stderr)
        return 2
    except Exception as exc:  # CuPy's OutOfMemoryError has no common base we can import lazily
        msg = _out_of_memory_message(exc)
        if msg is None:
            raise
        print(f"q4kdistill: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
