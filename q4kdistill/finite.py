"""Finite checks on what we compute and what we write: one NaN or inf stops with one line naming
where it is, instead of a run that trains on it or a file that carries it.

    check_finite(chunk, "the teacher's logits", start, seq_len)   # [n, V] rows start.. of B*T tokens
    check_finite(w, "tensor blk.0.attn_q.weight")                  # any array: names the flat index

One float64 sum over the array (NumPy or CuPy: NaN and inf carry through a sum, and no [n, V]
temporary is made, so the planner's figures hold) and one host sync; the elementwise search for
the first bad value runs only when the sum is not finite.
"""
from __future__ import annotations

import math

from .errors import Q4KError


class NonFiniteError(Q4KError):
    """An array that must be finite holds NaN or inf."""


def check_finite(array, what: str, start: int | None = None, seq_len: int | None = None):
    """``array`` unchanged if every value is finite; NonFiniteError naming the first bad value
    otherwise. With ``start``/``seq_len`` the rows of a [n, V] chunk are tokens start.. of a
    flattened [B, T] batch and the message gives (batch row, position, vocabulary id)."""
    xp = _array_module(array)
    if array.dtype.kind not in "fc" or array.size == 0 or math.isfinite(float(array.sum(dtype=xp.float64))):
        return array
    bad = xp.flatnonzero(~xp.isfinite(array.reshape(-1)))
    if bad.size == 0:                               # finite values whose float64 sum overflowed
        return array
    flat = int(bad[0])
    value = float(array.reshape(-1)[flat])
    if start is not None and array.ndim == 2:
        row, col = divmod(flat, array.shape[1])
        token = start + row
        where = (f"batch row {token // seq_len}, position {token % seq_len}" if seq_len else f"token {token}")
        raise NonFiniteError(f"{what} hold {value} at {where}, vocabulary id {col}")
    index = tuple(int(i) for i in _unravel(flat, array.shape))
    raise NonFiniteError(f"{what} holds {value} at index {list(index)}")


def _unravel(flat: int, shape) -> list:
    out = []
    for dim in reversed(tuple(shape)):
        flat, i = divmod(flat, dim)
        out.append(i)
    return out[::-1]


def _array_module(array):
    import numpy as np

    if isinstance(array, np.ndarray):
        return np
    import cupy

    return cupy.get_array_module(array)
