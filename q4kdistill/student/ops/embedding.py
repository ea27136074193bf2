"""Token embedding: a row gather forward, a scatter-add backward."""
from __future__ import annotations

from ...backend import array_module


def embedding_forward(ids, table):
    """ids [B, T] int, table [V, D] -> (y [B, T, D], cache)."""
    return table[ids], (ids, table.shape)


def embedding_backward(dy, cache, out=None):
    """dy [B, T, D] -> dtable [V, D]; with ``out`` the rows are added into it (no [V, D] temporary)."""
    ids, shape = cache
    xp = array_module(dy)
    if out is None:
        out = xp.zeros(shape, dtype=dy.dtype)
    # repeated ids must add up, hence ufunc.at rather than out[ids] += dy
    xp.add.at(out, ids.reshape(-1), dy.reshape(-1, shape[1]))
    return out
