"""AdamW against a step computed by hand; the schedule; state round trip."""
import math

import numpy as np
import pytest

from q4kdistill.errors import Q4KError
from q4kdistill.student.optim import AdamW, OptimConfig, lr_at
from q4kdistill.student.params import FlatBuffer

SHAPES = {"w": (3, 4), "norm.weight": (5,), "u": (2, 3), "bias": (3,)}


def buffers(rng, xp=np):
    p = FlatBuffer(SHAPES, xp, np.float32)
    g = p.zeros_like()
    p.flat[...] = xp.asarray(rng.standard_normal(p.size).astype(np.float32))
    g.flat[...] = xp.asarray(rng.standard_normal(p.size).astype(np.float32) * 3)
    return p, g


def test_layout_puts_matrices_first():
    p = FlatBuffer(SHAPES, np, np.float32)
    assert p.decay_stop == 12 + 6 and p.size == 12 + 5 + 6 + 3
    assert list(p.views) == list(SHAPES)                      # names keep their order
    p.views["u"][...] = 7
    assert np.all(p.flat[12:18] == 7)                         # views share the flat buffer


def test_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.55)               # half way down the cosine
    assert lr_at(14, cfg) == lr_at(100, cfg) == 0.1
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(4, 20))


def hand_step(p, g, m, v, t, lr, cfg, decay):
    """float64 AdamW step, written out from the paper (Loshchilov & Hutter) for one element set."""
    norm = math.sqrt(sum(float(x) ** 2 for x in g))
    scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
    out = []
    for i in range(len(p)):
        gi = float(g[i]) * scale
        m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * gi
        v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * gi * gi
        mhat, vhat = m[i] / (1 - cfg.beta1 ** t), v[i] / (1 - cfg.beta2 ** t)
        wd = cfg.weight_decay if decay[i] else 0.0
        out.append(float(p[i]) - lr * (mhat / (math.sqrt(vhat) + cfg.eps) + wd * float(p[i])))
    return np.array(out)


def test_steps_equal_hand_computed():
    rng = np.random.default_rng(11)
    p, g = buffers(rng)
    cfg = OptimConfig(lr=0.1, min_lr=0.01, warmup_steps=1, total_steps=5, weight_decay=0.3, grad_clip=2.0)
    opt = AdamW(p, g, cfg)
    decay = np.arange(p.size) < 12 + 6                        # flat order: w, u | norm.weight, bias
    ref_p, m, v = p.flat.astype(np.float64), np.zeros(p.size), np.zeros(p.size)
    for t in (1, 2):
        info = opt.step()
        ref_p = hand_step(ref_p, g.flat.copy(), m, v, t, lr_at(t - 1, cfg), cfg, decay)
        assert info["clip_scale"] < 1                          # the clip is exercised
        assert np.allclose(p.flat, ref_p, rtol=2e-6, atol=1e-7)
        g.flat[...] = rng.standard_normal(p.size).astype(np.float32)
    assert opt.m.dtype == opt.v.dtype == np.float32


def test_state_round_trip_is_exact():
    rng = np.random.default_rng(3)
    p, g = buffers(rng)
    opt = AdamW(p, g, OptimConfig(warmup_steps=2, total_steps=10))
    for _ in range(3):
        opt.step()
    state = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state_dict().items()}
    p2 = FlatBuffer(SHAPES, np, np.float32)
    p2.flat[...] = p.flat
    opt2 = AdamW(p2, g, OptimConfig(lr=123.0))
    opt2.load_state_dict(state)
    assert opt2.cfg == opt.cfg and opt2.steps == 3
    opt.step()
    opt2.step()
    assert np.array_equal(p.flat, p2.flat)
    with pytest.raises(Q4KError):
        AdamW(FlatBuffer({"x": (2, 2)}, np, np.float32), FlatBuffer({"x": (2, 2)}, np, np.float32)).load_state_dict(state)


@pytest.mark.gpu
def test_fused_cupy_step_matches_numpy():
    import cupy

    rng = np.random.default_rng(4)
    p, g = buffers(rng)
    pc, gc = FlatBuffer(SHAPES, cupy, np.float32), FlatBuffer(SHAPES, cupy, np.float32)
    pc.flat[...] = cupy.asarray(p.flat)
    gc.flat[...] = cupy.asarray(g.flat)
    cfg = OptimConfig(lr=0.05, warmup_steps=0, total_steps=3, weight_decay=0.2)
    a, b = AdamW(p, g, cfg), AdamW(pc, gc, cfg)
    for _ in range(3):
        a.step()
        b.step()
    assert np.allclose(cupy.asnumpy(pc.flat), p.flat, rtol=1e-5, atol=1e-6)
    assert np.allclose(cupy.asnumpy(b.v), a.v, rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
def test_gpu_grad_norm_is_one_float64_pass():
    """AdamW.grad_norm on CuPy: one float64 reduction over the flat grads (no copy of them), against
    NumPy's float64 norm: large, odd-sized, with values of very different sizes."""
    import cupy

    from q4kdistill.memory import meter

    rng = np.random.default_rng(9)
    shapes = {"w": (4097, 8195), "b": (7,)}                   # 33.6 M odd-sized: a matrix and a vector
    n = 4097 * 8195 + 7
    host = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)
    p, g = FlatBuffer(shapes, cupy, np.float32), FlatBuffer(shapes, cupy, np.float32)
    g.flat[...] = cupy.asarray(host)
    opt = AdamW(p, g, OptimConfig())
    want = float(np.linalg.norm(host.astype(np.float64)))
    counter = meter.install()
    before = counter.current()
    assert opt.grad_norm() == pytest.approx(want, rel=1e-12)
    assert counter.current() - before < (1 << 20)          # no params-sized array left behind
    g.flat[...] = 0
    assert opt.grad_norm() == 0.0


def test_host_update_in_slices_is_bit_identical(monkeypatch):
    """The NumPy update runs over slices of _HOST_SLICE elements: the same arithmetic element by
    element, so slicing at 7 (slices that cut the decay boundary) changes no bit against one slice."""
    from q4kdistill.student import optim

    runs = []
    for size in (7, 1 << 30):
        monkeypatch.setattr(optim, "_HOST_SLICE", size)
        rng = np.random.default_rng(5)
        p, g = buffers(rng)
        opt = AdamW(p, g, OptimConfig(lr=0.1, warmup_steps=1, total_steps=5, weight_decay=0.3, grad_clip=2.0))
        for _ in range(3):
            g.flat[...] = rng.standard_normal(g.size).astype(np.float32)
            opt.step()
        runs.append((p.flat.copy(), opt.m.copy(), opt.v.copy()))
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_step_with_the_callers_norm_is_the_same_step():
    """distill reads grad_norm() first (to skip non-finite steps) and hands it to step(): the same update."""
    rng = np.random.default_rng(6)
    (p1, g1), (p2, g2) = buffers(rng), buffers(np.random.default_rng(6))
    cfg = OptimConfig(lr=0.05, warmup_steps=0, total_steps=3, weight_decay=0.2, grad_clip=0.5)
    a, b = AdamW(p1, g1, cfg), AdamW(p2, g2, cfg)
    for _ in range(2):
        assert a.step() == b.step(b.grad_norm())
    np.testing.assert_array_equal(p1.flat, p2.flat)
