"""kernels/decode_ahead.py (stacked products, a tall weight decoded ahead of its GEMMs) and its companion
epilogue kernels.fused_rope.qkv_rope_split, against float64 references.

CPU (CI): NumPy loops (matmul_ahead's slab ring in order, matmul_stacked's per-weight fallback) and the
epilogue kernel under the simulator; odd shapes, outputs poisoned with NaN. GPU (-m gpu): the linked
decode + cuBLAS forms at the 7B's sizes (the LM head through the ring, q/k/v stacked), eager and under a
CUDA graph capture, and the teacher's forward with and without the fused q/k/v path.
"""
import numpy as np
import pytest

import kernels
from kernels import decode_ahead
from kernels.fused_rope import qkv_rope_split
from q4kdistill.errors import Q4KError
from q4kdistill.formats import quants
from q4kdistill.student.ops.rope import rope_forward, rope_tables
from test_fused_kernels import close, poisoned


def decoded(w, q, n):
    """W [n, K] as float64, from the NumPy decoder."""
    return kernels.dequantize_to(w, q, n, np.float32).astype(np.float64)


def fp16_ref(x, W):
    """The product decode + cuBLAS computes: fp16 operands, exact-ish accumulation."""
    return x.astype(np.float16).astype(np.float64) @ W.astype(np.float16).astype(np.float64).T


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("qtype,n,slab,slots", [("Q4_K", 100, 32, 2), ("Q6_K", 83, 16, 3), ("Q6_K", 48, 64, 4),
                                                ("Q8_0", 37, 16, 1)])
def test_matmul_ahead_matches_the_product(qtype, n, slab, slots, out_dtype):
    rng = np.random.default_rng([n, slab, slots])
    K = 512
    w = quants.random_blocks(qtype, n, K, rng)
    x = rng.standard_normal((7, K)).astype(np.float32)
    wide = poisoned((7, n + 9), out_dtype)
    out = wide[:, 5:5 + n]                                   # a column block of a wider matrix
    got = decode_ahead.matmul_ahead(x, w, qtype, n, out, slab_rows=slab, slots=slots)
    assert got is out
    ref = fp16_ref(x, decoded(w, qtype, n))
    tol = 1e-5 if out_dtype == "float32" else 1e-3
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=0, atol=tol * np.abs(ref).max())
    assert np.isnan(wide[:, :5]).all() and np.isnan(wide[:, 5 + n:]).all()   # nothing outside its columns


def test_matmul_ahead_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    w = quants.random_blocks("Q4_K", 16, 256, rng)
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(Q4KError, match="multiple of 16"):
        decode_ahead.matmul_ahead(x, w, "Q4_K", 16, np.zeros((2, 16), np.float32), slab_rows=8)
    with pytest.raises(Q4KError, match="float32 or float16"):
        decode_ahead.matmul_ahead(x, w, "Q4_K", 16, np.zeros((2, 16), np.float64))
    with pytest.raises(Q4KError, match="x must be"):
        decode_ahead.matmul_ahead(x[:, :255], w, "Q4_K", 16, np.zeros((2, 16), np.float32))


def test_matmul_stacked_is_the_products_side_by_side():
    rng = np.random.default_rng(1)
    K = 512
    parts = [(quants.random_blocks(q, n, K, rng), q, n) for q, n in (("Q4_K", 40), ("Q6_K", 16), ("Q8_0", 24))]
    x = rng.standard_normal((5, K)).astype(np.float32)
    out = np.full((5, 80), np.nan, np.float32)
    got = decode_ahead.matmul_stacked(x, parts, out=out)
    want = np.concatenate([kernels.matmul(x, w, q, n) for w, q, n in parts], axis=1)
    np.testing.assert_array_equal(got, want)
    half = decode_ahead.matmul_stacked(x, parts, out=np.full((5, 80), np.nan, np.float16))
    np.testing.assert_array_equal(half, want.astype(np.float16))
    with pytest.raises(Q4KError, match="does not take"):
        decode_ahead.matmul_stacked(x[:, :256], parts)
    with pytest.raises(Q4KError, match="out must be"):
        decode_ahead.matmul_stacked(x, parts, out=np.zeros((5, 79), np.float32))


