"""Fused kernels (kernels/fused_*.py, ops/fused*.py) against the float64 references in ops/ and losses.py.

Simulator tests (CI): tiny odd shapes, fresh random inputs, outputs poisoned with NaN first, every
storage type (float32, bfloat16 as uint16 bits, float16). The reference runs in float64 on exactly
the values the kernel read (inputs rounded to their storage type first), so the bounds only cover
float32 math and the rounding of the kernel's own output:
    float32 out: 2e-5 x scale,  float16 out: 2e-3 x scale,  bfloat16 out: 1e-2 x scale
where scale is max |reference| (per output). GPU tests (``-m gpu``): the sizes the issue names.
"""
import math

import numpy as np
import pytest

from q4kdistill import backend
from q4kdistill.errors import Q4KError
from q4kdistill.student.losses import LossConfig, chunk_loss, masked_sum, token_weights
from q4kdistill.student.ops.glu import glu_backward, glu_forward
from q4kdistill.student.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from q4kdistill.student.ops.rope import rope_backward, rope_forward, rope_tables

from kernels.fused_glu import glu_bwd, glu_fwd
from kernels.fused_kd_loss import kd_loss_rows
from kernels.fused_rmsnorm import rmsnorm_apply, rmsnorm_bwd, rmsnorm_fwd
from kernels.fused_rope import rope_apply
from q4kdistill.student.ops import fused as fused_ops
from q4kdistill.student.ops.fused_linear_loss import fused_chunk_loss, fused_linear_loss


@pytest.fixture(autouse=True)
def _kernels_on_host(monkeypatch):
    """The op wrappers send NumPy arrays to the reference ops; here they must reach the kernels."""
    monkeypatch.setattr(fused_ops, "ON_HOST", True)

DTYPES = ("float32", "bfloat16", "float16")
BOUND = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1e-2}


# -- storage helpers (NumPy or CuPy) ------------------------------------------------------------
def store(a, dtype):
    """float array -> the kernel's storage of it (bfloat16: uint16 bits, rounded to nearest even)."""
    xp = backend.array_module(a)
    if dtype == "bfloat16":
        u = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(xp.uint16)
    return xp.ascontiguousarray(a, dtype=dtype)


def f64(a):
    """The values a storage array holds, as float64."""
    xp = backend.array_module(a)
    if a.dtype == np.uint16:
        return (a.astype(xp.uint32) << 16).view(xp.float32).astype(xp.float64)
    return a.astype(xp.float32).astype(xp.float64)      # via float32: also for a CuPy bfloat16 array


def poisoned(shape, dtype, xp=np):
    """An output buffer full of NaN (bfloat16 NaN bits 0x7FC0)."""
    if dtype == "bfloat16":
        return xp.full(shape, 0x7FC0, dtype=xp.uint16)
    return xp.full(shape, np.nan, dtype=dtype)


