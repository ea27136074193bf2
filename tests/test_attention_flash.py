"""Flash attention (ops/flash_attention.py and its kernels) against the float64 reference
ops/attention.py: forward, log-sum-exp and all three gradients, on odd shapes (T not a multiple
of any block), GQA, sliding windows, padding (including queries that see no key at all).

    NumPy path      float64 inputs: 1e-10; float32: 2e-5 relative to the output's scale
    Numba kernels   the CUDA simulator at tiny shapes (FP32): 2e-5
    CUDA C kernels  on the CPU through tests/flash_attention_emulate.cpp (a host emulation of
                    mma.sync, ldmatrix and shuffles; g++ -std=c++20), small T: bf16 2e-2, fp16 2e-3
    GPU (gpu mark)  Numba FP32 kernels 2e-4; tensor cores (bf16 q, k, v, P, dO, dS with FP32
                    accumulation; relative error per rounding 2^-8 = 3.9e-3, summed over ~sqrt(T)
                    effective terms) 3e-2 of the largest reference value per output.
"""
from __future__ import annotations

import numpy as np
import pytest

from q4kdistill import backend
from q4kdistill.errors import Q4KError
from q4kdistill.student.ops.attention import attention_backward, attention_forward
from q4kdistill.student.ops.flash_attention import (FlashCache, flash_attention_backward, flash_attention_forward)

SIM = not backend.on_gpu()


