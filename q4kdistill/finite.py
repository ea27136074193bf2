"""Finite checks on what we compute and what we write: one NaN or inf stops with one line naming
where it is, instead of a run that trains on it or a file that carries it.

    check_finite(chunk, "the teacher's logits", start, seq_len)   # [n, V] rows start.. of B*T tokens
    check_finite(w, "tensor blk.0.attn_q.weight")                  # any array: names the flat index

One reduction over the array (NumPy or CuPy) and one host sync; the position of the first bad
value is looked up only when there is one.
"""
from __future__ import annotations

from .errors import Q4KError


class NonFiniteError(Q4KError):
    """An array that must be finite holds NaN or inf."""


def check_finite(array, what: str, start: int | None = None, seq_len: int | None = None):
    """``array`` unchanged if every value is finite; NonFiniteError naming the first bad value
    otherwise. With ``start``/``seq_len`` the rows of a [n, V] chunk are tokens start.. of a
    flattened [B, T] batch and the message gives (batch row, position, vocabulary id)."""
    xp = _array_module(array)
    if array.dtype.kind not in "fc" or bool(xp.isfinite(array).all()):
        return array
    flat = int(xp.flatnonzero(~xp.isfinite(array.reshape(-1)))[0])
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