def close(got, ref, dtype, what, factor=1.0):
    """max |got - ref| <= BOUND[dtype] * factor * max |ref| (and finite everywhere)."""
    xp = backend.array_module(ref)
    g = f64(got)
    assert bool(xp.isfinite(g).all()), f"{what}: non-finite output"
    scale = max(float(xp.abs(ref).max()), 1e-30)
    err = float(xp.abs(g - ref).max())
    assert err <= BOUND[dtype] * factor * scale, f"{what} ({dtype}): max err {err:.3g} vs scale {scale:.3g}"


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# -- RMSNorm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("R,D,threads", [(5, 37, None), (7, 19, None), (3, 70, 64)])
def test_rmsnorm_matches_reference(dtype, residual, R, D, threads):
    rng = np.random.default_rng([R, D, residual, DTYPES.index(dtype)])
    x, r, dy, dres = (store(rand(rng, (R, D), 2.0), dtype) for _ in range(4))
    w = store(rand(rng, D), dtype)
    eps = 1e-6
    y, h = poisoned((R, D), dtype), poisoned((R, D), dtype)
    y, h, rstd = rmsnorm_fwd(x, w, eps, residual=r if residual else None, y=y, h=h if residual else None,
                             threads=threads)
    h_ref = f64(x) + f64(r) if residual else f64(x)
    close(h, h_ref, dtype, "h")
    yr, cache = rmsnorm_forward(f64(h), f64(w), eps)            # the norm of h as stored
    close(y, yr, dtype, "y")
    assert np.allclose(rstd, cache[2][:, 0], rtol=1e-5)
    dx = poisoned((R, D), dtype)
    dx, dw = rmsnorm_bwd(dy, h, w, rstd, dres=dres if residual else None, dx=dx, threads=threads)
    dxr, dwr = rmsnorm_backward(f64(dy), cache)
    close(dx, dxr + (f64(dres) if residual else 0.0), dtype, "dx")
    assert dw.dtype == np.float32
    close(dw, dwr, "float32", "dw", factor=4)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("y_dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_apply_is_the_forwards_output(x_dtype, y_dtype, residual):
    """rmsnorm_apply(h, w, rstd) (a backward that makes the norm's output again instead of keeping
    it) writes the forward's y bit for bit, whatever the storage of x and y; odd D, more rows than
    the simulator's grid (the row and column loops stride)."""
    rng = np.random.default_rng([DTYPES.index(x_dtype), DTYPES.index(y_dtype), residual])
    R, D = 7, 77
    x, r = (store(rand(rng, (R, D), 3.0), x_dtype) for _ in range(2))
    w = store(rand(rng, D), x_dtype)
    y, h, rstd = rmsnorm_fwd(x, w, 1e-6, residual=r if residual else None, y=poisoned((R, D), y_dtype))
    again = rmsnorm_apply(h, w, rstd, y=poisoned((R, D), y_dtype))
    np.testing.assert_array_equal(again.view(np.uint8), y.view(np.uint8))
    assert rmsnorm_apply(h, w, rstd).dtype == h.dtype
    with pytest.raises(Q4KError, match="rstd"):
        rmsnorm_apply(h, w, rstd[:-1])


def test_rmsnorm_in_place_and_partials_over_uneven_blocks():
    rng = np.random.default_rng(11)
    x, dy = rand(rng, (9, 33)), rand(rng, (9, 33))
    w = rand(rng, 33)
    yr, cache = rmsnorm_forward(x.astype(np.float64), w.astype(np.float64), 1e-5)
    dxr, dwr = rmsnorm_backward(dy.astype(np.float64), cache)
    x_in = x.copy()
    y, h, rstd = rmsnorm_fwd(x_in, w, 1e-5, y=x_in)              # y over x
    assert y is x_in
    close(y, yr, "float32", "y in place")
    for blocks in (1, 4, 9):                                      # rows per block 9, 3/2, 1
        dx, dw = rmsnorm_bwd(dy.copy(), x, w, rstd, blocks=blocks)
        close(dx, dxr, "float32", f"dx blocks={blocks}")
        close(dw, dwr, "float32", f"dw blocks={blocks}", factor=4)


def test_rmsnorm_errors():
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(Q4KError):
        rmsnorm_fwd(x, np.zeros(7, np.float32), 1e-6)
    with pytest.raises(Q4KError):
        rmsnorm_fwd(x, np.zeros(8, np.float32), 1e-6, residual=np.zeros((3, 7), np.float32))
    with pytest.raises(Q4KError):
        rmsnorm_fwd(x.astype(np.float64), np.zeros(8), 1e-6)           # float64: not a kernel type
    with pytest.raises(Q4KError):
        rmsnorm_fwd(np.zeros((8, 3), np.float32).T, np.zeros(8, np.float32), 1e-6)   # not contiguous


# -- RoPE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("tables", [True, False])
def test_rope_matches_reference(dtype, style, tables):
    rng = np.random.default_rng([DTYPES.index(dtype), tables, len(style)])
    B, T, H, D, base = 2, 5, 3, 10, 10000.0
    positions = np.arange(T) + 7                                  # not 0..T-1: the positions are used
    cos, sin = rope_tables(positions, D, base, np)
    x = store(rand(rng, (B, T, H, D)), dtype)
    kw = dict(cos=cos, sin=sin) if tables else dict(positions=positions, base=base)
    y = rope_apply(x, style, out=poisoned(x.shape, dtype), **kw)
    close(y, rope_forward(f64(x), cos, sin, style), dtype, "rope")
    dy = store(rand(rng, (B, T, H, D)), dtype)
    ref = rope_backward(f64(dy), cos, sin, style)
    dx = rope_apply(dy, style, inverse=True, **kw)                # in place
    assert dx is dy
    close(dx, ref, dtype, "rope backward")


def test_rope_errors():
    x = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(Q4KError):
        rope_apply(x, "gptj", base=1e4)
    with pytest.raises(Q4KError):
        rope_apply(np.zeros((1, 2, 1, 5), np.float32), "neox", base=1e4)
    with pytest.raises(Q4KError):
        rope_apply(x, "neox")                                     # neither tables nor base
    with pytest.raises(Q4KError):
        rope_apply(x, "neox", cos=np.zeros((3, 2)), sin=np.zeros((3, 2)))


# -- GLU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("fused_input", [False, True])
def test_glu_matches_reference(dtype, act, fused_input):
    rng = np.random.default_rng([DTYPES.index(dtype), len(act), fused_input])
    lead, Fd = (3, 5), 7
    gate = rand(rng, lead + (Fd,), 3.0)
    gate[0, 0, :3] = (-40.0, 40.0, 0.0)                           # saturated sigmoid/tanh stay finite
    g, u, dy = store(gate, dtype), store(rand(rng, lead + (Fd,)), dtype), store(rand(rng, lead + (Fd,)), dtype)
    yr, cache = glu_forward(f64(g), f64(u), act)
    dgr, dur = glu_backward(f64(dy), cache)
    if fused_input:
        gu = np.concatenate([g, u], axis=-1)
        y = glu_fwd(gu, None, act, y=poisoned(lead + (Fd,), dtype))
        dgu, none = glu_bwd(dy, gu, None, act, dgate=poisoned(lead + (2 * Fd,), dtype))
        assert none is None
        dg, du = dgu[..., :Fd], dgu[..., Fd:]
    else:
        y = glu_fwd(g, u, act, y=poisoned(lead + (Fd,), dtype))
        dg, du = glu_bwd(dy, g, u, act, dgate=poisoned(lead + (Fd,), dtype), dup=poisoned(lead + (Fd,), dtype))
    close(y, yr, dtype, "glu y")
    close(dg, dgr, dtype, "dgate")
    close(du, dur, dtype, "dup")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_several_grid_steps(act):
    """4 x 9 x 37 = 1332 elements > the simulator grid's 512 per step: several steps, a ragged last."""
    rng = np.random.default_rng(len(act) + 40)
    g, u, dy = (store(rand(rng, (4, 9, 37), 2.0), "bfloat16") for _ in range(3))
    yr, cache = glu_forward(f64(g), f64(u), act)
    dgr, dur = glu_backward(f64(dy), cache)
    close(glu_fwd(g, u, act, y=poisoned((4, 9, 37), "bfloat16")), yr, "bfloat16", "glu y")
    dg, du = glu_bwd(dy, g, u, act)
    close(dg, dgr, "bfloat16", "dgate")
    close(du, dur, "bfloat16", "dup")


def test_glu_backward_in_place_over_fused_input():
    rng = np.random.default_rng(5)
    g, u, dy = rand(rng, (4, 6)), rand(rng, (4, 6)), rand(rng, (4, 6))
    _, cache = glu_forward(g.astype(np.float64), u.astype(np.float64), "silu")
    dgr, dur = glu_backward(dy.astype(np.float64), cache)
    gu = np.concatenate([g, u], axis=-1)
    out, _ = glu_bwd(dy, gu, None, "silu", dgate=gu)
    assert out is gu
    close(gu[:, :6], dgr, "float32", "dgate in place")
    close(gu[:, 6:], dur, "float32", "dup in place")


def test_glu_errors():
    with pytest.raises(Q4KError):
        glu_fwd(np.zeros((2, 3), np.float32), None, "silu")           # odd fused width
    with pytest.raises(Q4KError):
        glu_fwd(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), "silu")
    with pytest.raises(Q4KError):
        glu_fwd(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), "relu")