def make_inputs(B, T, H, KV, D, seed, pad=None, dtype=np.float64, spread=1.0):
    """q, k, v, do, key_mask. pad: per batch row, the number of left-padding positions."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)) * spread
    k = rng.standard_normal((B, T, KV, D)) * spread
    v = rng.standard_normal((B, T, KV, D))
    do = rng.standard_normal((B, T, H, D))
    mask = None
    if pad is not None:
        mask = np.ones((B, T), dtype=bool)
        for b, n in enumerate(pad):
            mask[b, :n] = False
    return [a.astype(dtype) for a in (q, k, v, do)] + [mask]


def reference(q, k, v, do, mask, window, scale):
    """float64 (o, lse [B, H, T], dq, dk, dv) from ops/attention.py; lse from its own scores."""
    q, k, v, do = (np.asarray(a, dtype=np.float64) for a in (q, k, v, do))
    o, cache = attention_forward(q, k, v, mask, window, scale)
    dq, dk, dv = attention_backward(do, cache)
    return o, dq, dk, dv


def rel_err(a, ref, floor=1e-30):
    """max |a - ref| over max |ref| (at least ``floor``)."""
    a = np.asarray(a, dtype=np.float64)
    assert np.isfinite(a).all(), "non-finite values in the output"
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), floor))


def check_all(got, want, bound, what=""):
    """got, want: (o, dq, dk, dv). A gradient's error is relative to its largest value, or to a
    thousandth of the largest of all three where it is (nearly) zero everywhere (window 1: dq = 0)."""
    g_max = max(float(np.abs(w).max()) for w in want[1:])
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, f"{what} {name}: shape {g.shape} != {w.shape}"
        err = rel_err(g, w, 1e-30 if name == "o" else max(1e-3 * g_max, 1e-300))
        assert err < bound, f"{what} {name}: relative error {err:.3g} >= {bound}"


CASES = [   # B, T, H, KV, D, window, pad
    (1, 1, 1, 1, 4, None, None),
    (2, 13, 4, 2, 8, None, None),
    (2, 13, 4, 1, 8, 5, None),
    (2, 17, 6, 3, 16, None, [0, 4]),
    (3, 11, 2, 2, 8, 3, [11, 2, 0]),     # a fully padded sequence: every query sees no key
    (1, 29, 4, 4, 4, 1, [3]),            # window 1: each query sees itself only
]


@pytest.mark.parametrize("B,T,H,KV,D,window,pad", CASES)
@pytest.mark.parametrize("block", [4, 7, 256])
def test_numpy_path_float64_matches_reference(B, T, H, KV, D, window, pad, block):
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T * 31 + H, pad=pad)
    scale = 0.37
    want = reference(q, k, v, do, mask, window, scale)
    o, cache = flash_attention_forward(q, k, v, mask, window, scale, block=block)
    assert cache.path == "blocks" and o.dtype == np.float64
    check_all((o,) + flash_attention_backward(do, cache), want, 1e-10, f"block {block}")


def test_numpy_path_no_nan_and_zero_for_unseeing_queries():
    q, k, v, do, mask = make_inputs(2, 9, 2, 1, 4, seed=3, pad=[9, 3])
    o, cache = flash_attention_forward(q, k, v, mask, None, 0.5, block=4)
    dq, dk, dv = flash_attention_backward(do, cache)
    assert (o[0] == 0).all() and (o[1, :3] == 0).all() and (dq[0] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all() and (dk[1, :3] == 0).all()
    assert np.isinf(cache.lse[0]).all() and np.isfinite(cache.lse[1, :, 3:]).all()


def test_numpy_path_float32_keeps_dtype_and_large_scores():
    """Large scores (spread 6: logits ~ 100) must not overflow the running softmax."""
    q, k, v, do, mask = make_inputs(2, 37, 4, 2, 8, seed=5, pad=[0, 7], dtype=np.float32, spread=6.0)
    want = reference(q, k, v, do, mask, 9, 0.35)
    o, cache = flash_attention_forward(q, k, v, mask, 9, 0.35, block=8)
    got = (o,) + flash_attention_backward(do, cache)
    assert all(g.dtype == np.float32 for g in got)
    check_all(got, want, 2e-5)


def test_numpy_path_keeps_no_quadratic_state():
    q, k, v, do, _ = make_inputs(1, 64, 2, 1, 4, seed=1)
    _, cache = flash_attention_forward(q, k, v, None, None, 1.0, block=16)
    held = [a for a in vars(cache).values() if isinstance(a, np.ndarray)]
    assert max(a.size for a in held) == q.size       # q, k, v, o, lse: nothing [T, T]


def test_user_errors_are_q4kerrors():
    q, k, v, do, _ = make_inputs(1, 5, 4, 2, 4, seed=0)
    with pytest.raises(Q4KError):
        flash_attention_forward(q, k[:, :4], v[:, :4], None, None, 1.0)
    with pytest.raises(Q4KError):
        flash_attention_forward(q, k[:, :, :, :2], v[:, :, :, :2], None, None, 1.0)
    with pytest.raises(Q4KError):
        flash_attention_forward(q[:, :, :3], k, v, None, None, 1.0)       # 3 heads over 2 kv heads
    with pytest.raises(Q4KError):
        flash_attention_forward(q, k, v, np.ones((1, 4), bool), None, 1.0)
    with pytest.raises(Q4KError):
        flash_attention_forward(q, k, v, None, None, 1.0, path="fast")
    with pytest.raises(Q4KError):
        flash_attention_forward(q.astype(np.uint16), k.astype(np.uint16), v.astype(np.uint16), None, None, 1.0)
    _, cache = flash_attention_forward(q, k, v, None, None, 1.0)
    with pytest.raises(Q4KError):
        flash_attention_backward(do[:, :4], cache)


# -- the Numba FP32 kernels under the simulator (CI) -------------------------------------------
SIM_CASES = [   # B, T, H, KV, D, window, pad; tiny: the simulator runs a thread per Python thread
    (1, 11, 2, 1, 4, None, None),
    (2, 10, 2, 2, 4, 3, [0, 4]),
    (1, 9, 4, 2, 4, None, [9]),
    (1, 17, 2, 1, 8, 6, [2]),
]


@pytest.mark.parametrize("B,T,H,KV,D,window,pad", SIM_CASES)
def test_numba_kernels_match_reference(B, T, H, KV, D, window, pad):
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=7 * T + D, pad=pad, dtype=np.float32)
    want = reference(q, k, v, do, mask, window, 0.6)
    xp = backend.xp()
    args = [xp.asarray(a) for a in (q, k, v)] + [None if mask is None else xp.asarray(mask)]
    o, cache = flash_attention_forward(*args, window, 0.6, path="numba")
    assert cache.path == "numba"
    got = [backend.to_host(a) for a in (o,) + flash_attention_backward(xp.asarray(do), cache)]
    check_all(got, want, 2e-5 if SIM else 2e-4, "numba")
    check_lse(backend.to_host(cache.lse), q, k, v, mask, window, 0.6, 1e-4)


def check_lse(lse, q, k, v, mask, window, scale, bound):
    """lse [B, H, T] against the NumPy path in float64 (itself checked against the reference above)."""
    lse_ref = flash_attention_forward(*(a.astype(np.float64) for a in (q, k, v)), mask, window, scale)[1].lse
    seen = np.isfinite(lse_ref)
    assert (np.isinf(lse) == ~seen).all(), "lse is +inf exactly where a query sees no key"
    if seen.any():
        assert np.abs(lse[seen] - lse_ref[seen]).max() < bound


def test_simulated_kernels_are_the_default_numba_choice_only_when_asked():
    """NumPy arrays go to the block path unless the Numba kernels are asked for by name."""
    q, k, v, _, _ = make_inputs(1, 5, 2, 1, 4, seed=2, dtype=np.float32)
    assert flash_attention_forward(q, k, v, None, None, 1.0)[1].path == "blocks"
    with pytest.raises(Q4KError):
        flash_attention_forward(q, k, v, None, None, 1.0, path="mma")


# -- the CPU step at 8k tokens: host memory linear in T ------------------------------------------
RSS_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, "tests")
from _helpers_student import tiny_config
from q4kdistill.student import Student
T, V = 8192, 256
cfg = tiny_config("llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=V)
s = Student.from_config(cfg, seed=0, xp=np)
rng = np.random.default_rng(1)
ids = rng.integers(0, V, (1, T))
loss, g, _ = s.loss_and_grads(ids, lambda a, b: rng.standard_normal((b - a, V)).astype(np.float32))
assert np.isfinite(loss) and all(np.isfinite(x).all() for x in g.values())
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.slow   # ~2 s of compute on a free core, minutes on a busy one
def test_cpu_student_step_at_8k_tokens_stays_under_1gb():
    """Before flash attention this step peaked at 5.3 GB of RSS ([H, T, T] scores and probabilities
    kept per layer); now ~0.3 GB (q, k, v, o and the log-sum-exp per layer; 281 MB VmHWM, 2026-12-06)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), Q4KDISTILL_DEVICE="cpu")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # VmHWM: this process's own high-water RSS, in KiB. Not ru_maxrss: Linux folds the forked copy of
    # the parent's pages into it at exec, so a child of a 3.8 GB pytest worker "peaked" at 3.8 GB.
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"