def qkv_reference(y, T, H, KV, D, style, cos, sin, biases):
    """float64: y's heads split, biased, q and k rotated (the ops' reference rope)."""
    NT = y.shape[0]
    y = y.astype(np.float64).reshape(NT // T, T, H + 2 * KV, D)
    if biases[0] is not None:
        y = y + np.concatenate([b.astype(np.float64).reshape(-1, D) for b in biases])[None, None]
    q, k, v = y[:, :, :H], y[:, :, H:H + KV], y[:, :, H + KV:]
    return rope_forward(q, cos, sin, style), rope_forward(k, cos, sin, style), v


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("style", ["neox", "norm"])
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_rope_split_matches_reference(dtype, style, bias):
    rng = np.random.default_rng([len(dtype), len(style), bias])
    B, T, H, KV, D = 2, 5, 3, 1, 6
    y = rng.standard_normal((B * T, (H + 2 * KV) * D)).astype(np.float32) * 3
    biases = tuple(rng.standard_normal(n * D).astype(np.float32) for n in (H, KV, KV)) if bias else (None,) * 3
    cos, sin = rope_tables(np.arange(T), D, 1e4, np)
    outs = tuple(poisoned(s, dtype) for s in ((B, T, H, D), (B, T, KV, D), (B, T, KV, D)))
    got = qkv_rope_split(y, T, H, KV, D, style, cos, sin, biases=biases, outs=outs)
    for g, r, name in zip(got, qkv_reference(y, T, H, KV, D, style, cos, sin, biases), "qkv"):
        close(g, r, dtype, f"qkv_rope_split {name}")


def test_qkv_rope_split_float32_is_bias_then_rope_apply_bit_for_bit():
    """In float32 the one pass gives what the separate ops give: bias add, rope_apply, split."""
    from kernels.fused_rope import rope_apply

    rng = np.random.default_rng(7)
    B, T, H, KV, D = 1, 4, 2, 2, 8
    y = rng.standard_normal((B * T, (H + 2 * KV) * D)).astype(np.float32)
    biases = tuple(rng.standard_normal(n * D).astype(np.float32) for n in (H, KV, KV))
    cos, sin = rope_tables(np.arange(T), D, 1e4, np)
    q, k, v = qkv_rope_split(y, T, H, KV, D, "neox", cos, sin, biases=biases, dtype=np.float32)
    yb = (y.reshape(B, T, H + 2 * KV, D) + np.concatenate([b.reshape(-1, D) for b in biases])[None, None])
    yb = yb.astype(np.float32)
    q2 = rope_apply(np.ascontiguousarray(yb[:, :, :H]), "neox", cos=cos, sin=sin)
    k2 = rope_apply(np.ascontiguousarray(yb[:, :, H:H + KV]), "neox", cos=cos, sin=sin)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(k, k2)
    np.testing.assert_array_equal(v, yb[:, :, H + KV:])


def test_qkv_rope_split_errors():
    cos, sin = rope_tables(np.arange(4), 8, 1e4, np)
    y = np.zeros((8, 32), np.float32)
    with pytest.raises(Q4KError, match="y must be"):
        qkv_rope_split(y, 3, 2, 1, 8, "neox", cos, sin)
    with pytest.raises(Q4KError, match="unknown rope style"):
        qkv_rope_split(y, 4, 2, 1, 8, "gptj", cos, sin)
    with pytest.raises(Q4KError, match="biases"):
        qkv_rope_split(y, 4, 2, 1, 8, "neox", cos, sin, biases=(np.zeros(16), np.zeros(8), np.zeros(4)))


# -- GPU: the 7B's sizes -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_gpu_lm_head_ahead_at_7b_size(out_dtype):
    """The 152064 x 3584 Q6_K head (random blocks) through the ring: eager and replayed from a CUDA
    graph, against the plain per-slab products; poisoned output, M = 512 tokens."""
    import cupy as cp

    rng = np.random.default_rng(3)
    V, K, M = 152064, 3584, 512
    w = cp.asarray(quants.random_blocks("Q6_K", V, K, rng))
    x = cp.asarray(rng.standard_normal((M, K)).astype(np.float32))
    want = cp.empty((M, V), np.float32)
    for r0 in range(0, V, 16384):
        r1 = min(V, r0 + 16384)
        want[:, r0:r1] = kernels.matmul(x, w[r0:r1], "Q6_K", r1 - r0, variant="dequant_linked_cublas")
    out = cp.full((M, V), np.nan, out_dtype)
    decode_ahead.matmul_ahead(x, w, "Q6_K", V, out)
    tol = 1e-6 if out_dtype == "float32" else 1e-3
    err = float(cp.abs(out.astype(cp.float32) - want).max())
    assert err <= tol * float(cp.abs(want).max()), err
    out.fill(np.nan)
    x16 = x.astype(cp.float16)                 # nothing allocated inside the capture
    cp.cuda.get_current_stream().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        decode_ahead.matmul_ahead(x16, w, "Q6_K", V, out)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    assert float(cp.abs(out.astype(cp.float32) - want).max()) <= tol * float(cp.abs(want).max())


@pytest.mark.gpu
def test_gpu_stacked_qkv_at_7b_size():
    import cupy as cp

    rng = np.random.default_rng(4)
    K, M = 3584, 1000
    parts = [(cp.asarray(quants.random_blocks(q, n, K, rng)), q, n)
             for q, n in (("Q4_K", 3584), ("Q4_K", 512), ("Q6_K", 512))]
    x = cp.asarray(rng.standard_normal((M, K)).astype(np.float16))
    got = decode_ahead.matmul_stacked(x, parts)
    want = cp.concatenate([kernels.matmul(x, w, q, n) for w, q, n in parts], axis=1)
    err = float(cp.abs(got - want).max())
    assert err <= 1e-5 * float(cp.abs(want).max()), err


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2 Q4_K/Q6_K", "qwen2-bias", "llama-gqa"])
def test_gpu_teacher_fused_qkv_matches_the_separate_ops(family, tmp_path, monkeypatch):
    """The fused q/k/v path (stacked product + one epilogue) against the separate products, bias adds,
    ropes and casts, on the GPU at GEMM sizes: the same fp16 operands, the same products. The first
    family's q, k, v are all linked types (one stacked GEMM); the others mix in Q8_0 (per-weight products)."""
    from q4kdistill import backend
    from q4kdistill.formats import synthetic
    from q4kdistill.teacher import forward
    from q4kdistill.teacher.model import Teacher
    from test_teacher_forward import write_family
    from test_teacher_real import cosine_rows

    path = (synthetic.write_gguf(tmp_path / "q.gguf", synthetic.tiny_config("qwen2"), seed=11) if " " in family
            else write_family(family, tmp_path, seed=11))
    t = Teacher.load(path, device="cuda", log=None)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, t.vocab_size, (3, 96))
    mask = np.ones((3, 96), bool)
    mask[1, 60:] = False
    calls = []
    real = forward.qkv_rope
    monkeypatch.setattr(forward, "qkv_rope", lambda *a: calls.append(1) or real(*a))
    fused = backend.to_host(t.logits_for_batch(ids, mask))[mask]
    assert calls, "the fused path did not run"
    monkeypatch.setattr(forward, "FUSED_QKV", False)
    calls.clear()
    sep = backend.to_host(t.logits_for_batch(ids, mask))[mask]
    assert not calls
    assert cosine_rows(fused, sep).min() >= 0.99999
    np.testing.assert_allclose(fused, sep, rtol=0, atol=2e-3 * np.abs(sep).max())


