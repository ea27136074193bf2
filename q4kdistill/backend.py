"""Which arrays and which Numba CUDA we run on: the one place that decides.

    device()  -> "cuda" | "cpu"
    xp()      -> cupy on "cuda", numpy on "cpu"

Rules
  * ``Q4KDISTILL_DEVICE=cpu|cuda`` forces a choice; otherwise "cuda" where CuPy imports
    and sees a GPU, else "cpu".
  * On "cpu" the Numba CUDA *simulator* is switched on (``NUMBA_ENABLE_CUDASIM=1``) before
    numba is first imported, so every ``@cuda.jit`` kernel still runs (slowly) on NumPy
    arrays. That is why ``q4kdistill/__init__.py`` and ``kernels/__init__.py`` import this
    module first, before anything imports numba.
  * Nothing else in the package imports CuPy at top level: ask ``xp()``.
  * ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC`` defaults to 0 here. With 1 (numba's default) every
    launch of a Numba kernel on CuPy arrays first synchronizes the host with each array's
    stream, so the host waits for the GPU before every launch: no CPU/GPU overlap, and ~10 us
    of host work lands between kernels on the GPU timeline. Our kernels are always launched on
    CuPy's current stream (kernels/_device.launch), so stream order already orders them.
"""
from __future__ import annotations

import functools
import os
import sys

from .errors import Q4KError

_ENV = "Q4KDISTILL_DEVICE"


def _cuda_usable() -> bool:
    try:
        import cupy  # noqa: F401  (import only here: CuPy is optional)

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def device() -> str:
    """"cuda" or "cpu" for this process (decided once)."""
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced not in ("", "cpu", "cuda", "gpu"):
        raise Q4KError(f"{_ENV}={forced!r}: expected 'cpu' or 'cuda'")
    if forced == "cpu":
        return "cpu"
    if forced in ("cuda", "gpu"):
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            raise Q4KError(f"{_ENV}=cuda but NUMBA_ENABLE_CUDASIM=1 is set; unset one of them")
        if not _cuda_usable():
            raise Q4KError(f"{_ENV}=cuda but no CUDA GPU is usable (is CuPy installed? try pip install -e '.[gpu]')")
        return "cuda"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "cpu"
    return "cuda" if _cuda_usable() else "cpu"


def on_gpu() -> bool:
    return device() == "cuda"


def xp():
    """The array module: cupy on the GPU, numpy on the CPU."""
    if on_gpu():
        import cupy

        return cupy
    import numpy

    return numpy


def array_module(a):
    """The module (numpy or cupy) that owns array ``a``."""
    mod = type(a).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    import numpy

    return numpy


def asarray(a, dtype=None):
    """Move ``a`` to the current device (no copy when it is already there)."""
    return xp().asarray(a, dtype=dtype)


def to_host(a):
    """A NumPy array for ``a`` (copies from the GPU when needed)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    import numpy

    return numpy.asarray(a)


def capturing(a=None) -> bool:
    """Whether CuPy's current stream is capturing a CUDA graph (train/cuda_graph.py). Work queued then
    is recorded, not run, so nothing may read the device: checks that read a device array (ids in
    range, counts) are done by the caller before the capture and skipped inside it. ``a``: an array
    (NumPy: never capturing)."""
    if (a is not None and not type(a).__module__.startswith("cupy")) or not on_gpu():
        return False
    import cupy

    stream = cupy.cuda.get_current_stream()
    return stream.ptr != 0 and stream.is_capturing()


def synchronize() -> None:
    if on_gpu():
        import cupy

        cupy.cuda.get_current_stream().synchronize()


@functools.lru_cache(maxsize=None)
def gpu_name() -> str:
    """The card's name ("NVIDIA H100 80GB HBM3"), or "cpu". Cached: getDeviceProperties costs ~1 ms,
    and kernel dispatch asks for the name on every product."""
    if not on_gpu():
        return "cpu"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def no_array_interface_sync() -> None:
    """Turn off numba's host synchronization on CuPy arrays (see the module doc), unless the user set it."""
    os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
    value = os.environ["NUMBA_CUDA_ARRAY_INTERFACE_SYNC"] not in ("0", "")
    if "numba.cuda.core.config" in sys.modules:
        sys.modules["numba.cuda.core.config"].CUDA_ARRAY_INTERFACE_SYNC = value


def _enable_simulator_if_cpu() -> None:
    """Switch Numba's CUDA simulator on when we run on the CPU.

    numba.cuda picks the simulator when it is first imported, from numba's config. numba.core
    itself may already be loaded (pytest's filterwarnings imports numba.core.errors before any
    conftest), so set the variable and make numba re-read its config if it has one already."""
    if "numba.cuda" in sys.modules or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced == "cpu" or (forced == "" and not _cuda_usable()):
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        if "numba.core.config" in sys.modules:
            sys.modules["numba.core.config"].reload_config()


_enable_simulator_if_cpu()
no_array_interface_sync()
