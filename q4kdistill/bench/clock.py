"""Marks on the GPU stream (CUDA events) or on the host (perf_counter), one interface for both."""
from __future__ import annotations

import time


class Clock:
    def __init__(self, xp):
        self.xp = xp
        self.gpu = xp.__name__ == "cupy"

    def mark(self):
        if not self.gpu:
            return time.perf_counter()
        ev = self.xp.cuda.Event()
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        """Time from mark ``a`` to mark ``b`` (waits for ``b`` on the GPU)."""
        if not self.gpu:
            return b - a
        b.synchronize()
        return self.xp.cuda.get_elapsed_time(a, b) / 1e3

    def ms(self, a, b) -> float:
        return 1e3 * self.seconds(a, b)