# -- KD loss -----------------------------------------------------------------------------------
def _kd_inputs(rng, n, V, s_dtype, t_dtype, masks=True):
    s, t = store(rand(rng, (n, V), 3.0), s_dtype), rand(rng, (n, V), 3.0)
    if masks:
        t[1, ::5] = -np.inf                                       # teacher masks: p = 0 terms dropped
    t = store(t, t_dtype)
    targets = rng.integers(0, V, n)
    targets[2] = -1                                               # a row without a next token
    return s, t, targets, rng.random(n), rng.random(n)


KD_CASES = [("kl", 1.0, 0.5), ("kl", 2.0, 0.5), ("rkl", 1.0, 0.5), ("rkl", 0.7, 0.5), ("jsd", 1.0, 0.3),
            ("jsd", 2.0, 0.5), ("jsd", 1.0, 0.0), ("jsd", 1.0, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,T,beta", KD_CASES)
def test_kd_loss_kernel_matches_losses(dtype, kind, T, beta):
    rng = np.random.default_rng([DTYPES.index(dtype), len(kind), int(10 * T), int(10 * beta)])
    n, V = 5, 67
    s, t, targets, kw, cw = _kd_inputs(rng, n, V, dtype, "float32", masks=kind == "kl")
    cfg = LossConfig(kind=kind, temperature=T, beta=beta, alpha=0.5)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), f64(t), targets, kw, cw, cfg)
    kd, ce, ds, lse = kd_loss_rows(s, t, targets, kw, cw, kind, T, beta, ds=poisoned((n, V), dtype))
    close(kd, kd_ref, "float32", "kd rows", factor=10)           # inputs exact: float32 math only
    close(ce, ce_ref, "float32", "ce rows")
    close(ds, ds_ref, dtype, "ds")
    lse_ref = np.log(np.exp(f64(s) / T).sum(axis=-1))
    close(lse, lse_ref, "float32", "lse")


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_kd_loss_rows_longer_than_a_block_step(kind):
    """V = 517 > threads x UNROLL (128 in the simulator): several steps per thread, a ragged last one."""
    rng = np.random.default_rng(len(kind))
    n, V = 3, 517
    s, t, targets, kw, cw = _kd_inputs(rng, n, V, "bfloat16", "float32")
    cfg = LossConfig(kind=kind, temperature=1.3, alpha=0.5)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), f64(t), targets, kw, cw, cfg)
    kd, ce, ds, _ = kd_loss_rows(s, t, targets, kw, cw, kind, 1.3, 0.5, ds=poisoned((n, V), "bfloat16"))
    close(kd, kd_ref, "float32", "kd rows", factor=10)
    close(ce, ce_ref, "float32", "ce rows")
    close(ds, ds_ref, "bfloat16", "ds")


@pytest.mark.parametrize("s_dtype,t_dtype", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "bfloat16")])
def test_kd_loss_mixed_types_in_place(s_dtype, t_dtype):
    rng = np.random.default_rng([DTYPES.index(s_dtype), DTYPES.index(t_dtype)])
    n, V = 4, 45
    s, t, targets, kw, cw = _kd_inputs(rng, n, V, s_dtype, t_dtype)
    cfg = LossConfig(kind="kl", temperature=1.5, alpha=0.25)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), f64(t), targets, kw, cw, cfg)
    kd, ce, ds, _ = kd_loss_rows(s, t, targets, kw, cw, "kl", 1.5, ds=s)
    assert ds is s
    close(kd, kd_ref, "float32", "kd rows", factor=10)
    close(ce, ce_ref, "float32", "ce rows")
    close(ds, ds_ref, s_dtype, "ds in place")


def test_kd_loss_extreme_logits_stay_finite():
    n, V = 3, 40
    s = np.zeros((n, V), np.float32)
    s[0, 3], s[1, :] = 3e4, -3e4                                   # huge margins, a constant row
    s[2, 7] = -np.inf                                             # a student mask the teacher disagrees with
    t = np.zeros((n, V), np.float32)
    t[0, 5] = 2e4
    cfg = LossConfig(kind="kl", alpha=0.5)
    targets, kw, cw = np.array([3, 0, 7]), np.ones(n), np.ones(n)
    kd_ref, ce_ref, ds_ref = chunk_loss(s.astype(np.float64), t.astype(np.float64), targets, kw, cw, cfg)
    kd, ce, ds, _ = kd_loss_rows(s, t, targets, kw, cw, "kl", 1.0)
    assert np.isfinite(ds).all() and np.isfinite(kd).all() and np.isfinite(ce).all()
    assert np.allclose(kd, kd_ref, rtol=1e-5) and np.allclose(ce, ce_ref, rtol=1e-5)
    assert np.allclose(ds, ds_ref, atol=1e-6)


