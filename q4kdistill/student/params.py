"""One flat buffer with named views (llm.c style), shared layout for params, grads and Adam moments.

    flat  [P]  = | matrices (weight-decayed) ........ | vectors (norms, biases) |
                 0                              decay_stop                   P
    views[name] = flat[offset : offset + size].reshape(shape)

Zero-grad is one ``fill(0)``, the optimizer one elementwise pass, and the weight-decay mask is
the prefix ``flat[:decay_stop]``: matrices (ndim >= 2) first, norms and biases after.

A grad buffer may leave its leading tensor out (``zeros_like(without=name)``: the token embedding,
first in every model's table): its flat then starts at ``start`` of the full layout, and that
tensor's grad is a RowGrad, the rows a step gathered, instead of a [V, D] array.
"""
from __future__ import annotations

import math


class FlatBuffer:
    def __init__(self, shapes, xp, dtype, without=None):
        """shapes: dict name -> shape (its order is the order of ``views``). ``without``: a tensor of
        the layout this buffer does not hold; it must come first (offset 0), and the flat then
        begins at ``start`` = its size: offsets and decay_stop stay those of the full layout."""
        self.shapes = {name: tuple(int(n) for n in shape) for name, shape in shapes.items()}
        matrices = [n for n, s in self.shapes.items() if len(s) >= 2]
        vectors = [n for n, s in self.shapes.items() if len(s) < 2]
        self.offsets, offset = {}, 0
        for name in matrices + vectors:
            self.offsets[name] = offset
            offset += math.prod(self.shapes[name])
            if name == matrices[-1]:
                self.decay_stop = offset
        if not matrices:
            self.decay_stop = 0
        self.start = 0
        if without is not None:
            if self.offsets.get(without) != 0:
                raise ValueError(f"a flat buffer can leave out only its first tensor, not {without!r}")
            self.start = math.prod(self.shapes[without])
        self.flat = xp.zeros(offset - self.start, dtype=dtype)
        self.views = {name: self.view(name) for name in self.shapes if name != without}

    def view(self, name):
        shape = self.shapes[name]
        start = self.offsets[name] - self.start
        return self.flat[start:start + math.prod(shape)].reshape(shape)

    @property
    def size(self) -> int:
        return int(self.flat.size)

    def zeros_like(self, dtype=None, without=None):
        """A buffer with the same layout (for grads and Adam moments), ``without`` its first tensor."""
        from ..backend import array_module

        return FlatBuffer(self.shapes, array_module(self.flat), dtype or self.flat.dtype, without=without)


class RowGrad:
    """The grad of a table [V, D] that a step reads by rows (an untied token embedding): the rows
    each backward gathered, as (ids [n], rows [n, D]) pairs since the last reset, repeated ids adding
    up. A step touches at most B*T of the V rows (4,096 of 152,064 at 8x512), so this holds B*T x D
    floats where a dense grad holds V x D (2.18 GB for a 7B's embedding). The pairs are the backward's
    own arrays (its ids, the grad of the embedding's output), kept, not copied: a CUDA graph's replay
    rewrites them in place (train/cuda_graph.py restores the captured pairs after each replay).

        summed() -> (ids [U] unique ascending, rows [U, D] in the grads' dtype: each id's rows added in order)
        dense()  -> [V, D], what embedding_backward would have added into a zeroed grad"""

    def __init__(self, shape, xp, dtype):
        self.shape = tuple(int(n) for n in shape)
        self.xp, self.dtype = xp, dtype
        self.parts = []
        self._summed = None

    def reset(self) -> None:
        self.parts, self._summed = [], None

    def add(self, ids, rows) -> None:
        self.parts.append((ids.reshape(-1), rows.reshape(-1, self.shape[1])))
        self._summed = None

    def state(self) -> list:
        return list(self.parts)

    def restore(self, parts) -> None:
        """The pairs as ``state()`` gave them (their contents may have been rewritten since)."""
        self.parts, self._summed = list(parts), None

    def summed(self):
        if self._summed is None:
            xp, D = self.xp, self.shape[1]
            if not self.parts:
                self._summed = (xp.zeros(0, dtype=xp.int64), xp.zeros((0, D), dtype=self.dtype))
                return self._summed
            ids = xp.concatenate([i for i, _ in self.parts]) if len(self.parts) > 1 else self.parts[0][0]
            rows = xp.concatenate([r for _, r in self.parts]) if len(self.parts) > 1 else self.parts[0][1]
            u, inverse = xp.unique(ids, return_inverse=True)
            out = xp.zeros((int(u.size), D), dtype=self.dtype)
            xp.add.at(out, inverse.reshape(-1), rows)       # in order, as embedding_backward adds
            self._summed = (u, out)
        return self._summed

    def dense(self):
        out = self.xp.zeros(self.shape, dtype=self.dtype)
        u, rows = self.summed()
        out[u] = rows
        return out
