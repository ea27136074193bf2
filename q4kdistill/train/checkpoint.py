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

import dataclasses
import json
import math
import os
import zipfile
import zlib

import numpy as np

from .. import backend
from ..errors import Q4KError
from ..interrupts import partial
from .outputs import writing

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
    with writing(final):
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    arrays: dict = {}
    tree = _flatten(state, "", arrays)
    meta = {"format": FORMAT, "step": int(step), "fingerprint": fingerprint, "config": config, "state": tree}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    tmp = final + ".tmp"
    try:
        with writing(final), partial(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):          # a failed write (disk full, Ctrl-C) leaves the old checkpoint only
            os.remove(tmp)
    return final


class Checkpoint:
    """A loaded checkpoint: ``step``, ``state`` (NumPy arrays), ``config``, ``fingerprint``."""

    def __init__(self, path, step, state, config, fingerprint):
        self.path, self.step, self.state, self.config, self.fingerprint = path, step, state, config, fingerprint
        self.student_config = None                 # the validated ModelConfig (load_student only)


# -- reading: nothing is decompressed or allocated before it is checked -----------------------
#
# A checkpoint is a zip of .npy members (np.savez: stored, not deflated). ``load`` reads the
# central directory, then __meta__ (bounded, JSON schema checked), and takes the member list from
# the state tree __meta__ describes: an unknown, missing, compressed or oversized member is
# refused before any array is read, and each array's .npy header (dtype, shape) is checked
# against its member size, and against the student's config in ``load_student``.

META_LIMIT = 64 << 20          # bytes of __meta__ JSON: the state tree and configs are a few KB
MAX_DEPTH = 32                 # nesting of the state tree


def load(path, expect=None) -> Checkpoint:
    """The checkpoint at ``path`` (a run directory or the .npz), checked as described above.

    ``expect(meta) -> {array name: (dtype, shape)}`` gives what some arrays must be."""
    file = checkpoint_path(path)
    if not os.path.isfile(file):
        raise Q4KError(f"{path}: no checkpoint there (expected {file})")
    try:
        with zipfile.ZipFile(file) as z:
            members = _members(z, file)
            meta = _meta(_read_member(z, members.pop(_META + ".npy"), file, np.dtype(np.uint8), None).reshape(-1), file)
            refs = _array_refs(meta["state"], file)
            wanted = expect(meta) if expect is not None else {}
            for name in sorted(set(members) - {r + ".npy" for r in refs}):
                raise Q4KError(f"{file}: unexpected member {name[:60]!r} (not in the checkpoint's state)")
            arrays = {}
            for ref in refs:
                if ref + ".npy" not in members:
                    raise Q4KError(f"{file}: the array {ref[:60]!r} is missing")
                dtype, shape = wanted.get(ref, (None, None))
                arrays[ref] = _read_member(z, members[ref + ".npy"], file, dtype, shape)
            missing = sorted(set(wanted) - set(refs))
            if missing:
                raise Q4KError(f"{file}: the array {missing[0][:60]!r} is missing")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
            zlib.error) as exc:
        raise Q4KError(f"{file}: not a readable q4kdistill checkpoint ({str(exc)[:100]})") from None
    return Checkpoint(file, meta["step"], _unflatten(meta["state"], arrays), meta["config"], meta["fingerprint"])


def load_student(path) -> Checkpoint:
    """``load`` for a distill checkpoint: the student's config in it is validated, and every
    parameter (float32, the shape the config implies) and the optimizer's m and v (float32
    [n_params]) are checked before they are read. ``student_config`` holds the ModelConfig."""
    found = {}

    def expect(meta):
        config = meta["config"].get("student")
        if not isinstance(meta["config"].get("distill"), dict):
            raise Q4KError(f"{checkpoint_path(path)}: __meta__ has no distill settings (not a distill checkpoint)")
        found["config"] = cfg = student_config(config, checkpoint_path(path))
        shapes = cfg.tensor_shapes()
        n = sum(math.prod(s) for s in shapes.values())
        want = {f"/params/{k}": (np.dtype(np.float32), tuple(s)) for k, s in shapes.items()}
        want.update({f"/optimizer/{k}": (np.dtype(np.float32), (n,)) for k in ("m", "v")})
        return want

    ck = load(path, expect)
    ck.student_config = found["config"]
    _check_run_state(ck)
    return ck


