"""Where GPU bytes are counted: one counter that sees every byte CuPy and Numba allocate.

    install()                 once, before the first kernel or array (idempotent)
    meter = MemoryMeter()
    with meter.phase("teacher forward"):
        ...                   -> meter.records[-1]: peak, start and end ("resident after") bytes,
                                 and the driver's view (cudaMemGetInfo) before and after

How every byte reaches one counter (GPU)
  CuPy     ``cupy.cuda.set_allocator(counter.malloc)``: each CuPy allocation asks CuPy's pool
           through ``counter.malloc``, which reads ``pool.used_bytes()`` right after and keeps
           the high-water mark. The peak of "bytes in use" can only rise inside a malloc, so
           sampling there gives the exact peak, not an estimate.
  Numba    an External Memory Management plugin (numba-cuda's ``HostOnlyCUDAMemoryManager``)
           serves Numba's device allocations (``cuda.device_array``, arrays copied for a kernel
           launch) from ``cupy.cuda.alloc``, i.e. from the same pool through the same counter.
  driver   ``cudaMemGetInfo`` (total - free) also counts what no pool sees: the CUDA context,
           cuBLAS workspaces, loaded kernel modules, and blocks the pool caches but does not use.

CPU (NumPy + Numba's simulator) has no device to count. The meter then measures *host* bytes
with ``tracemalloc`` (NumPy reports every array buffer to it; Python objects are included), so
the code paths run and the numbers mean something, and every record says which counter it
used (``counter``): never read a CPU record as GPU bytes.
"""
from __future__ import annotations

import contextlib
import gc
import ctypes
import itertools
import time
import tracemalloc
import weakref
from dataclasses import asdict, dataclass

from .. import backend

GPU_COUNTER = "cupy-pool"          # CuPy pool bytes in use, Numba routed through it
HOST_COUNTER = "host-tracemalloc"  # CPU stand-in: host bytes traced by tracemalloc


# -- counters: current bytes, and the peak since the last take_peak() -------------------------

class PoolCounter:
    """GPU bytes in use in CuPy's pool; ``malloc`` is the allocator every allocation goes through."""

    name = GPU_COUNTER

    def __init__(self, pool):
        self.pool = pool
        self.private = []                 # pools of CUDA graphs (private_pool): all their bytes count
        self.peak = pool.used_bytes()

    def malloc(self, size):
        """cupy.cuda.set_allocator's signature: size -> cupy.cuda.MemoryPointer."""
        return self._counted(self.pool.malloc(size))

    def private_malloc(self, pool):
        """An allocator drawing from ``pool`` (a CUDA graph's own), counted here like the default pool."""
        return lambda size: self._counted(pool.malloc(size))

    def _counted(self, mem):
        used = self.current()
        if used > self.peak:
            self.peak = used
        return mem

    def current(self) -> int:
        """Bytes in use in the default pool, plus every byte a graph's private pool holds: a captured
        graph owns its blocks (its addresses are baked in), used or not between replays."""
        return self.pool.used_bytes() + sum(p.total_bytes() for p in self.private)

    def reserved(self) -> int:
        """Bytes the pools hold from the driver (in use + cached free blocks)."""
        return self.pool.total_bytes() + sum(p.total_bytes() for p in self.private)

    def take_peak(self) -> int:
        """The peak since the previous call; the next period starts at the current bytes."""
        now = self.current()
        peak, self.peak = max(self.peak, now), now
        return peak


class HostCounter:
    """CPU stand-in: host bytes traced by tracemalloc (NumPy arrays + Python objects)."""

    name = HOST_COUNTER

    def __init__(self):
        if not tracemalloc.is_tracing():
            tracemalloc.start()

    def current(self) -> int:
        if not tracemalloc.is_tracing():        # someone stopped it (a caller's own bounded-memory check)
            tracemalloc.start()
        return tracemalloc.get_traced_memory()[0]

    def reserved(self) -> int | None:
        return None

    def take_peak(self) -> int:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        return peak


# -- routing Numba's device allocations through CuPy's pool -----------------------------------