def _product16_hooks(setting, monkeypatch, seen):
    """(env name, hook): the hook records the dtype of the 16-bit products the setting switches on."""
    from q4kdistill.teacher import forward

    if setting == "glu":
        real = forward._product16
        monkeypatch.setattr(forward, "_product16", lambda *a: seen.append("float16") or real(*a))
        return forward.GLU_INPUTS_ENV
    import kernels.fused_rope as fr

    orig = fr.qkv_rope_split
    monkeypatch.setattr(fr, "qkv_rope_split", lambda y, *a, **k: seen.append(str(y.dtype)) or orig(y, *a, **k))
    return forward.QKV_PRODUCT_ENV


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["glu", "qkv"])
@pytest.mark.parametrize("family", ["qwen2 Q4_K/Q6_K", "llama-mha-tied"])
def test_gpu_teacher_products_in_float16(setting, family, tmp_path, monkeypatch):
    """$Q4KDISTILL_GLU_INPUTS=float16 (gate and up written in 16 bits by their GEMMs) and
    $Q4KDISTILL_QKV_PRODUCT=float16 (the stacked q/k/v product, then biased and rotated by
    qkv_rope_split; both the default) against float32 products: one more fp16 rounding of those values,
    cosine >= 0.9999 at every position."""
    from q4kdistill import backend
    from q4kdistill.formats import synthetic
    from q4kdistill.teacher import forward
    from q4kdistill.teacher.model import Teacher
    from test_teacher_forward import write_family
    from test_teacher_real import cosine_rows

    path = (synthetic.write_gguf(tmp_path / "q.gguf", synthetic.tiny_config("qwen2"), seed=12) if " " in family
            else write_family(family, tmp_path, seed=12))
    t = Teacher.load(path, device="cuda", log=None)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, t.vocab_size, (2, 80))
    monkeypatch.setenv(forward.GLU_INPUTS_ENV, "float32")
    monkeypatch.setenv(forward.QKV_PRODUCT_ENV, "float32")
    want = backend.to_host(t.logits_for_batch(ids)).reshape(-1, t.vocab_size)
    seen = []
    monkeypatch.setenv(_product16_hooks(setting, monkeypatch, seen), "float16")
    got = backend.to_host(t.logits_for_batch(ids)).reshape(-1, t.vocab_size)
    assert seen and set(seen) == {"float16"}, seen
    assert cosine_rows(got, want).min() >= 0.9999


def test_glu_inputs_setting_is_checked(monkeypatch):
    from q4kdistill.teacher import forward

    monkeypatch.setenv(forward.GLU_INPUTS_ENV, "bf16")
    with pytest.raises(Q4KError, match="GLU_INPUTS"):
        forward._glu_inputs16(np.zeros((1, 1, 4), np.float32), {})
    monkeypatch.setenv(forward.QKV_PRODUCT_ENV, "half")
    with pytest.raises(Q4KError, match="QKV_PRODUCT"):
        forward._setting16(forward.QKV_PRODUCT_ENV)
    monkeypatch.setenv(forward.QKV_PRODUCT_ENV, "float16")
    assert forward._setting16(forward.QKV_PRODUCT_ENV)
    monkeypatch.setenv(forward.QKV_PRODUCT_ENV, "float32")
    assert not forward._setting16(forward.QKV_PRODUCT_ENV)
    monkeypatch.delenv(forward.QKV_PRODUCT_ENV)
    assert forward._setting16(forward.QKV_PRODUCT_ENV)      # float16 by default