LOSS_CONFIGS = [LossConfig(), LossConfig(kind="rkl", alpha=0.3, temperature=1.5),
                LossConfig(kind="jsd", beta=0.2, alpha=0.5, top_k=7), LossConfig(kind="rkl", top_k=9, temperature=0.8),
                LossConfig(top_k=6, top_k_student="full", alpha=0.4, temperature=2.0),
                LossConfig(kind="kl", alpha=1.0), LossConfig(kind="jsd", beta=0.0, alpha=0.0)]


def _cfg_id(c):
    return f"{c.kind}-T{c.temperature}-a{c.alpha}-k{c.top_k}-{c.top_k_student}"


@pytest.mark.parametrize("cfg", LOSS_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_chunk_loss_matches_chunk_loss(cfg, dtype):
    rng = np.random.default_rng([LOSS_CONFIGS.index(cfg), len(dtype)])
    n, V = 5, 41
    s, t, targets, kw, cw = _kd_inputs(rng, n, V, dtype, dtype, masks=False)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), f64(t), targets, kw, cw, cfg)
    kd, ce, ds = fused_chunk_loss(s, t, targets, kw, cw, cfg, out=s)
    assert ds is s
    close(kd, kd_ref, "float32", "kd rows", factor=10)
    close(ce, ce_ref, "float32", "ce rows")
    close(ds, ds_ref, dtype, "ds", factor=2)                      # top-k: ds rounded twice in bf16


def test_fused_chunk_loss_without_teacher():
    rng = np.random.default_rng(3)
    s, _, targets, kw, cw = _kd_inputs(rng, 4, 30, "float32", "float32")
    cfg = LossConfig(alpha=1.0)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), None, targets, kw, cw, cfg)
    kd, ce, ds = fused_chunk_loss(s, None, targets, kw, cw, cfg)
    assert not kd.any()
    close(ce, ce_ref, "float32", "ce rows")
    close(ds, ds_ref, "float32", "ds")
    with pytest.raises(Q4KError):
        fused_chunk_loss(s, None, targets, kw, cw, LossConfig(alpha=0.5))


def test_kd_loss_target_out_of_range_gives_nan_row_not_a_stray_read():
    rng = np.random.default_rng(9)
    s, t = rand(rng, (3, 20)), rand(rng, (3, 20))
    targets = np.array([4, 20, -1])
    kd, ce, ds, _ = kd_loss_rows(s.copy(), t, targets, np.ones(3), np.ones(3), "kl")
    assert np.isnan(ce[1]) and np.isfinite(ce[[0, 2]]).all() and np.isfinite(ds).all()
    kd_ref, _, ds_ref = chunk_loss(s.astype(np.float64), t.astype(np.float64), np.array([4, -1, -1]), np.ones(3),
                                   np.ones(3), LossConfig(alpha=0.5))
    close(ds, ds_ref, "float32", "ds (row 1 without CE)")


def test_kd_loss_errors():
    s = np.zeros((2, 5), np.float32)
    z = np.zeros(2)
    with pytest.raises(Q4KError):
        kd_loss_rows(s, s, z, z, z, "mse")
    with pytest.raises(Q4KError):
        kd_loss_rows(s, None, z, z, z, "kl")                       # kl needs a teacher
    with pytest.raises(Q4KError):
        kd_loss_rows(s, np.zeros((2, 6), np.float32), z, z, z, "kl")
    with pytest.raises(Q4KError):
        kd_loss_rows(s, s, z, z, z, "kl", temperature=0.0)


# -- the fused linear loss against the unfused chunked path (Student._head_backward) -------------
def unfused_head(h, W, teacher, cfg, w, step):
    """Student._head_backward in float64: -> (dh, dW, kd_sum, ce_sum)."""
    h, W = h.astype(np.float64), W.astype(np.float64)
    dh, dW, kd_sum, ce_sum = np.empty_like(h), np.zeros_like(W), 0.0, 0.0
    for start in range(0, h.shape[0], step):
        sl = slice(start, min(start + step, h.shape[0]))
        t = None if teacher is None else (teacher(sl.start, sl.stop) if callable(teacher) else teacher[sl])
        kd, ce, ds = chunk_loss(h[sl] @ W.T, None if t is None else t.astype(np.float64), w["targets"][sl],
                                w["kd_weight"][sl], w["ce_weight"][sl], cfg)
        dh[sl], dW = ds @ W, dW + ds.T @ h[sl]
        kd_sum += masked_sum(kd, w["kd_mask"][sl])
        ce_sum += masked_sum(ce, w["ce_mask"][sl])
    return dh, dW, kd_sum, ce_sum


@pytest.mark.parametrize("cfg,callable_teacher", [(LossConfig(alpha=0.3), False),
                                                  (LossConfig(kind="jsd", temperature=2.0), True),
                                                  (LossConfig(alpha=1.0), None)])