def numba_plugin_class(drv, alloc, mem_info):
    """A Numba EMM plugin class whose device memory comes from ``alloc(size)``.

    drv       numba.cuda.cudadrv.driver (HostOnlyCUDAMemoryManager, AutoFreePointer, MemoryInfo,
              GetIpcHandleMixin); a stand-in on the CPU tests
    alloc     size -> CuPy MemoryPointer (``cupy.cuda.alloc``: the current, counting allocator)
    mem_info  () -> (free, total) bytes (``cupy.cuda.runtime.memGetInfo``)

    Numba keeps host (pinned/mapped) allocations itself (HostOnlyCUDAMemoryManager).
    """

    class CupyPoolMemoryManager(drv.GetIpcHandleMixin, drv.HostOnlyCUDAMemoryManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._held = {}                 # id -> CuPy MemoryPointer, alive while Numba uses it
            self._ids = itertools.count()   # keys, not pointers: zero-size buffers share ptr 0

        def initialize(self):
            # as Numba's own manager does: size the queue of pending host (pinned/mapped) frees;
            # CuPy's pool needs no set-up
            self.deallocations.memory_capacity = self.get_memory_info().total

        def memalloc(self, size):
            buf = alloc(size)
            key = next(self._ids)
            self._held[key] = buf
            held = self._held

            def finalizer():                # Numba drops the pointer -> the block goes back to the pool
                held.pop(key, None)

            ctx = weakref.proxy(self.context)
            return drv.AutoFreePointer(ctx, ctypes.c_void_p(buf.ptr), size, finalizer=finalizer)

        def get_memory_info(self):
            free, total = mem_info()
            return drv.MemoryInfo(free=free, total=total)

        def reset(self):
            super().reset()
            self._held.clear()

        @property
        def interface_version(self):
            return 1

    return CupyPoolMemoryManager


def _route_numba_through_cupy(cupy) -> None:
    from numba import cuda
    from numba.cuda.cudadrv import driver as drv

    plugin = numba_plugin_class(drv, cupy.cuda.alloc, cupy.cuda.runtime.memGetInfo)
    cuda.set_memory_manager(plugin)             # contexts made from now on
    ctx = cuda.current_context()
    if not isinstance(ctx.memory_manager, plugin):
        # the context existed before install(): swap its manager (as numba-cuda's own EMM tests do)
        ctx.memory_manager = plugin(context=ctx)
        ctx.memory_manager.initialize()


_counter = None


def install():
    """Set up the process-wide counter (idempotent) and return it.

    GPU: CuPy's allocator becomes ``PoolCounter.malloc`` and Numba's device allocations are
    routed through it. Call before the first array is made so that every byte is seen.
    CPU: starts tracemalloc.
    """
    global _counter
    if _counter is None:
        if backend.on_gpu():
            import cupy

            counter = PoolCounter(cupy.get_default_memory_pool())
            cupy.cuda.set_allocator(counter.malloc)
            _route_numba_through_cupy(cupy)
        else:
            counter = HostCounter()
        _counter = counter
    return _counter


def private_pool():
    """(pool, malloc) for a CUDA graph's capture (train/cuda_graph.py): a CuPy MemoryPool no other
    allocation draws from, and its allocator, counted by the process-wide counter until
    ``drop_private_pool``."""
    import cupy

    pool = cupy.cuda.MemoryPool()
    counter = install()
    if isinstance(counter, PoolCounter):
        counter.private.append(pool)
        return pool, counter.private_malloc(pool)
    return pool, pool.malloc


def drop_private_pool(pool) -> None:
    """Stop counting ``pool`` and give its blocks back (its graph is gone; the device is synchronised first)."""
    counter = install()
    if isinstance(counter, PoolCounter) and any(p is pool for p in counter.private):
        counter.private = [p for p in counter.private if p is not pool]
    backend.synchronize()
    pool.free_all_blocks()


def driver_info():
    """(free, total) bytes of the current GPU as the driver reports them, or None on the CPU."""
    if not backend.on_gpu():
        return None
    import cupy

    return tuple(cupy.cuda.runtime.memGetInfo())


def release_cached() -> None:
    """Give the pool's cached free blocks back to the driver (between experiments)."""
    import gc

    gc.collect()
    if backend.on_gpu():
        import cupy

        backend.synchronize()
        cupy.get_default_memory_pool().free_all_blocks()


def bytes_in_use() -> int:
    """Bytes the counter sees in use now (GPU: CuPy pool incl. Numba; CPU: tracemalloc)."""
    return install().current()


# -- phases ------------------------------------------------------------------------------------

@dataclass
class PhaseRecord:
    name: str
    counter: str                    # GPU_COUNTER or HOST_COUNTER: what the byte counts mean
    start_bytes: int                # in use when the phase began
    peak_bytes: int                 # the most in use at once during the phase
    end_bytes: int = 0              # in use when it ended ("resident after")
    reserved_bytes: int | None = None       # held by the pool at the end (GPU)
    driver_used_before: int | None = None   # total - free (GPU)
    driver_used_after: int | None = None
    driver_total: int | None = None
    seconds: float = 0.0
    error: str | None = None        # set when the phase raised (e.g. out of memory)

    def to_dict(self) -> dict:
        return asdict(self)


class MemoryMeter:
    """Records per phase the peak and resident bytes of the process-wide counter.

    Phases may nest (an outer "distill step" around "teacher forward"); each sees the peak
    of its own span. Several meters may be used in one process.
    """

    _open: list = []                # phases open in any meter, innermost last

    def __init__(self):
        self.counter = install()
        self.records: list[PhaseRecord] = []

    @property
    def on_gpu(self) -> bool:
        return self.counter.name == GPU_COUNTER

    def current_bytes(self) -> int:
        return self.counter.current()

    @contextlib.contextmanager
    def phase(self, name: str):
        backend.synchronize()
        self._fold()
        rec = PhaseRecord(name, self.counter.name, start_bytes=self.counter.current(), peak_bytes=0)
        rec.peak_bytes = rec.start_bytes
        rec.driver_used_before, rec.driver_total = _driver_used()
        MemoryMeter._open.append(rec)
        t0 = time.perf_counter()
        try:
            yield rec
        except BaseException as exc:
            rec.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise
        finally:
            _sync_quietly()
            self._fold()
            MemoryMeter._open.remove(rec)
            rec.seconds = time.perf_counter() - t0
            # end bytes: what is still referenced. Unreachable cycles (objects that wrap device
            # arrays) would otherwise count until Python's collector happens to run: on the H200,
            # 0.43 GB of them after a 7B teacher forward, against the 0.136 GB kept scratch.
            if self.on_gpu:           # (on the host, tracemalloc would count the collector's own objects)
                gc.collect()
            rec.end_bytes = self.counter.current()
            rec.reserved_bytes = self.counter.reserved()
            rec.driver_used_after, _ = _driver_used()
            self.records.append(rec)

    def _fold(self) -> None:
        """Hand the peak since the last fold to every open phase."""
        peak = self.counter.take_peak()
        for rec in MemoryMeter._open:
            rec.peak_bytes = max(rec.peak_bytes, peak)

    def record(self, name: str) -> PhaseRecord | None:
        """The last finished phase called ``name``."""
        for rec in reversed(self.records):
            if rec.name == name:
                return rec
        return None

    def table(self) -> str:
        lines = [f"{'phase':<32} {'start':>10} {'peak':>10} {'end':>10}  ({self.counter.name})"]
        for r in self.records:
            lines.append(f"{r.name:<32} {_gb(r.start_bytes):>10} {_gb(r.peak_bytes):>10} {_gb(r.end_bytes):>10}"
                         + (f"  {r.error}" if r.error else ""))
        return "\n".join(lines)


def _driver_used():
    info = driver_info()
    if info is None:
        return None, None
    free, total = info
    return total - free, total


def _sync_quietly() -> None:
    try:                            # after an out-of-memory error the stream may refuse too
        backend.synchronize()
    except Exception:
        pass


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.3f} GB"