def student_config(d, file):
    """The student's ModelConfig from a checkpoint's config: every field typed and ranged, as a
    model file's metadata would be (validate.py), so its tensor table can be trusted."""
    from ..config import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if not isinstance(d, dict) or set(d) - set(fields) or {"architecture", "n_layers", "d_model"} - set(d):
        raise Q4KError(f"{file}: __meta__ config.student is not a student configuration")
    try:
        cfg = ModelConfig.from_dict(d)
        _check_student(cfg)
    except (TypeError, ValueError) as exc:
        raise Q4KError(f"{file}: __meta__ config.student is not a valid student configuration ({exc})") from None
    return cfg


def _check_student(cfg) -> None:
    from ..config import MAX_WIDTH, SUPPORTED_ARCHITECTURES
    from ..student.spec import WIDTH_LIMITS

    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {cfg.architecture!r}")
    for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size"):
        value = getattr(cfg, name)
        high = WIDTH_LIMITS.get(name, MAX_WIDTH)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{name} = {str(value)[:20]}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError("n_heads is not a multiple of n_kv_heads")
    for name in ("qkv_bias", "qk_norm", "post_norms", "tied_output"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} is not true/false")
    for name in ("norm_eps", "rope_base", "embed_scale"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} = {str(value)[:20]}")
    if not isinstance(cfg.swa_layers, list) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.n_layers for i in cfg.swa_layers):
        raise ValueError("swa_layers")
    if cfg.rope_style not in ("norm", "neox") or cfg.act not in ("silu", "gelu_tanh"):
        raise ValueError("rope_style / act")
    n = sum(math.prod(s) for s in cfg.tensor_shapes().values())
    if n > 1 << 36:
        raise ValueError(f"{n:,} parameters")


def _check_run_state(ck: Checkpoint) -> None:
    """The scalars a resume reads: optimizer steps, data position, evaluations."""
    state, file = ck.state, ck.path
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise Q4KError(f"{file}: the checkpoint's state has no parameters")
    opt, data, evals = state.get("optimizer"), state.get("data"), state.get("evals")
    if not isinstance(opt, dict) or not _count(opt.get("steps")) or not isinstance(opt.get("config", {}), dict):
        raise Q4KError(f"{file}: the optimizer state is not valid (steps, m, v, config)")
    if not isinstance(data, dict) or not all(_count(data.get(k)) for k in ("seed", "position")):
        raise Q4KError(f"{file}: the data sampler state is not valid (seed, position)")
    if not isinstance(evals, dict) or not all(isinstance(v, dict) for v in evals.values()):
        raise Q4KError(f"{file}: the evaluations in the checkpoint are not valid")
    if not all(isinstance(v.get(k), (int, float)) for v in evals.values()
               for k in ("teacher_kl", "student_ppl", "top1_agreement", "tokens")):
        raise Q4KError(f"{file}: the evaluations in the checkpoint are not valid")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _members(z, file) -> dict:
    """name -> ZipInfo; stored (uncompressed) .npy members only, no name twice, __meta__ there."""
    members = {}
    for info in z.infolist():
        if info.filename in members:
            raise Q4KError(f"{file}: member {info.filename[:60]!r} appears twice")
        if info.compress_type != zipfile.ZIP_STORED:
            raise Q4KError(f"{file}: member {info.filename[:60]!r} is compressed; checkpoints are written uncompressed")
        if not info.filename.endswith(".npy"):
            raise Q4KError(f"{file}: unexpected member {info.filename[:60]!r}")
        members[info.filename] = info
    if _META + ".npy" not in members:
        raise Q4KError(f"{file}: no {_META} member (not a q4kdistill checkpoint)")
    if members[_META + ".npy"].file_size > META_LIMIT:
        raise Q4KError(f"{file}: its {_META} member is {members[_META + '.npy'].file_size:,} bytes, "
                       f"more than a checkpoint's ({META_LIMIT:,})")
    return members