# -- GPU: real sizes ------------------------------------------------------------------------------
GPU_CASES = [   # B, T, H, KV, D, window, pad: the 0.5B student, the 7B teacher, gemma-3's local layers
    (1, 4096, 14, 2, 64, None, None),
    (2, 1531, 14, 2, 64, None, [0, 300]),
    (1, 2048, 28, 4, 128, None, [17]),
    (1, 4096, 4, 1, 256, 512, None),
    (2, 777, 4, 1, 256, 100, [0, 777]),
]
BOUNDS = {"bf16": 3e-2, "fp16": 4e-3}   # of the largest reference value, per output (see the module doc)


def _round16(x, dtype):
    """float64 -> the float64 values of its bf16 / fp16 rounding (what the tensor cores read)."""
    x32 = np.asarray(x, dtype=np.float32)
    if dtype == "fp16":
        return x32.astype(np.float16).astype(np.float64)
    n = x32.view(np.uint32).astype(np.uint64)
    bits = ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)


def _reference_gpu(q, k, v, do, mask, window, scale):
    """The float64 reference on the GPU (the [T, T] products are too slow for NumPy at these sizes)."""
    import cupy

    a = [cupy.asarray(x) for x in (q, k, v, do)]
    m = None if mask is None else cupy.asarray(mask)
    o, cache = attention_forward(a[0], a[1], a[2], m, window, scale)
    grads = attention_backward(a[3], cache)
    out = [x.get() for x in (o,) + tuple(grads)]
    del cache, grads
    cupy.get_default_memory_pool().free_all_blocks()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,KV,D,window,pad", GPU_CASES)
