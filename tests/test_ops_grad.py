"""Every op: forward against a direct formula, backward against central differences (float64)."""
import math
import zlib

import numpy as np
import pytest

from q4kdistill.student.ops import (attention_backward, attention_forward, embedding_backward, embedding_forward,
                            glu_backward, glu_forward, linear_backward, linear_forward, rmsnorm_backward,
                            rmsnorm_forward, rope_backward, rope_forward, rope_tables)
from q4kdistill.student.ops.gradcheck import numeric_grad, rel_error

TOL = 1e-6


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def check(f_loss, analytic, *inputs):
    """Compare each analytic gradient with central differences of the scalar f_loss()."""
    for x, g in zip(inputs, analytic):
        assert np.all(np.isfinite(g))
        assert rel_error(g, numeric_grad(f_loss, x)) <= TOL


def test_rmsnorm(rng):
    x, w = rng.standard_normal((2, 3, 7)), rng.standard_normal(7)
    y, cache = rmsnorm_forward(x, w, 1e-5)
    assert np.allclose(y, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-14)
    r = rng.standard_normal(y.shape)
    check(lambda: (rmsnorm_forward(x, w, 1e-5)[0] * r).sum(), rmsnorm_backward(r, cache), x, w)


@pytest.mark.parametrize("style", ["norm", "neox"])
def test_rope(rng, style):
    B, T, H, D = 2, 5, 3, 8
    x = rng.standard_normal((B, T, H, D))
    cos, sin = rope_tables(np.arange(T), D, 100.0, np)
    y = rope_forward(x, cos, sin, style)
    # direct formula on one pair: position 3, pair 1
    i0, i1 = (2, 3) if style == "norm" else (1, 1 + D // 2)
    th = 3 * 100.0 ** (-2 * 1 / D)
    assert np.allclose(y[:, 3, :, i0], x[:, 3, :, i0] * math.cos(th) - x[:, 3, :, i1] * math.sin(th))
    assert np.allclose(y[:, 3, :, i1], x[:, 3, :, i0] * math.sin(th) + x[:, 3, :, i1] * math.cos(th))
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))  # a rotation
    r = rng.standard_normal(y.shape)
    check(lambda: (rope_forward(x, cos, sin, style) * r).sum(), [rope_backward(r, cos, sin, style)], x)
    assert rope_forward(x.astype(np.float32), cos, sin, style).dtype == np.float32


def attention_reference(q, k, v, mask, window, scale):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    o = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(i + 1) if (window is None or i - j < window) and (mask is None or mask[b, j])]
                if js:
                    s = np.array([q[b, i, h] @ k[b, j, h // G] * scale for j in js])
                    p = np.exp(s - s.max())
                    o[b, i, h] = (p / p.sum()) @ v[b, js, h // G]
    return o


@pytest.mark.parametrize("H,KV,window,padded", [(4, 2, None, True), (3, 3, 3, True), (6, 2, 2, False), (2, 1, None, False)])
def test_attention(rng, H, KV, window, padded):
    B, T, D = 2, 5, 3
    q, k, v = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, T, KV, D)), rng.standard_normal((B, T, KV, D))
    mask = None
    if padded:  # row 0 right-padded, row 1 left-padded (its first query sees nothing)
        mask = np.ones((B, T), bool)
        mask[0, 4:] = False
        mask[1, :2] = False
    o, cache = attention_forward(q, k, v, mask, window, 0.7)
    assert np.abs(o - attention_reference(q, k, v, mask, window, 0.7)).max() < 1e-13
    r = rng.standard_normal(o.shape)
    f = lambda: (attention_forward(q, k, v, mask, window, 0.7)[0] * r).sum()  # noqa: E731
    check(f, attention_backward(r, cache), q, k, v)


def test_attention_fully_masked_row_and_huge_scores(rng):
    B, T, H, D = 1, 4, 2, 3
    q = rng.standard_normal((B, T, H, D)) * 1e3
    k = rng.standard_normal((B, T, 1, D)) * 1e3
    v = rng.standard_normal((B, T, 1, D))
    mask = np.array([[False, False, True, True]])
    o, cache = attention_forward(q, k, v, mask, None, 1.0)
    grads = attention_backward(np.ones_like(o), cache)
    assert np.all(np.isfinite(o)) and all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(o[0, :2] == 0)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu(rng, act):
    gate, up = rng.standard_normal((3, 11)) * 3, rng.standard_normal((3, 11))
    y, cache = glu_forward(gate, up, act)
    if act == "silu":
        ref = gate / (1 + np.exp(-gate)) * up
    else:
        ref = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3))) * up
    assert np.allclose(y, ref, rtol=1e-13, atol=1e-15)
    r = rng.standard_normal(y.shape)
    check(lambda: (glu_forward(gate, up, act)[0] * r).sum(), glu_backward(r, cache), gate, up)
    big = np.array([-1e4, -80.0, 80.0, 1e4])
    with np.errstate(all="raise"):
        assert np.all(np.isfinite(glu_backward(np.ones(4), glu_forward(big, np.ones(4), act)[1])[0]))


@pytest.mark.parametrize("bias", [True, False])
def test_linear(rng, bias):
    x, w = rng.standard_normal((2, 3, 5)), rng.standard_normal((7, 5))
    b = rng.standard_normal(7) if bias else None
    y, cache = linear_forward(x, w, b)
    assert np.allclose(y, np.einsum("btk,nk->btn", x, w) + (b if bias else 0))
    r = rng.standard_normal(y.shape)
    dx, dw, db = linear_backward(r, cache)
    f = lambda: (linear_forward(x, w, b)[0] * r).sum()  # noqa: E731
    check(f, [dx, dw] + ([db] if bias else []), *([x, w] + ([b] if bias else [])))
    assert (db is None) == (not bias)


def test_embedding(rng):
    table = rng.standard_normal((6, 4))
    ids = np.array([[1, 3, 1], [5, 1, 0]])            # repeated ids must add up
    y, cache = embedding_forward(ids, table)
    assert np.array_equal(y, table[ids])
    r = rng.standard_normal(y.shape)
    d = embedding_backward(r, cache)
    check(lambda: (embedding_forward(ids, table)[0] * r).sum(), [d], table)
    acc = np.full((6, 4), 2.0)                        # out= accumulates (parameter-grad convention)
    assert np.allclose(embedding_backward(r, cache, out=acc), d + 2.0)


@pytest.mark.parametrize("op", ["rmsnorm", "attention", "glu", "linear", "embedding"])
def test_float32_stays_float32(rng, op):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if op == "rmsnorm":
        y, c = rmsnorm_forward(f(2, 5), f(5), np.float64(1e-6))
        grads = rmsnorm_backward(f(2, 5), c)
    elif op == "attention":
        y, c = attention_forward(f(1, 3, 2, 4), f(1, 3, 1, 4), f(1, 3, 1, 4), None, None, np.float64(0.5))
        grads = attention_backward(f(1, 3, 2, 4), c)
    elif op == "glu":
        y, c = glu_forward(f(3, 4), f(3, 4), "gelu_tanh")
        grads = glu_backward(f(3, 4), c)
    elif op == "linear":
        y, c = linear_forward(f(3, 4), f(2, 4), f(2))
        grads = linear_backward(f(3, 2), c)
    else:
        y, c = embedding_forward(np.array([[0, 2]]), f(3, 4))
        grads = [embedding_backward(f(1, 2, 4), c)]
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