def _read_member(z, info, file, dtype, shape) -> np.ndarray:
    """One .npy member: its header must describe exactly the bytes the member holds (and the
    ``dtype``/``shape`` asked for, when given) before its data is read."""
    with z.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read(f, max_header_size=1 << 16)
        except (ValueError, SyntaxError, TypeError) as exc:
            raise Q4KError(f"{file}: member {info.filename[:60]!r} is not a .npy array ({str(exc)[:60]})") from None
        name = info.filename[:-4]
        if got_dtype.hasobject or got_dtype.kind not in "biufc" or fortran:
            raise Q4KError(f"{file}: array {name[:60]!r} has dtype {got_dtype} (plain numbers only)")
        if (dtype is not None and got_dtype != dtype) or (shape is not None and tuple(got_shape) != tuple(shape)):
            need = f"{dtype or 'any dtype'} {list(shape) if shape is not None else '[n]'}"
            raise Q4KError(f"{file}: array {name[:60]!r} is {got_dtype} {list(got_shape)}, expected {need}")
        nbytes = math.prod(got_shape) * got_dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise Q4KError(f"{file}: array {name[:60]!r} claims {nbytes:,} bytes, its member holds "
                           f"{info.file_size - f.tell():,}")
        data, filled = bytearray(nbytes), 0                 # read in place: one copy of the array in memory
        view = memoryview(data)
        while filled < nbytes:
            n = f.readinto(view[filled:])
            if not n:
                raise Q4KError(f"{file}: array {name[:60]!r} is cut short")
            filled += n
    return np.frombuffer(data, dtype=got_dtype).reshape(got_shape)


def _meta(raw: np.ndarray, file) -> dict:
    """__meta__ bytes -> the dict, checked against its schema."""
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Q4KError(f"{file}: its {_META} is not JSON ({str(exc)[:60]})") from None
    if not isinstance(meta, dict):
        raise Q4KError(f"{file}: its {_META} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise Q4KError(f"{file}: checkpoint format {str(meta.get('format'))[:20]}, this version reads {FORMAT}")
    schema = {"step": _count, "fingerprint": lambda v: isinstance(v, dict), "config": lambda v: isinstance(v, dict),
              "state": lambda v: isinstance(v, (dict, list))}
    for key, ok in schema.items():
        if key not in meta or not ok(meta[key]):
            raise Q4KError(f"{file}: its {_META} has no valid {key!r}")
    return meta


def _array_refs(tree, file, depth=0) -> list:
    """The array names a state tree refers to ({"__array__": name}), in order."""
    if depth > MAX_DEPTH:
        raise Q4KError(f"{file}: the state tree in {_META} is nested too deeply")
    if isinstance(tree, dict):
        if "__array__" in tree:
            if set(tree) != {"__array__"} or not isinstance(tree["__array__"], str) or tree["__array__"] == _META:
                raise Q4KError(f"{file}: a bad array reference in {_META}")
            return [tree["__array__"]]
        return [r for v in tree.values() for r in _array_refs(v, file, depth + 1)]
    if isinstance(tree, list):
        return [r for v in tree for r in _array_refs(v, file, depth + 1)]
    return []


def check_fingerprint(ckpt: Checkpoint, expected: dict) -> None:
    """Refuse to resume a checkpoint made by another configuration (one line naming what differs)."""
    differ = sorted(k for k in set(expected) | set(ckpt.fingerprint) if expected.get(k) != ckpt.fingerprint.get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {ckpt.fingerprint.get(k)!r}, now {expected.get(k)!r}" for k in differ[:3])
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise Q4KError(f"{ckpt.path} was made by another configuration and cannot be resumed: {shown}{more}"
                       " — use a new --out directory, or the original settings")