def test_gpu_mma_matches_reference(B, T, H, KV, D, window, pad, dtype):
    import cupy

    from kernels.flash_attention_mma import available
    assert available(), "the tensor-core attention does not compile here (NVRTC?)"
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T + D, pad=pad)
    q, k, v, do = (_round16(x, dtype) for x in (q, k, v, do))
    scale = D ** -0.5
    want = _reference_gpu(q, k, v, do, mask, window, scale)
    args = [cupy.asarray(x, dtype=np.float32) for x in (q, k, v)]
    m = None if mask is None else cupy.asarray(mask)
    o, cache = flash_attention_forward(*args, m, window, scale, path="mma", mma_dtype=dtype)
    got = [x.get() for x in (o,) + flash_attention_backward(cupy.asarray(do, dtype=np.float32), cache)]
    check_all(got, want, BOUNDS[dtype], f"mma {dtype}")
    if T <= 2048:                                      # (the float64 NumPy lse takes a while beyond)
        check_lse(cache.lse.get(), q, k, v, mask, window, scale, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,KV,D,window,pad", GPU_CASES)
def test_gpu_mma_schedule_13_matches_reference(monkeypatch, B, T, H, KV, D, window, pad):
    """The mma.sync forward and backward in instruction schedule 13 ($Q4KDISTILL_FA_SCHED; fp16, whose bound is
    the tighter), on the same cases as the default schedule above."""
    import cupy

    from kernels import flash_attention_mma as fm
    for env, value in ((fm.SCHED_ENV, "13"), (fm.FWD_ENV, "mma"), (fm.BWD_ENV, "mma")):
        monkeypatch.setenv(env, value)
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T + D + 13, pad=pad)
    q, k, v, do = (_round16(x, "fp16") for x in (q, k, v, do))
    scale = D ** -0.5
    want = _reference_gpu(q, k, v, do, mask, window, scale)
    args = [cupy.asarray(x, dtype=np.float32) for x in (q, k, v)]
    m = None if mask is None else cupy.asarray(mask)
    o, cache = flash_attention_forward(*args, m, window, scale, path="mma", mma_dtype="fp16")
    got = [x.get() for x in (o,) + flash_attention_backward(cupy.asarray(do, dtype=np.float32), cache)]
    check_all(got, want, BOUNDS["fp16"], "mma fp16, schedule 13")


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,KV,D,window,pad", [(1, 1000, 8, 2, 64, None, [5]), (1, 700, 4, 1, 256, 64, None)])
def test_gpu_numba_kernels_match_reference(B, T, H, KV, D, window, pad):
    import cupy

    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T, pad=pad)
    want = _reference_gpu(q, k, v, do, mask, window, 0.125)
    args = [cupy.asarray(x, dtype=np.float32) for x in (q, k, v)]
    m = None if mask is None else cupy.asarray(mask)
    o, cache = flash_attention_forward(*args, m, window, 0.125, path="numba")
    got = [x.get() for x in (o,) + flash_attention_backward(cupy.asarray(do, dtype=np.float32), cache)]
    check_all(got, want, 2e-4, "numba gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype", [(64, "bf16"), (128, "fp16")])
def test_gpu_mma_forward_writes_o_in_16_bits_as_a_cast_would(D, dtype):
    """out_dtype: o written by the kernel in fp16 / bf16 (what the teacher's and the bf16 student's
    o-projection read) equals the float32 o cast, bit for bit, at 2 x 1000 tokens with GQA and padding."""
    import cupy

    from kernels.flash_attention_mma import as_f32, mma_attention_forward, to16
    q, k, v, _, mask = make_inputs(2, 1000, 8, 2, D, seed=D, pad=[0, 37])
    args = [cupy.asarray(x, dtype=np.float32) for x in (q, k, v)]
    m = cupy.asarray(mask)
    o32, lse32, _ = mma_attention_forward(*args, m, None, D ** -0.5, dtype)
    for out, name in ((np.float16, "fp16"), (None, "bf16")):
        if out is None:
            from q4kdistill.student.precision import Precision
            out = Precision("bf16", cupy).device_bf16
            if out is None:
                continue                                   # no ml_dtypes here
        o16, lse, _ = mma_attention_forward(*args, m, None, D ** -0.5, dtype, out_dtype=out)
        assert o16.dtype == out
        want = to16(o32, name).get()
        assert (o16.view(np.uint16).get() == want).all(), name
        assert (lse == lse32).all() and bool(cupy.isfinite(as_f32(o16)).all())


def _rows_reference(do, o, s, dtype):
    """float64 / exact references of kernels.flash_attention_rows: the 16-bit bits of dO * s (float32 product,
    rounded to nearest even), and drow [B, H, T] = sum over D of (dO * s) O in float64 on the values stored."""
    from test_fused_kernels import f64, store
    g = (np.asarray(f64(do), dtype=np.float32) * np.float32(s)).astype(np.float32)
    bits = store(g, "bfloat16") if dtype == "bf16" else g.astype(np.float16).view(np.uint16)
    drow = (g.astype(np.float64) * f64(o)).sum(axis=-1).transpose(0, 2, 1)
    return bits, drow


@pytest.mark.skipif(not SIM, reason="the simulator's test (the GPU runs test_gpu_backward_rows_*)")
@pytest.mark.parametrize("do_dtype,o_dtype,dtype", [("float32", "bfloat16", "bf16"), ("float32", "float16", "fp16"),
                                                    ("float16", "float32", "bf16"), ("bfloat16", "bfloat16", "fp16")])