def test_fused_linear_loss_matches_unfused_chunks(cfg, callable_teacher):
    rng = np.random.default_rng(17)
    B, T, D, V, step = 2, 7, 12, 53, 4                            # 14 tokens in chunks 4, 4, 4, 2
    h, W = rand(rng, (B * T, D)), rand(rng, (V, D), 0.5)
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 5:] = 0                                               # padding
    teacher = rand(rng, (B * T, V), 2.0)
    if callable_teacher is None:
        teacher = None
    elif callable_teacher:
        logits = teacher
        teacher = lambda a, b: logits[a:b]                        # noqa: E731
    w = token_weights(ids, mask, cfg)
    dh_ref, dW_ref, kd_ref, ce_ref = unfused_head(h, W, teacher, cfg, w, step)
    gW = np.full((V, D), 0.25, np.float32)                        # accumulates into what is there
    dh, gW, kd_sum, ce_sum = fused_linear_loss(h, W, teacher, cfg, w, chunk_tokens=step, gW=gW)
    close(dh, dh_ref, "float32", "dh", factor=5)
    close(gW - 0.25, dW_ref, "float32", "dW", factor=5)
    assert math.isclose(kd_sum, kd_ref, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(ce_sum, ce_ref, rel_tol=1e-5, abs_tol=1e-6)
    *_, kd_dev, ce_dev = fused_linear_loss(h, W, teacher, cfg, w, chunk_tokens=step, host_sums=False)
    assert getattr(kd_dev, "ndim", None) == 0 and getattr(ce_dev, "ndim", None) == 0   # arrays: nothing read yet
    assert (float(kd_dev), float(ce_dev)) == (kd_sum, ce_sum)


def test_fused_linear_loss_errors():
    h, W = np.zeros((3, 4), np.float32), np.zeros((5, 4), np.float32)
    w = token_weights(np.zeros((1, 3), np.int64), None, LossConfig())
    with pytest.raises(Q4KError):
        fused_linear_loss(h, np.zeros((5, 3), np.float32), None, LossConfig(alpha=1.0), w)
    with pytest.raises(Q4KError):
        fused_linear_loss(h, W, np.zeros((3, 6), np.float32), LossConfig(), w)   # wrong vocabulary


# -- op-level wrappers: same signatures as ops/*, reference for float64 ---------------------------
def test_fused_ops_swap_in_for_reference_ops():
    rng = np.random.default_rng(23)
    x, r, dy = rand(rng, (2, 3, 16)), rand(rng, (2, 3, 16)), rand(rng, (2, 3, 16))
    w = rand(rng, 16)
    for dt, kind in ((np.float32, "float32"), (np.float64, "float32")):       # float64: the reference path
        y, c = fused_ops.rmsnorm_forward(x.astype(dt), w.astype(dt), 1e-6)
        yr, cr = rmsnorm_forward(x.astype(np.float64), w.astype(np.float64), 1e-6)
        close(y, yr, kind, "rmsnorm op")
        dx, dw = fused_ops.rmsnorm_backward(dy.astype(dt), c)
        dxr, dwr = rmsnorm_backward(dy.astype(np.float64), cr)
        close(dx, dxr, kind, "rmsnorm op dx")
        close(dw, dwr, kind, "rmsnorm op dw", factor=4)
        y, h, c = fused_ops.add_rmsnorm_forward(x.astype(dt), r.astype(dt), w.astype(dt), 1e-6)
        yr, cr = rmsnorm_forward((x + r).astype(np.float64), w.astype(np.float64), 1e-6)
        close(y, yr, kind, "add_rmsnorm op")
        dx, _ = fused_ops.add_rmsnorm_backward(dy.astype(dt), c, dh=r.astype(dt))
        close(dx, rmsnorm_backward(dy.astype(np.float64), cr)[0] + r, kind, "add_rmsnorm op dx")
    q = rand(rng, (1, 4, 2, 8))
    cos, sin = rope_tables(np.arange(4), 8, 1e4, np)
    y = fused_ops.rope_forward(q, cos, sin, "neox")
    assert y is not q
    close(y, rope_forward(q.astype(np.float64), cos, sin, "neox"), "float32", "rope op")
    close(fused_ops.rope_backward(q, cos, sin, "norm"), rope_backward(q.astype(np.float64), cos, sin, "norm"),
          "float32", "rope op backward")
    g, u = rand(rng, (3, 5)), rand(rng, (3, 5))
    y, c = fused_ops.glu_forward(g, u, "gelu_tanh")
    yr, cr = glu_forward(g.astype(np.float64), u.astype(np.float64), "gelu_tanh")
    close(y, yr, "float32", "glu op")
    d = dy[0, :, :5].copy()
    for got, ref in zip(fused_ops.glu_backward(d, c), glu_backward(d.astype(np.float64), cr)):
        close(got, ref, "float32", "glu op backward")


# -- GPU, real sizes ---------------------------------------------------------------------------
def _cp():
    import cupy as cp
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_rmsnorm_4096x896(dtype):
    cp = _cp()
    rng = np.random.default_rng(1)
    x, r, dy, dres = (cp.asarray(store(rand(rng, (4096, 896), 2.0), dtype)) for _ in range(4))
    w = cp.asarray(store(rand(rng, 896), dtype))
    y, h, rstd = rmsnorm_fwd(x, w, 1e-6, residual=r, y=poisoned((4096, 896), dtype, cp))
    close(h, f64(x) + f64(r), dtype, "h")
    yr, cache = rmsnorm_forward(f64(h), f64(w), 1e-6)
    close(y, yr, dtype, "y")
    dx, dw = rmsnorm_bwd(dy, h, w, rstd, dres=dres, dx=poisoned((4096, 896), dtype, cp))
    dxr, dwr = rmsnorm_backward(f64(dy), cache)
    close(dx, dxr + f64(dres), dtype, "dx")
    close(dw, dwr, "float32", "dw", factor=20)                    # 4096-row float32 sums
    dx2, dw2 = rmsnorm_bwd(dy, h, w, rstd, dres=dres)
    assert bool((dw2 == dw).all()) and bool((dx2 == dx).all()), "backward is not deterministic"
    again = rmsnorm_apply(h, w, rstd, y=poisoned((4096, 896), dtype, cp))
    assert bool((again.view(cp.uint8) == y.view(cp.uint8)).all()), "rmsnorm_apply is not the forward's y"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["norm", "neox"])
