"""GPU byte accounting: the Numba EMM plugin routes through the counting CuPy allocator, and the
meter's phases see peaks (host stand-in on the CPU, the real pool on a GPU)."""
import weakref
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest

from q4kdistill.memory import meter as memory


# -- stand-ins for CuPy's pool and numba-cuda's driver module (the plugin logic, no GPU) ---------

class Block:
    def __init__(self, ptr, size):
        self.ptr, self.size = ptr, size


class FakePool:
    """CuPy's pool as the counter sees it: 512-byte blocks, freed when the last pointer goes."""

    def __init__(self):
        self.used = 0
        self.ptr = 4096

    def malloc(self, size):
        size = -(-size // 512) * 512
        self.ptr += max(size, 512)
        mem = Block(self.ptr if size else 0, size)
        self.used += size
        weakref.finalize(mem, self._free, size)
        return mem

    def _free(self, size):
        self.used -= size

    def used_bytes(self):
        return self.used

    def total_bytes(self):
        return self.used


class FakeHostOnly:
    def __init__(self, *args, context=None, **kwargs):
        self.context = context
        self.deallocations = SimpleNamespace(memory_capacity=None)
        self.reset_calls = 0

    def reset(self):
        self.reset_calls += 1


class FakeAutoFreePointer:
    def __init__(self, ctx, pointer, size, finalizer=None):
        self.pointer, self.size, self._finalizer = pointer, size, finalizer

    def free(self):
        self._finalizer()


class Context:
    pass


class FakeIpcMixin:
    pass


fake_drv = SimpleNamespace(HostOnlyCUDAMemoryManager=FakeHostOnly, GetIpcHandleMixin=FakeIpcMixin,
                           AutoFreePointer=FakeAutoFreePointer,
                           MemoryInfo=namedtuple("MemoryInfo", "free total"))


def test_numba_plugin_allocates_from_the_counting_pool():
    counter = memory.PoolCounter(FakePool())
    plugin = memory.numba_plugin_class(fake_drv, counter.malloc, lambda: (11, 99))
    ctx = Context()
    mm = plugin(context=ctx)
    assert mm.interface_version == 1
    mm.initialize()
    assert mm.deallocations.memory_capacity == 99
    a = mm.memalloc(1000)                         # rounded to 1024 by the pool
    b = mm.memalloc(3000)                         # 3072
    z1, z2 = mm.memalloc(0), mm.memalloc(0)       # zero-size buffers share pointer 0: both kept
    assert a.pointer.value != b.pointer.value and a.size == 1000
    assert counter.current() == 1024 + 3072
    a.free()
    assert counter.current() == 3072
    assert counter.take_peak() == 1024 + 3072     # the peak since the last take
    assert counter.take_peak() == 3072            # a new period starts at the bytes in use
    z1.free(), z2.free()
    assert mm.get_memory_info() == (11, 99)
    mm.reset()                                    # drops every block Numba still held
    assert counter.current() == 0 and mm.reset_calls == 1
    b.free()                                      # a finalizer after reset is harmless
    assert counter.current() == 0


def test_meter_phases_on_the_host_counter():
    meter = memory.MemoryMeter()
    if meter.on_gpu:
        pytest.skip("the host stand-in is the CPU path")
    n = 4_000_000                                 # 32 MB of float64
    with meter.phase("outer") as outer:
        with meter.phase("inner") as inner:
            tmp = np.ones(n)
            tmp += 1
            del tmp
        kept = np.ones(n // 2)                    # 16 MB stays after the phase
        tmp = np.ones(2 * n)                      # 64 MB, after inner ended
        del tmp
    assert outer.counter == memory.HOST_COUNTER
    assert 8 * n <= inner.peak_bytes - inner.start_bytes < 8 * n + 2_000_000
    assert inner.end_bytes - inner.start_bytes < 1_000_000
    assert 16 * n + 4 * n <= outer.peak_bytes - outer.start_bytes < 20 * n + 2_000_000
    assert 4 * n - 100_000 <= outer.end_bytes - outer.start_bytes < 4 * n + 1_000_000   # (other objects may be freed meanwhile)
    assert [r.name for r in meter.records] == ["inner", "outer"] and meter.record("outer") is outer
    assert outer.driver_used_before is None and outer.reserved_bytes is None
    del kept


def test_meter_records_a_failing_phase_and_reraises():
    meter = memory.MemoryMeter()
    with pytest.raises(MemoryError):
        with meter.phase("too big"):
            raise MemoryError("out of memory allocating 123 bytes")
    rec = meter.record("too big")
    assert rec.error.startswith("MemoryError: out of memory") and rec.peak_bytes >= rec.start_bytes
    assert "too big" in meter.table()


@pytest.mark.gpu
def test_numba_and_cupy_allocations_reach_one_counter():
    import cupy
    from numba import cuda

    counter = memory.install()
    assert counter.name == memory.GPU_COUNTER
    meter = memory.MemoryMeter()
    before = counter.current()
    with meter.phase("numba") as rec:
        a = cuda.device_array(50_000_000, dtype=np.uint8)     # through the EMM plugin
        assert counter.current() - before >= 50_000_000
        b = cupy.empty(25_000_000, dtype=np.uint8)
        assert counter.current() - before >= 75_000_000
        del a, b
    assert rec.peak_bytes - before >= 75_000_000
    assert rec.end_bytes - before < 1_000_000                  # both went back to the pool
    assert rec.driver_used_before is not None and rec.driver_total > 0
    assert type(cuda.current_context().memory_manager).__name__ == "CupyPoolMemoryManager"
