"""Output paths checked before the work starts, and write errors as one line.

    output_file("lg.npy", "--out")      # the parent is a writable folder, the path no folder
    output_dir("out", create=True)      # a folder (made if missing) we can write in
    with writing(path): ...             # OSError (disk full, read-only, file too large) -> Q4KError

A command checks its outputs first, so a wrong --out costs nothing; what it writes goes to a
temporary name that replaces the final one only when complete (the old file survives a failure).
"""
from __future__ import annotations

import contextlib
import os

from ..errors import Q4KError
from ..interrupts import partial


def output_file(path, what: str = "output") -> str:
    """``path`` if a file can be written there; Q4KError (one line) otherwise."""
    path = os.fspath(path)
    if not path:
        raise Q4KError(f"{what}: empty path")
    if os.path.isdir(path):
        raise Q4KError(f"{what} {path}: is a folder, expected a file name")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise Q4KError(f"{what} {path}: exists and is not a regular file")
    _writable_dir(os.path.dirname(os.path.abspath(path)), what, path)
    return path


def output_dir(path, create: bool = False, what: str = "--out") -> str:
    """``path`` if it is (or, with ``create``, can become) a writable folder; Q4KError otherwise."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise Q4KError(f"{what} {path}: exists and is not a folder")
    if not os.path.isdir(path):
        parent = _existing_parent(os.path.abspath(path))
        _writable_dir(parent, what, path)
        if create:
            with writing(path):
                os.makedirs(path, exist_ok=True)
        return path
    _writable_dir(path, what, path)
    return path


def _existing_parent(path: str) -> str:
    """The nearest existing ancestor of ``path``; Q4KError if that is not a folder."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _writable_dir(folder: str, what: str, path: str) -> None:
    if not os.path.exists(folder):
        raise Q4KError(f"{what} {path}: the folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise Q4KError(f"{what} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Q4KError(f"{what} {path}: the folder {folder} is not writable")


@contextlib.contextmanager
def writing(path):
    """Turn an OSError raised inside into one line naming ``path`` and the reason."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise Q4KError(f"cannot write {os.fspath(path)}: {reason}") from None


def atomic_write(path, write) -> None:
    """``write(file object)`` into PATH.part, then rename it over ``path``; on any failure the
    part file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    tmp = path + ".part"
    try:
        with writing(path), partial(tmp):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