def test_gpu_rope_8x512x14x64(dtype, style):
    cp = _cp()
    rng = np.random.default_rng(2)
    x = cp.asarray(store(rand(rng, (8, 512, 14, 64)), dtype))
    cos, sin = rope_tables(cp.arange(512), 64, 1e6, cp)
    ref = rope_forward(f64(x), cos, sin, style)
    close(rope_apply(x.copy(), style, cos=cos, sin=sin), ref, dtype, "rope tables")
    close(rope_apply(x.copy(), style, base=1e6), ref, dtype, "rope on the fly")
    ref_bwd = rope_backward(f64(x), cos, sin, style)         # before the in-place call below rotates x
    close(rope_apply(x, style, base=1e6, inverse=True), ref_bwd, dtype, "rope bwd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gpu_glu_4096x4864(dtype, act):
    cp = _cp()
    rng = np.random.default_rng(3)
    gu = cp.asarray(store(rand(rng, (4096, 2 * 4864), 2.0), dtype))
    dy = cp.asarray(store(rand(rng, (4096, 4864)), dtype))
    g, u = f64(gu[:, :4864]), f64(gu[:, 4864:])
    yr, cache = glu_forward(g, u, act)
    dgr, dur = glu_backward(f64(dy), cache)
    close(glu_fwd(gu, None, act), yr, dtype, "glu y")
    dgu, _ = glu_bwd(dy, gu, None, act)
    close(dgu[:, :4864], dgr, dtype, "dgate")
    close(dgu[:, 4864:], dur, dtype, "dup")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind,T,beta", [("kl", 1.0, 0.5), ("rkl", 2.0, 0.5), ("jsd", 1.0, 0.5)])
def test_gpu_kd_loss_256x151936(dtype, kind, T, beta):
    """kd/ce rows to 1e-4 relative (the kernel reads the same rounded logits as the reference);
    ds to 2e-5 (float32) / 1e-2 (bfloat16, the rounding of ds itself) of max |ds|."""
    cp = _cp()
    rng = np.random.default_rng(4)
    n, V = 256, 151936
    s = cp.asarray(store(rand(rng, (n, V), 4.0), dtype))
    t = cp.asarray(store(rand(rng, (n, V), 4.0), dtype))
    targets = cp.asarray(rng.integers(-1, V, n))
    kw, cw = cp.full(n, 1.0 / n), cp.full(n, 0.5 / n)
    cfg = LossConfig(kind=kind, temperature=T, beta=beta, alpha=0.5)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), f64(t), targets, kw, cw, cfg)
    kd, ce, ds, _ = kd_loss_rows(s, t, targets, kw, cw, kind, T, beta, ds=s)
    close(kd, kd_ref, "float32", "kd rows", factor=5)
    close(ce, ce_ref, "float32", "ce rows", factor=5)
    close(ds, ds_ref, dtype, "ds")


