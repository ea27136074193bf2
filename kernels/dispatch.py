"""One entry point per job: matmul (choosing a variant), dequantize_to, embedding_rows.

Variant choice for (qtype, M, N, K, GPU model), first match wins:
  1. ``variant=`` given by the caller;
  2. NumPy arrays: "numpy_slab" (kernels run on NumPy only when a test names them);
  3. the tuning table for this GPU: ``$Q4KDISTILL_TUNING``, else the user's table written by
     ``q4kdistill autotune`` (~/.cache/q4kdistill/kernels_tuning.json), else the one shipped in
     kernels/tuning/default.json; entries per qtype, in order: {"m_max": 16 or null, "variant": name}, an entry
     with "n_min": n only for outputs of n or more columns (autotune writes one where a bucket's wide shapes
     have another winner);
  4. built-in default (what the H200 table says, for GPUs without an entry): M = 1 ->
     "gemv_chunk_r4w4" (Q4_K/Q6_K) or "gemv_warp_r2w4" (Q8_0/Q5_0); M <= 8 -> "gemv_warp_r4w4";
     larger M -> "dequant_f16_cublas".
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from q4kdistill import backend
from q4kdistill.errors import Q4KError

from . import cpu, dequant
from .registry import get
from .weights import columns, qtype_name

SHIPPED_TABLE = Path(__file__).with_name("tuning") / "default.json"
USER_TABLE = Path(os.path.expanduser("~/.cache/q4kdistill/kernels_tuning.json"))
DEFAULT_LARGE = "dequant_f16_cublas"


def builtin_choice(qtype: str, M: int) -> str:
    if M == 1:
        return "gemv_chunk_r4w4" if qtype in ("Q4_K", "Q6_K") else "gemv_warp_r2w4"
    return "gemv_warp_r4w4" if M <= 8 else DEFAULT_LARGE


def table_path() -> Path:
    env = os.environ.get("Q4KDISTILL_TUNING")
    if env:
        return Path(env)
    return USER_TABLE if USER_TABLE.exists() else SHIPPED_TABLE


@functools.lru_cache(maxsize=None)
def _table(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise Q4KError(f"kernel tuning table {p} is unreadable ({exc}); delete it or rerun `q4kdistill autotune`") from None


def reload_table() -> None:
    """Forget the cached tuning table and choices (after autotune wrote a new one)."""
    _table.cache_clear()
    _choose.cache_clear()


@functools.lru_cache(maxsize=4096)
def _choose(qtype: str, M: int, N: int, K: int, gpu: str) -> str:
    entries = _table(str(table_path())).get("gpus", {}).get(gpu, {}).get(qtype, [])
    for e in entries:
        if (e.get("m_max") is None or M <= e["m_max"]) and (e.get("n_min") is None or N >= e["n_min"]):
            try:
                v = get(e["variant"])
            except Q4KError:   # a table naming a variant this version lacks: fall through
                continue
            if v.supports(qtype, M, True) and (v.simulated or linked_available()):
                return e["variant"]
    return builtin_choice(qtype, M)


@functools.lru_cache(maxsize=None)
def linked_available() -> bool:
    """Whether the linked CUDA C variants compile here (NVRTC through numba-cuda's NVIDIA bindings).
    Checked once by compiling and running the smallest of them; if not, the table's linked entries
    are skipped with one warning and the Numba-only variants are used."""
    try:
        import cupy

        from .linked import quantize_q8

        quantize_q8(cupy.zeros((1, 32), dtype=np.float32))
        cupy.cuda.get_current_stream().synchronize()
        return True
    except Exception as exc:   # NVRTC missing or too old: any failure means "not here"
        import warnings

        warnings.warn(f"linked CUDA C kernels are unavailable ({type(exc).__name__}: {exc}); "
                      "kernels.matmul uses the Numba-only variants", stacklevel=2)
        return False


def choose(qtype, M: int, N: int, K: int, on_gpu: bool | None = None) -> str:
    """The variant matmul would use for these sizes."""
    on_gpu = backend.on_gpu() if on_gpu is None else on_gpu
    if not on_gpu:
        return "numpy_slab"
    return _choose(qtype_name(qtype), int(M), int(N), int(K), backend.gpu_name())


def matmul(x, w_raw, qtype, n_out, variant=None, out=None):
    """x @ W.T as float32 [M, n_out]; W [n_out, K] is what w_raw (uint8 [n_out, row_bytes]) encodes.

    x: [M, K] float32 or float16, same array module as w_raw (x goes as is to variants whose
    `accepts` names its dtype -- fp16: the linked decode + cuBLAS paths -- and is widened to float32
    for the others). variant: a
    registered name to force one (else chosen per sizes and GPU). out: optional float32
    [M, n_out] to write into.
    """
    q = qtype_name(qtype)
    K = columns(w_raw, q, n_out)
    xp = backend.array_module(w_raw)
    if backend.array_module(x) is not xp:
        raise Q4KError("matmul: x and w_raw must both be NumPy or both CuPy arrays")
    if x.ndim != 2 or x.shape[1] != K:
        raise Q4KError(f"matmul: x must be [M, {K}] for this {q} weight, got {tuple(x.shape)}")
    M = x.shape[0]
    if out is None:
        out = xp.empty((M, n_out), dtype=np.float32)
    elif out.shape != (M, n_out) or out.dtype != np.float32:
        raise Q4KError(f"matmul: out must be float32 {(M, n_out)}, got {out.dtype} {tuple(out.shape)}")
    if M == 0:
        return out
    name = variant or choose(q, M, n_out, K, on_gpu=xp is not np)
    v = get(name)
    if not (q in v.qtypes and M >= v.m_min and (v.m_max is None or M <= v.m_max)):
        raise Q4KError(f"kernel variant {name} does not take {q} with M={M} "
                       f"(types {', '.join(v.qtypes)}, M {v.m_min}..{v.m_max or 'any'})")
    x = xp.ascontiguousarray(x, dtype=x.dtype if x.dtype.name in v.accepts else np.float32)
    return v(x, w_raw, q, n_out, out)


def dequantize_to(w_raw, qtype, n_out, out_dtype, out=None):
    """Decode the whole weight: [n_out, K] float32 / float16 / bfloat16 (uint16 bits)."""
    q = qtype_name(qtype)
    K = columns(w_raw, q, n_out)
    name = dequant.dtype_name(out_dtype)
    if backend.array_module(w_raw) is np:
        return cpu.decode_rows(w_raw, q, K, name, out)
    return dequant.decode_rows(w_raw, q, K, name, out)


def embedding_rows(w_raw, qtype, ids):
    """Decode only rows `ids` (any shape of ints): float32 [len(ids.ravel()), K]."""
    q = qtype_name(qtype)
    K = columns(w_raw, q, w_raw.shape[0])
    xp = backend.array_module(w_raw)
    ids = xp.asarray(ids).reshape(-1)
    if ids.size and not backend.capturing(ids) and (int(ids.min()) < 0 or int(ids.max()) >= w_raw.shape[0]):
        raise Q4KError(f"embedding_rows: ids must be in [0, {w_raw.shape[0]}), got {int(ids.min())}..{int(ids.max())}")
    if xp is np:
        return cpu.decode_rows(w_raw, q, K, "float32", None, ids)
    return dequant.decode_rows(w_raw, q, K, "float32", None, ids.astype(np.int64))
