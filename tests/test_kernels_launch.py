"""kernels/_device.launch: the fast path (arguments marshalled once per kernel and argument kinds,
then launched through cuda.core) gives what Numba's own launch gives.

A kernel of every argument kind the plan covers (CuPy arrays of several dtypes and ranks, a
non-contiguous view, Python and NumPy integers, float32, float64, bool) writes what it read into
one output; the first call goes through Numba, the next ones through the plan, each with fresh
values, poisoned outputs, another grid and another stream. A Numba device array keeps Numba's path.
The simulator has no launches to speed up: there launch is kernel[grid, block](*args) and this
file checks only that.
"""
import numpy as np
import pytest
from numba import cuda, float32

from kernels import _device


@cuda.jit
def _echo(out, a, b2, c_view, n, i32, f32, f64, flag):
    """out[t] for t < n: a[t] + b2[t % 3, t // 3] + c_view[t, 1] + i32 + f32 + f64 (+1000 if flag)."""
    t = cuda.grid(1)
    if t < n:
        v = a[t] + b2[t % 3, t // 3] + c_view[t, 1] + i32 + f32 + f64
        out[t] = v + (1000.0 if flag else 0.0)


def _expected(a, b2, c_view, n, i32, f32, f64, flag):
    t = np.arange(n)
    return (a[t].astype(np.float64) + b2[t % 3, t // 3] + c_view[t, 1] + i32 + np.float64(np.float32(f32)) + f64
            + (1000.0 if flag else 0.0))


def test_simulator_launch_is_numbas():
    if not _device.SIMULATOR:
        pytest.skip("a GPU runs the fast path (the gpu test below)")
    n = 37
    rng = np.random.default_rng(0)
    a = rng.standard_normal(n).astype(np.float32)
    b2 = rng.standard_normal((3, 13))
    c = rng.standard_normal((n, 4)).astype(np.float32)
    out = np.full(n, np.nan)
    cv = np.ascontiguousarray(c[:, :2])                  # (the simulator copies only contiguous arrays)
    _device.launch(_echo, 2, 32, out, a, b2, cv, n, np.int32(5), np.float32(0.25), 1.5, True)
    np.testing.assert_allclose(out, _expected(a, b2, c[:, :2], n, 5, 0.25, 1.5, True), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("flag_kind", ["int", "bool"])   # all scalars numbers: the packed path; a bool: cuda.core's
def test_fast_launch_matches_numba_launch(flag_kind):
    import cupy

    if not _device.FAST_LAUNCH:
        pytest.skip("Q4KDISTILL_SLOW_LAUNCH is set")
    before = dict(_device.launch_counts)
    rng = np.random.default_rng(1)
    for call, (n, threads, stream) in enumerate([(37, 32, None), (300, 64, None), (1000, 128, cupy.cuda.Stream()),
                                                 (5, 32, None)]):
        a = rng.standard_normal(1000).astype(np.float32)
        b2 = rng.standard_normal((3, 334))
        c = rng.standard_normal((1000, 4)).astype(np.float32)
        i32, f32, f64 = np.int32(call - 2), np.float32(0.5 * call), 1.25 * call
        flag = call % 2 == 0 if flag_kind == "bool" else np.int32(call % 2 == 0)
        ga, gb, gc = cupy.asarray(a), cupy.asarray(b2), cupy.asarray(c)
        out = cupy.full(n, cupy.nan, dtype=cupy.float64)
        with stream if stream is not None else cupy.cuda.Stream.null:
            _device.launch(_echo, (-(-n // threads), 1), threads, out, ga, gb, gc[:, :2], n, i32, f32, f64, flag)
            got = cupy.asnumpy(out)
        np.testing.assert_allclose(got, _expected(a, b2, c[:, :2], n, i32, f32, f64, bool(flag)), rtol=1e-6,
                                   err_msg=f"call {call}")
    assert _device.launch_counts["numba"] - before["numba"] == 1, "the plan was not reused"
    assert _device.launch_counts["fast"] - before["fast"] == 3
    key = next(k for k in _device._PLANS if k[0] is _echo and k[1][-1] is (bool if flag_kind == "bool" else np.int32))
    assert _device._PLANS[key][0] == ("core" if flag_kind == "bool" else "packed")


@pytest.mark.gpu
def test_numba_device_arrays_keep_numbas_path():
    import cupy

    n = 50
    rng = np.random.default_rng(2)
    a, b2, c = (rng.standard_normal(s) for s in (n, (3, 17), (n, 4)))
    a, c = a.astype(np.float32), c.astype(np.float32)
    out = cuda.to_device(np.full(n, np.nan))
    args = (out, cuda.to_device(a), cupy.asarray(b2), cupy.asarray(c)[:, :2], n, np.int32(1), np.float32(2), 3.0, False)
    key = (_echo, tuple(map(_device._arg_key, args)))
    _device._PLANS.pop(key, None)
    for _ in range(2):
        _device.launch(_echo, 2, 32, *args)
    cuda.synchronize()
    np.testing.assert_allclose(out.copy_to_host(), _expected(a, b2, c[:, :2], n, 1, 2, 3.0, False), rtol=1e-6)
    # the first launch tried to make a plan for these kinds and found none (Numba's path); read per kernel and
    # argument kinds, not from the process-wide launch counters, which launches from other threads also move
    # (the thirteenth stop's full GPU run failed here after other files, and passed alone)
    assert key in _device._PLANS and _device._PLANS[key] is None


@cuda.jit
def _reverse_through_shared(x, out):
    """out = x reversed within each block, through the block's dynamic shared memory."""
    buf = cuda.shared.array(0, float32)     # a Numba type: the simulator sizes it by itemsize
    t, n = cuda.threadIdx.x, cuda.blockDim.x
    i = cuda.blockIdx.x * n + t
    buf[t] = x[i]
    cuda.syncthreads()
    out[i] = buf[n - 1 - t]


def _shared_roundtrip(xp, block, shared):
    x = xp.arange(4 * block, dtype=np.float32)
    out = xp.full(4 * block, np.nan, dtype=np.float32)
    _device.launch(_reverse_through_shared, 4, block, x, out, shared=shared)
    want = np.arange(4 * block, dtype=np.float32).reshape(4, block)[:, ::-1].reshape(-1)
    got = out if xp is np else xp.asnumpy(out)
    np.testing.assert_array_equal(got, want)


def test_dynamic_shared_memory_in_the_simulator():
    """launch(..., shared=bytes) gives the kernel that much dynamic shared memory (the simulator's path)."""
    if not _device.SIMULATOR:
        pytest.skip("a GPU runs the gpu test below")
    _shared_roundtrip(np, 32, 32 * 4)


@pytest.mark.gpu
def test_dynamic_shared_memory_above_48_kb():
    """Above 48 KB the kernel's limit is raised first (cuFuncSetAttribute): 1024 threads x 64 KB; the
    second launch takes the fast path with the same size."""
    import cupy as cp

    block, shared = 1024, 64 * 1024
    before = _device.launch_counts["fast"]
    _shared_roundtrip(cp, block, shared)
    _shared_roundtrip(cp, block, shared)
    assert _device.launch_counts["fast"] == before + (1 if _device.FAST_LAUNCH else 0)