@pytest.mark.gpu
def test_gpu_fused_linear_loss_matches_unfused():
    """N = 1024 tokens, D = 896, V = 151936, float32: loss, dh and dW against the unfused chunked
    path of the Student (float32 CuPy ops), bounds 1e-4 of max |ref|."""
    cp = _cp()
    from q4kdistill.student.ops.linear import linear_backward, linear_forward

    rng = np.random.default_rng(5)
    N, D, V, step = 1024, 896, 151936, 256
    h, W = cp.asarray(rand(rng, (N, D))), cp.asarray(rand(rng, (V, D), 0.05))
    teacher = cp.asarray(rand(rng, (N, V), 3.0))
    ids = cp.asarray(rng.integers(0, V, (4, N // 4)))
    cfg = LossConfig(alpha=0.2, temperature=1.5)
    w = token_weights(ids, None, cfg)
    dh_ref, dW_ref, kd_ref, ce_ref = cp.empty_like(h), cp.zeros_like(W), 0.0, 0.0
    for start in range(0, N, step):
        sl = slice(start, start + step)
        s, cache = linear_forward(h[sl], W)
        kd, ce, ds = chunk_loss(s, teacher[sl], w["targets"][sl], w["kd_weight"][sl], w["ce_weight"][sl], cfg)
        dh_ref[sl], dW, _ = linear_backward(ds, cache)
        dW_ref += dW
        kd_ref += masked_sum(kd, w["kd_mask"][sl])
        ce_ref += masked_sum(ce, w["ce_mask"][sl])
    dh, gW, kd_sum, ce_sum = fused_linear_loss(h, W, teacher, cfg, w, chunk_tokens=step)
    for got, ref, what in ((dh, dh_ref, "dh"), (gW, dW_ref, "dW")):
        err = float(cp.abs(got - ref).max()) / float(cp.abs(ref).max())
        assert err < 1e-4, f"{what}: {err:.3g}"
    assert math.isclose(kd_sum, kd_ref, rel_tol=1e-4) and math.isclose(ce_sum, ce_ref, rel_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [LossConfig(kind="jsd", top_k=64, alpha=0.5),
                                 LossConfig(top_k=64, top_k_student="full", temperature=2.0)], ids=["restricted-jsd", "full-kl"])
def test_gpu_top_k_chunk_loss_64x151936(cfg):
    cp = _cp()
    rng = np.random.default_rng(6)
    n, V = 64, 151936
    s, t = cp.asarray(rand(rng, (n, V), 4.0)), cp.asarray(rand(rng, (n, V), 4.0))
    targets = cp.asarray(rng.integers(0, V, n))
    kw, cw = cp.full(n, 1.0 / n), cp.full(n, 0.5 / n)
    kd_ref, ce_ref, ds_ref = chunk_loss(f64(s), f64(t), targets, kw, cw, cfg)
    kd, ce, ds = fused_chunk_loss(s, t, targets, kw, cw, cfg, out=s)
    close(kd, kd_ref, "float32", "kd rows", factor=5)
    close(ce, ce_ref, "float32", "ce rows", factor=5)
    close(ds, ds_ref, "float32", "ds", factor=5)


@pytest.mark.gpu
def test_gpu_fused_linear_loss_bf16_within_bounds_of_fp32():
    """bfloat16 h and W (CuPy bfloat16 arrays, cuBLAS products) against the float32 fused path:
    loss sums within 1 %, dh and dW within 3 % of their max |value| (bf16 products over D = 896
    and over 1024 tokens, rounded to bf16). Skips where CuPy has no bfloat16 arrays."""
    cp = _cp()
    try:
        import ml_dtypes

        bf16 = np.dtype(ml_dtypes.bfloat16)
        cp.ones(2, dtype=cp.float32).astype(bf16) @ cp.zeros((2, 2), dtype=bf16)
    except Exception as e:                                        # noqa: BLE001  (any failure: no bf16 here)
        pytest.skip(f"CuPy bfloat16 matmul unavailable: {e}")
    rng = np.random.default_rng(7)
    N, D, V, step = 1024, 896, 151936, 256
    h, W = cp.asarray(rand(rng, (N, D))), cp.asarray(rand(rng, (V, D), 0.05))
    teacher = cp.asarray(rand(rng, (N, V), 3.0)).astype(bf16)
    cfg = LossConfig(alpha=0.2)
    w = token_weights(cp.asarray(rng.integers(0, V, (2, N // 2))), None, cfg)
    ref = fused_linear_loss(h, W, teacher, cfg, w, chunk_tokens=step)
    got = fused_linear_loss(h.astype(bf16), W.astype(bf16), teacher, cfg, w, chunk_tokens=step)
    for g, r, what in ((got[0], ref[0], "dh"), (got[1], ref[1], "dW")):
        err = float(cp.abs(g.astype(cp.float32) - r).max()) / float(cp.abs(r).max())
        assert err < 3e-2, f"{what}: {err:.3g}"
    assert math.isclose(got[2], ref[2], rel_tol=1e-2) and math.isclose(got[3], ref[3], rel_tol=1e-2)


def test_numpy_arrays_take_the_reference_ops_unless_asked(monkeypatch):
    """Off the GPU the wrappers must not run the kernels (the simulator is thousands of times slower):
    NumPy arrays get the reference ops' exact results and caches."""
    from q4kdistill.student.ops import rmsnorm as ref_rmsnorm

    monkeypatch.setattr(fused_ops, "ON_HOST", False)
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((5, 24)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    y, cache = fused_ops.rmsnorm_forward(x, w, 1e-6)
    y_ref, _ = ref_rmsnorm.rmsnorm_forward(x, w, 1e-6)
    assert not isinstance(cache, fused_ops.NormCache) and np.array_equal(y, y_ref)
    monkeypatch.setattr(fused_ops, "ON_HOST", True)
    assert isinstance(fused_ops.rmsnorm_forward(x, w, 1e-6)[1], fused_ops.NormCache)


# -- inside the real Student: tests/test_student_fused.py runs the student wired to these kernels
# (ON_HOST) against its reference ops, counting that every kernel is reached


@pytest.mark.gpu
def test_gpu_fused_ops_keep_cupy_bfloat16():
    """A CuPy bfloat16 activation stays bfloat16 through every fused op (what the bf16 student feeds
    them), values within the bf16 bound of the float64 reference. Skips without CuPy bfloat16."""
    cp = _cp()
    try:
        import ml_dtypes

        bf16 = np.dtype(ml_dtypes.bfloat16)
        cp.ones(2, dtype=cp.float32).astype(bf16)
    except Exception as e:                                        # noqa: BLE001  (any failure: no bf16 here)
        pytest.skip(f"CuPy bfloat16 arrays unavailable: {e}")
    rng = np.random.default_rng(8)
    x, r, dy = (cp.asarray(rand(rng, (4, 128, 896))).astype(bf16) for _ in range(3))
    w = cp.asarray(rand(rng, 896))
    y, h, cache = fused_ops.add_rmsnorm_forward(x, r, w, 1e-6)
    assert y.dtype == bf16 and h.dtype == bf16
    yr, cr = rmsnorm_forward(f64(h), f64(w), 1e-6)
    close(y, yr, "bfloat16", "add_rmsnorm y")
    dx, dw = fused_ops.add_rmsnorm_backward(dy, cache, dh=r)
    assert dx.dtype == bf16 and dw.dtype == np.float32
    close(dx, rmsnorm_backward(f64(dy), cr)[0] + f64(r), "bfloat16", "add_rmsnorm dx")
    q = cp.asarray(rand(rng, (4, 128, 14, 64))).astype(bf16)
    cos, sin = rope_tables(cp.arange(128), 64, 1e6, cp)
    yq = fused_ops.rope_forward(q, cos, sin, "neox")
    assert yq.dtype == bf16
    close(yq, rope_forward(f64(q), cos, sin, "neox"), "bfloat16", "rope")
    gu = cp.asarray(rand(rng, (4, 128, 2 * 4864))).astype(bf16)
    m, c = fused_ops.glu_forward(gu, None, "silu")
    assert m.dtype == bf16
    close(m, glu_forward(f64(gu[..., :4864]), f64(gu[..., 4864:]), "silu")[0], "bfloat16", "glu")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 24), (3, 7)])
def test_glu_forward_vector_kernel_is_the_scalar_kernel_bit_for_bit(act, shape, monkeypatch):
    """float32 gate/up -> float16 y through 16-byte loads and stores (8 elements a thread) gives the
    scalar kernel's y exactly; sizes not a multiple of 8 go to the scalar kernel."""
    import kernels.fused_glu as fg

    rng = np.random.default_rng([len(act), *shape])
    gate, up = rand(rng, shape, 3.0), rand(rng, shape, 2.0)
    assert fg._vector_forward(gate, up, np.empty(shape, np.float16)) == (np.prod(shape) % 8 == 0)
    vec = glu_fwd(gate, up, act, y=poisoned(shape, "float16"))
    monkeypatch.setattr(fg, "VECTOR", False)
    scalar = glu_fwd(gate, up, act, y=poisoned(shape, "float16"))
    np.testing.assert_array_equal(vec.view(np.uint16), scalar.view(np.uint16))
    close(vec, glu_forward(f64(gate), f64(up), act)[0], "float16", "glu vector")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", [(3, 40), (2, 2, 136), (2, 6)])
def test_rmsnorm_forward_vector_kernel(residual, shape, monkeypatch):
    """float32 x (+ float32 residual, h = x in place) -> float16 y through 16-byte accesses: h exactly
    the scalar kernel's, y within one fp16 rounding of it (the sum of squares runs in another order),
    both against the float64 reference; D not a multiple of 4 goes to the scalar kernel."""
    import kernels.fused_rmsnorm as fr

    rng = np.random.default_rng([residual, *shape])
    x0, res, w = rand(rng, shape, 2.0), rand(rng, shape), rand(rng, shape[-1:], 1.5)
    y16 = poisoned(shape, "float16")
    assert fr._vector_forward(x0, w, res if residual else None, y16, x0) == (shape[-1] % 4 == 0)
    outs = {}
    for vector in (True, False):
        monkeypatch.setattr(fr, "VECTOR", vector)
        x = x0.copy()
        y, h, rstd = rmsnorm_fwd(x, w, 1e-6, residual=res if residual else None, y=poisoned(shape, "float16"),
                                 h=x if residual else None)
        outs[vector] = (y, h.copy(), rstd)
    np.testing.assert_array_equal(outs[True][1], outs[False][1])
    np.testing.assert_allclose(outs[True][2], outs[False][2], rtol=1e-6)
    np.testing.assert_allclose(outs[True][0].astype(np.float32), outs[False][0].astype(np.float32), rtol=1e-3, atol=1e-3)
    hx = f64(x0) + (f64(res) if residual else 0)
    ref, _ = rmsnorm_forward(hx, f64(w), 1e-6)
    close(outs[True][0], ref, "float16", "rmsnorm vector")


def test_fused_linear_loss_writes_ds_over_the_teacher_span_and_adds_gW_once_a_span(monkeypatch):
    """With a Teacher.logits_fn SpanLogits (16-bit spans) the loss writes ds over the span's rows and
    gW gets one product a span instead of one a chunk: the same dh, gW and sums as the chunk-by-chunk
    loop on copies of the same logits (fp16 products: fp16-level tolerance), every row counted once."""
    from q4kdistill.student.ops import fused_linear_loss as fll
    from q4kdistill.student.losses import token_weights
    from q4kdistill.teacher.forward import Weight
    from q4kdistill.teacher.model import SpanLogits
    from gguf import GGMLQuantizationType as QT

    rng = np.random.default_rng(5)
    N, D, V, chunk, span = 24, 16, 40, 8, 16
    h = (rng.standard_normal((N, D)) * 0.5).astype(np.float16)
    W = (rng.standard_normal((V, D)) * 0.5).astype(np.float16)
    ht = rng.standard_normal((N, D)).astype(np.float32)
    head = Weight(rng.standard_normal((V, D)).astype(np.float32), QT.F32, (V, D))
    full = (ht @ head.data.T).astype(np.float16)
    w = token_weights(rng.integers(0, V, (4, N // 4)), None, LossConfig(alpha=0.5))
    calls = []
    real = fll.add_outer
    monkeypatch.setattr(fll, "add_outer", lambda g, ds, hc: calls.append(hc.shape[0]) or real(g, ds, hc))
    got = fused_linear_loss(h, W, SpanLogits(ht, head, span, np.float16), LossConfig(alpha=0.5), w, chunk)
    assert calls == [16, 8]
    calls.clear()
    want = fused_linear_loss(h, W, lambda a, b: full[a:b].copy(), LossConfig(alpha=0.5), w, chunk)
    assert calls == [8] * 3
    for g, r in zip(got[:2], want[:2]):
        np.testing.assert_allclose(g.astype(np.float32), r.astype(np.float32), rtol=0,
                                   atol=1e-2 * float(np.abs(r.astype(np.float32)).max()))
    assert got[2] == pytest.approx(want[2], rel=1e-6) and got[3] == pytest.approx(want[3], rel=1e-6)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_forward_vector_kernel_on_float16_inputs(act, monkeypatch):
    """float16 gate/up (the GEMMs' opt-in 16-bit outputs) through the 16-byte kernel: the scalar
    kernel's y bit for bit, and the float64 reference on the values stored."""
    import kernels.fused_glu as fg

    rng = np.random.default_rng([len(act), 16])
    gate, up = rand(rng, (3, 24), 3.0).astype(np.float16), rand(rng, (3, 24), 2.0).astype(np.float16)
    assert fg._vector_forward(gate, up, np.empty((3, 24), np.float16))
    vec = glu_fwd(gate, up, act, y=poisoned((3, 24), "float16"))
    monkeypatch.setattr(fg, "VECTOR", False)
    scalar = glu_fwd(gate, up, act, y=poisoned((3, 24), "float16"))
    np.testing.assert_array_equal(vec.view(np.uint16), scalar.view(np.uint16))
    close(vec, glu_forward(f64(gate), f64(up), act)[0], "float16", "glu vector fp16")