@pytest.mark.parametrize("B,T,H,D", [(2, 3, 3, 40), (1, 2, 2, 64)])
def test_backward_rows_match_float64(do_dtype, o_dtype, dtype, B, T, H, D):
    """flash_attention_rows.backward_rows (the backward's do16 and drow in one pass) in the simulator: do16 equal
    bit for bit to dO * s rounded, drow to float64 within float32 rounding of a D-term sum, in [B, H, T] order (an
    odd D: lanes past the row's end idle; H, T > 1: the transpose is exercised); outputs poisoned first."""
    from kernels import flash_attention_rows as fr
    from test_fused_kernels import store
    rng = np.random.default_rng(B * 100 + D)
    do = store(rng.standard_normal((B, T, H, D)) * 300, do_dtype)
    o = store(rng.standard_normal((B, T, H, D)), o_dtype)
    s = np.array([2.0 ** -9], np.float32)
    bits, drow = fr.backward_rows(do, o, s, dtype)
    want_bits, want_drow = _rows_reference(do, o, s[0], dtype)
    assert bits.dtype == np.uint16 and bits.shape == (B, T, H, D) and drow.shape == (B, H, T)
    assert (bits == want_bits).all()
    assert np.abs(drow - want_drow).max() <= 1e-5 * np.abs(want_drow).max()
    with pytest.raises(Q4KError, match="expected fp16 or bf16"):
        fr.backward_rows(do, o, s, "fp32")
    with pytest.raises(Q4KError, match="expected one"):
        fr.backward_rows(do, o[:, :1], s, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,D,dtype", [(1, 8192, 14, 64, "bf16"), (2, 1000, 28, 128, "fp16"), (1, 77, 4, 256, "bf16")])
def test_gpu_backward_rows_match_float64_and_the_scale(B, T, H, D, dtype):
    """On the GPU at real sizes: backward_rows as in the simulator's test (float32 dO, 16-bit O as the models keep
    it), and grad_scale (one reduction) the power of two that brings max |dO| into [1, 2), 1 for dO = 0."""
    import cupy

    from kernels import flash_attention_rows as fr
    from kernels.flash_attention_mma import grad_scale
    rng = np.random.default_rng(D)
    do = (rng.standard_normal((B, T, H, D)) * 3e-4).astype(np.float32)
    do[0, 0, 0, 1] = -5e-3                                  # max |dO|: 2^-8 <= 5e-3 < 2^-7
    o = rng.standard_normal((B, T, H, D)).astype(np.float16)
    s = grad_scale(cupy.asarray(do))
    assert float(s.get()[0]) == 2.0 ** 8
    assert float(grad_scale(cupy.zeros((2, 3), np.float32)).get()[0]) == 1.0
    bits, drow = fr.backward_rows(cupy.asarray(do), cupy.asarray(o), s, dtype)
    want_bits, want_drow = _rows_reference(do, o, 2.0 ** 8, dtype)
    assert (bits.get() == want_bits).all()
    assert np.abs(drow.get() - want_drow).max() <= 1e-5 * np.abs(want_drow).max()


@pytest.mark.gpu
def test_gpu_cupy_float64_uses_the_block_path():
    import cupy

    q, k, v, do, mask = make_inputs(2, 300, 4, 2, 32, seed=9, pad=[0, 40])
    want = reference(q, k, v, do, mask, 50, 0.3)
    a = [cupy.asarray(x) for x in (q, k, v)]
    o, cache = flash_attention_forward(*a, cupy.asarray(mask), 50, 0.3, block=64)
    assert cache.path == "blocks" and o.dtype == np.float64
    got = [x.get() for x in (o,) + flash_attention_backward(cupy.asarray(do), cache)]
    check_all(got, want, 1e-10, "blocks on cupy")


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_T():
    """fwd + bwd at T = 32768 (the 0.5B student's heads): the pool's peak stays within a small
    multiple of q's bytes; the [H, T, T] scores alone would be 60 GB in float32."""
    import cupy

    B, T, H, KV, D = 1, 32768, 14, 2, 64
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    rng = cupy.random.default_rng(0)
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k = rng.standard_normal((B, T, KV, D), dtype=np.float32)
    v = rng.standard_normal((B, T, KV, D), dtype=np.float32)
    do = rng.standard_normal((B, T, H, D), dtype=np.float32)
    base = pool.total_bytes()
    o, cache = flash_attention_forward(q, k, v, None, None, 0.125)
    dq, dk, dv = flash_attention_backward(do, cache)
    cupy.cuda.get_current_stream().synchronize()
    assert all(bool(cupy.isfinite(x).all()) for x in (o, dq, dk, dv))
    grew = pool.total_bytes() - base
    assert grew < 8 * q.nbytes, f"attention took {grew / 2**30:.2f} GiB beyond its inputs (q: {q.nbytes / 2**30:.2f})"


# -- the CUDA C source: compiles for sm_90a without spills (where nvcc is installed) --------------
def test_mma_source_compiles_almost_without_spills(tmp_path):
    """Each shipped instantiation compiled by nvcc for the H100/H200 (the GPU compiles it with NVRTC
    at run time; this catches syntax, template and register-budget errors on a machine without one)."""
    import re
    import shutil
    import subprocess

    from kernels import flash_attention_mma as fm

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    text = fm.SOURCE.read_text()
    names = []
    for D in (64, 128, 256):
        mts = (1, 2) if D <= 64 else (1,)                  # the forward's m16 tiles per warp (forward_mtiles)
        sources = []
        for bf16 in (True, False) if D == 64 else (True,):
            sources.append(fm.backward_source(D, bf16))
            sources += [fm.forward_source(D, bf16, 0, mt) for mt in mts]
        for out in (1, 2):                                 # o in fp16 (the teacher) or bf16 (a bf16 student)
            sources += [fm.forward_source(D, False, out, mt) for mt in mts]
        for name, extra in sources:
            text += extra
            names.append(name)
    for name, args in re.findall(r'extern "C" __device__ int (\w+)\(([^)]*)\)', text):    # a kernel per function
        params = ", ".join(p.split()[-1].lstrip("*") for p in args.split(","))
        text += f'extern "C" __global__ void k_{name}({args}) {{ {name}({params}); }}\n'
    src = tmp_path / "fa.cu"
    src.write_text(text)
    out = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c", "-o",
                          str(tmp_path / "fa.o"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    spills = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores", out.stderr, re.S)
    assert sorted(n for n, _ in spills) == sorted(f"k_{n}" for n in names)
    # at most a word or two (the D = 256 forward: 128 accumulators and 64 Q fragment registers per thread);
    # none for the forward with 32 query rows per warp (MT = 2, the default for D <= 64)
    assert all(int(b) <= 8 for _, b in spills), spills
    assert all(int(b) == 0 for n, b in spills if "_m2_" in n), spills


# -- the CUDA C kernels themselves, on the CPU: tests/flash_attention_emulate.cpp ---------------
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """kernels/csrc/flash_attention.cu built with a host emulation of mma.sync / ldmatrix / shuffles (the mma.sync
    kernels' one schedule, 13: kernels.flash_attention_mma.kernel_sched)."""
    from _helpers_emulate import build_emulator

    from kernels.flash_attention_mma import SOURCE

    return build_emulator(tmp_path_factory, "flash_attention_emulate.cpp", {"FA_SOURCE": SOURCE})


def _bits16(x, dtype):
    """float64 -> uint16 bits of its bf16 / fp16 rounding (as kernels/flash_attention_mma.to16)."""
    if dtype == "fp16":
        return np.ascontiguousarray(np.asarray(x, np.float32).astype(np.float16).view(np.uint16))
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(np.uint16)


def _dkv_buffers(B, T, H, KV, D):
    """dk, dv as the wrapper hands them over: zeroed under GQA (the G query heads of a kv head add
    into them), else poisoned with NaN (one writer stores every element)."""
    fill = 0.0 if KV < H else np.nan
    return (np.full((B, T, KV, D), fill, np.float32) for _ in range(2))


def _emulated_attention(lib, q, k, v, do, mask, window, scale, dtype, mt=1):
    """(o, dq, dk, dv, lse) from the emulated kernels (the forward with mt m16 tiles per warp), outputs
    poisoned with NaN (dq zeroed: atomics; dk, dv zeroed under GQA)."""
    import ctypes

    B, T, H, D = q.shape
    KV = k.shape[2]
    q16, k16, v16 = (_bits16(x, dtype) for x in (q, k, v))
    m = np.ones(1, np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
    w = T + 1 if window is None else window
    o = np.full((B, T, H, D), np.nan, np.float32)
    lse = np.full((B, H, T), np.nan, np.float32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)             # noqa: E731
    I, F = ctypes.c_int, ctypes.c_float
    bf = I(dtype == "bf16")
    rc = lib.emu_forward(I(D), I(mt), bf, p(q16), p(k16), p(v16), p(m), I(mask is not None), I(B), I(T), I(H), I(KV),
                         I(w), F(scale), p(o), p(lse))
    assert rc == 0, f"no emulated forward for D = {D}, MT = {mt}"
    # as the wrapper: dO and drow times the power of two that brings max |dO| into [1, 2)
    s = np.array([2.0 ** -np.floor(np.log2(np.abs(do).max()))], np.float32)
    do16 = _bits16(do * s[0], dtype)
    drow = np.ascontiguousarray((do.astype(np.float32) * o).sum(axis=-1).transpose(0, 2, 1)) * s[0]   # [B, H, T]
    dq = np.zeros((B, T, H, D), np.float32)
    dk, dv = _dkv_buffers(B, T, H, KV, D)
    rc = lib.emu_backward(I(D), bf, p(q16), p(k16), p(v16), p(do16), p(lse), p(drow), p(m), I(mask is not None), I(B),
                          I(T), I(H), I(KV), I(w), F(scale), p(s), p(dq), p(dk), p(dv))
    assert rc == 0, f"no emulated backward for D = {D}"
    return o, dq, dk, dv, lse


EMU_BOUNDS = {"bf16": 2e-2, "fp16": 2e-3}   # measured: bf16 <= 9.7e-3 (dO rounded too), fp16 <= 5.5e-4
EMU_CASES = [   # B, T, H, KV, D, window, pad, dtype: tiles cross T, GQA, windows, a fully padded row
    (1, 70, 2, 1, 64, None, None, "bf16"),
    (2, 37, 2, 2, 32, 9, [0, 37], "fp16"),
    (1, 45, 4, 2, 128, None, [6], "bf16"),
    (1, 41, 2, 1, 256, 20, [3], "bf16"),
    (1, 150, 2, 1, 64, None, None, "bf16"),        # tiles below the diagonal: the unmasked fast path
    (1, 200, 2, 1, 32, 150, None, "fp16"),         # ... and next to a window's edge
    (2, 203, 4, 2, 64, 45, [0, 7], "fp16"),        # a window inside a warp's 32 rows; m-tiles past T
]
# the forward's m16 tiles per warp: 1 and 2 where D <= 64 (forward_mtiles), 1 above
EMU_MT_CASES = [c + (mt,) for c in EMU_CASES for mt in ((1, 2) if c[4] <= 64 else (1,))]


@pytest.mark.parametrize("B,T,H,KV,D,window,pad,dtype,mt", EMU_MT_CASES)
def test_mma_kernels_emulated_on_the_cpu(emulated, B, T, H, KV, D, window, pad, dtype, mt):
    q, k, v, do, mask = make_inputs(B, T, H, KV, D, seed=T * D, pad=pad)
    do = do * 1e-7                         # gradients this small are fp16 subnormals unless scaled (kept unrounded)
    q, k, v = (_round16(x, dtype) for x in (q, k, v))
    scale = D ** -0.5
    want = reference(q, k, v, do, mask, window, scale)
    o, dq, dk, dv, lse = _emulated_attention(emulated, q, k, v, do, mask, window, scale, dtype, mt)
    check_all((o, dq, dk, dv), want, EMU_BOUNDS[dtype], f"emulated mma {dtype} MT {mt}")
    check_lse(lse, q, k, v, mask, window, scale, 1e-2)


@pytest.mark.parametrize("D,dtype,out,mt", [(64, "bf16", "bf16", 1), (64, "fp16", "bf16", 1), (64, "fp16", "fp16", 1),
                                            (64, "bf16", "bf16", 2), (64, "fp16", "bf16", 2), (64, "fp16", "fp16", 2),
                                            (128, "fp16", "fp16", 1), (128, "fp16", "bf16", 1)])
def test_mma_forward_writes_o_in_16_bits_as_a_cast_would(emulated, D, dtype, out, mt):
    """The forward's 16-bit o (template OUT: for a product that reads 16 bits) is its float32 o
    rounded to nearest even, bit for bit, and the same log-sum-exp; a fully padded row's o is 0."""
    import ctypes

    B, T, H, KV = 1, 45, 2, 1
    q, k, v, _, mask = make_inputs(B, T, H, KV, D, seed=D + len(out), pad=[6])
                                                           # (keys 0..5 padded: query 0 sees no key)
    q, k, v = (_round16(x, dtype) for x in (q, k, v))
    o32, _, _, _, lse32 = _emulated_attention(emulated, q, k, v, np.ones_like(q), mask, None, D ** -0.5, dtype, mt)
    o16 = np.full((B, T, H, D), 0x7FC0, np.uint16)         # poisoned
    lse = np.full((B, H, T), np.nan, np.float32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)       # noqa: E731
    I = ctypes.c_int
    q16, k16, v16 = (_bits16(x, dtype) for x in (q, k, v))
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    rc = emulated.emu_forward16(I(D), I(mt), I(dtype == "bf16"), I(2 if out == "bf16" else 1), p(q16), p(k16),
                                p(v16), p(m), I(1), I(B), I(T), I(H), I(KV), I(T + 1), ctypes.c_float(D ** -0.5),
                                p(o16), p(lse))
    assert rc == 0
    np.testing.assert_array_equal(o16, _bits16(o32, out))
    np.testing.assert_array_equal(lse, lse32)
    assert not o16[0, 0].any()


# -- GPU: the student with flash attention against the same student with the reference attention --
@pytest.mark.gpu
@pytest.mark.parametrize("family,path,bound", [("qwen2", None, 2e-3), ("gemma3", None, 2e-3), ("qwen2", "numba", 2e-4)])
def test_gpu_student_grads_match_reference_attention(monkeypatch, family, path, bound):
    """loss_and_grads at 2 x 700 tokens (padding, GQA; gemma3: windows and head size 256): the
    tensor-core path (fp16 inputs) and the FP32 Numba kernels against ops/attention.py, all in float32."""
    import cupy

    from q4kdistill.student import model as student_mod
    from q4kdistill.student.losses import LossConfig
    from q4kdistill.student.ops.gradcheck import rel_error
    from q4kdistill.student import Student
    from _helpers_student import tiny_config

    head_dim = 256 if family == "gemma3" else 64
    cfg = tiny_config(family, n_layers=2, d_model=256, n_heads=4, n_kv_heads=1 if family == "gemma3" else 2,
                      head_dim=head_dim, d_ff=512, vocab_size=1000, sliding_window=128,
                      swa_layers=[0] if family == "gemma3" else [])
    rng = np.random.default_rng(3)
    ids = cupy.asarray(rng.integers(0, cfg.vocab_size, (2, 700)))
    mask = np.ones((2, 700), bool)
    mask[1, :50] = False
    mask = cupy.asarray(mask)
    teacher = cupy.asarray(rng.standard_normal((2 * 700, cfg.vocab_size)).astype(np.float32))
    loss_cfg = LossConfig("kl", alpha=0.3)
    s = Student.from_config(cfg, seed=2, xp=cupy)
    # an fp32 student keeps FP32 attention by default (the block path); here the kernels are what is tested
    monkeypatch.setattr(student_mod, "_attention_path", lambda q, prec: path)
    if path:
        monkeypatch.setenv("Q4KDISTILL_ATTENTION", path)
    loss, g, _ = s.loss_and_grads(ids, lambda a, b: teacher[a:b], loss_cfg, attention_mask=mask)
    got = {n: v.get() for n, v in g.items()}
    monkeypatch.setattr(student_mod, "flash_attention_forward",
                        lambda *args, path=None, out_dtype=None, **kw: attention_forward(*args, **kw))
    monkeypatch.setattr(student_mod, "flash_attention_backward", attention_backward)
    loss_ref, g_ref, _ = s.loss_and_grads(ids, lambda a, b: teacher[a:b], loss_cfg, attention_mask=mask)
    g_ref = {n: v.get() for n, v in g_ref.items()}        # the next call reuses the gradient buffers
    assert loss == pytest.approx(loss_ref, rel=1e-4)
    # what rounding the tensor cores' inputs (q, k, v, dO) to fp16 alone costs: the reference attention on
    # rounded inputs. gemma3's q/k norms make the scores large, so its rounding error is larger than qwen2's;
    # the kernel may be at most 4x that (a wrong tile or mask gives errors of order 1)
    def rounded(x):
        return x.astype(cupy.float16).astype(x.dtype)

    monkeypatch.setattr(student_mod, "flash_attention_forward", lambda q, k, v, *args, path=None, out_dtype=None, **kw:
                        attention_forward(rounded(q), rounded(k), rounded(v), *args, **kw))
    monkeypatch.setattr(student_mod, "flash_attention_backward", lambda do, cache: attention_backward(rounded(do), cache))
    _, g_rnd, _ = s.loss_and_grads(ids, lambda a, b: teacher[a:b], loss_cfg, attention_mask=mask)
    for name, want in g_ref.items():
        err = rel_error(got[name], want)
        floor = rel_error(g_rnd[name].get(), want) if path is None else 0.0
        assert err <= max(bound, 4 * floor), f"{name}: {err:.2e} (fp16 inputs alone: {floor:.2e})"


def test_forward_m_tiles_by_head_size_length_and_environment(monkeypatch):
    from kernels import flash_attention_mma as M

    monkeypatch.delenv(M.MT_ENV, raising=False)
    assert [M.forward_mtiles(64, T) for T in (None, 512, M.MT2_MAX_T, M.MT2_MAX_T + 1, 8192)] == [2, 2, 2, 1, 1]
    assert M.forward_mtiles(128, 512) == M.forward_mtiles(256, None) == 1         # registers
    monkeypatch.setenv(M.MT_ENV, "2")
    assert M.forward_mtiles(64, 8192) == 2 and M.forward_mtiles(128, 512) == 1
    monkeypatch.setenv(M.MT_ENV, "3")
    with pytest.raises(Q4KError, match="expected 1 or 2"):
        M.forward_mtiles(64, 512)
