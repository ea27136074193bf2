"""Training checkpoints: one `.npz` file per run directory, written atomically.

    DIR/checkpoint.npz
        arrays   every array of the saved state, under its path in the state tree
                 ("params/blk.0.attn_q.weight", "optimizer/m", "data/perm", ...)
        __meta__ uint8 [n]: UTF-8 JSON holding everything else:
                 {"format": 1, "step": int, "fingerprint": {...}, "config": {...},
                  "state": the state tree with each array replaced by {"__array__": path}}

Atomic: the file is written next to its final name and moved over it with ``os.replace``,
so a crash (or Ctrl-C) mid-write leaves the previous checkpoint intact, never a torn one.

The *fingerprint* says what must match for a resume to continue the same run bit for bit
(teacher file, student shape, data, batch shape, loss...). ``check_fingerprint`` refuses a
checkpoint whose fingerprint differs and names the fields that do.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .. import backend
from ..errors import Q4KError

FILE_NAME = "checkpoint.npz"
FORMAT = 1
_META = "__meta__"


def checkpoint_path(path) -> str:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = os.fspath(path)
    return os.path.join(path, FILE_NAME) if os.path.isdir(path) or not path.endswith(".npz") else path


def exists(path) -> bool:
    return os.path.isfile(checkpoint_path(path))


# -- the state tree <-> (flat arrays, JSON) -----------------------------------------------

def _flatten(obj, prefix, arrays):
    """Replace every array in a tree of dicts/lists/scalars by a reference into ``arrays``."""
    if isinstance(obj, dict):
        return {str(k): _flatten(v, f"{prefix}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and getattr(obj, "ndim", 0) > 0:
        arrays[prefix] = np.ascontiguousarray(backend.to_host(obj))
        return {"__array__": prefix}
    if isinstance(obj, np.generic) or (hasattr(obj, "item") and getattr(obj, "ndim", None) == 0):
        return obj.item()
    return obj


def _unflatten(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _unflatten(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, arrays) for v in obj]
    return obj


# -- save / load -----------------------------------------------------------------------

def save(path, *, step: int, state: dict, config: dict, fingerprint: dict) -> str:
    """Write the checkpoint atomically; returns its path. ``state`` may hold NumPy/CuPy arrays."""
    final = checkpoint_path(path)
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    arrays: dict = {}
    tree = _flatten(state, "", arrays)
    meta = {"format": FORMAT, "step": int(step), "fingerprint": fingerprint, "config": config, "state": tree}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


class Checkpoint:
    """A loaded checkpoint: ``step``, ``state`` (NumPy arrays), ``config``, ``fingerprint``."""

    def __init__(self, path, step, state, config, fingerprint):
        self.path, self.step, self.state, self.config, self.fingerprint = path, step, state, config, fingerprint


def load(path) -> Checkpoint:
    file = checkpoint_path(path)
    if not os.path.isfile(file):
        raise Q4KError(f"{path}: no checkpoint there (expected {file})")
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        raise Q4KError(f"{file}: not a readable q4kdistill checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise Q4KError(f"{file}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    return Checkpoint(file, meta["step"], _unflatten(meta["state"], arrays), meta["config"], meta["fingerprint"])


def check_fingerprint(ckpt: Checkpoint, expected: dict) -> None:
    """Refuse to resume a checkpoint made by another configuration (one line naming what differs)."""
    differ = sorted(k for k in set(expected) | set(ckpt.fingerprint) if expected.get(k) != ckpt.fingerprint.get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {ckpt.fingerprint.get(k)!r}, now {expected.get(k)!r}" for k in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise Q4KError(f"{ckpt.path} was made by another configuration and cannot be resumed: {shown}{more}"
                       " — use a new --out directory, or the original settings")
