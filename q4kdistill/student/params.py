"""One flat buffer with named views (llm.c style), shared layout for params, grads and Adam moments.

    flat  [P]  = | matrices (weight-decayed) ........ | vectors (norms, biases) |
                 0                              decay_stop                   P
    views[name] = flat[offset : offset + size].reshape(shape)

Zero-grad is one ``fill(0)``, the optimizer one elementwise pass, and the weight-decay mask is
the prefix ``flat[:decay_stop]``: matrices (ndim >= 2) first, norms and biases after.
"""
from __future__ import annotations

import math


class FlatBuffer:
    def __init__(self, shapes, xp, dtype):
        """shapes: dict name -> shape (its order is the order of ``views``)."""
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
        self.flat = xp.zeros(offset, dtype=dtype)
        self.views = {name: self.view(name) for name in self.shapes}

    def view(self, name):
        shape = self.shapes[name]
        start = self.offsets[name]
        return self.flat[start:start + math.prod(shape)].reshape(shape)

    @property
    def size(self) -> int:
        return int(self.flat.size)

    def zeros_like(self, dtype=None):
        """A buffer with the same layout (for grads and Adam moments)."""
        from ..backend import array_module

        return FlatBuffer(self.shapes, array_module(self.flat), dtype or self.flat.dtype)
