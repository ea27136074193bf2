"""kernels/requant8.py: the numerics of an int8 GEMM that re-quantizes Q4_K / Q6_K super-blocks to int8
(issue 17's int8-activation variant), against float64 definitions; and, on the real gemma-3 teacher,
the accuracy issue 17 asks of such a variant (scripts/probe_int8_accuracy.py)."""
from __future__ import annotations

import numpy as np
import pytest

from kernels import requant8 as R
from q4kdistill.errors import Q4KError
from q4kdistill.formats.quants import dequantize, quantize


def _weights(qtype, n=48, K=768, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, K)).astype(np.float32) * rng.uniform(0.1, 3.0, (n, 1)).astype(np.float32)
    if n > 3:
        w[3, :256] = 0.0                                 # an all-zero super-block: dw = 0, w8 = 0
    return quantize(w, qtype)


@pytest.mark.parametrize("qtype", R.QTYPES)
def test_requant_is_within_half_a_step_plus_the_fp16_roundings(qtype):
    raw = _weights(qtype)
    w = dequantize(raw, qtype).astype(np.float64)
    w8, dw = R.requant_rows(raw, qtype)
    assert w8.dtype == np.int8 and dw.shape == (w.shape[0], w.shape[1] // 256)
    assert np.abs(w8.astype(int)).max() <= R.LEVELS
    step = np.repeat(dw.astype(np.float64), 256, axis=1)
    err = np.abs(w8 * step - w)
    # rint: half a step; A, C and t rounded to fp16 (relative 2^-11 of |t| <= 126): ~0.1 step more
    assert (err <= 0.62 * step + 1e-30).all(), float((err / np.where(step > 0, step, 1)).max())
    assert (w8[3, :256] == 0).all() and dw[3, 0] == 0
    assert np.abs(w8.astype(int)).max() >= R.LEVELS - 2  # the bound is (nearly) reached: no range wasted


@pytest.mark.parametrize("qtype", R.QTYPES)
@pytest.mark.parametrize("x_block", [32, 128, 256])
def test_matmul_is_its_definition_and_close_to_the_exact_product(qtype, x_block):
    raw = _weights(qtype, n=40, K=512, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[1] = 0.0                                           # a zero row: dx = 0
    got = R.matmul(x, raw, qtype, x_block=x_block, rows=16)
    x8, dx = R.quantize_x(x, x_block)
    w8, dw = R.requant_rows(raw, qtype)
    want = np.zeros((6, 40))
    for s in range(512 // x_block):
        cols = slice(s * x_block, (s + 1) * x_block)
        dots = x8[:, cols].astype(np.float64) @ w8[:, cols].astype(np.float64).T
        want += dots * dx[:, s:s + 1] * dw[:, (s * x_block) // 256][None, :]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    exact = x.astype(np.float64) @ dequantize(raw, qtype).astype(np.float64).T
    assert np.abs(got - exact).max() / np.abs(exact).max() < 2e-2
    assert (got[1] == 0).all()


def test_quantize_x_rule():
    x = np.array([[0.5, -1.0, 0.25, 0.0] * 32], np.float32)       # one block of 128
    x8, dx = R.quantize_x(x, 128)
    assert dx[0, 0] == np.float32(1.0) / np.float32(127)
    assert list(x8[0, :4]) == [64, -127, 32, 0]                    # rint(0.5 * 127) = 64 (ties to even: 63.5 -> 64)


def test_bad_input_is_a_clear_error():
    with pytest.raises(Q4KError, match="Q4_K or Q6_K"):
        R.requant_rows(quantize(np.zeros((2, 256), np.float32), "Q8_0"), "Q8_0")
    with pytest.raises(Q4KError, match="multiple of 128"):
        R.quantize_x(np.zeros((2, 200), np.float32), 128)
    with pytest.raises(Q4KError, match="must divide 256"):
        R.matmul(np.zeros((2, 256), np.float32), _weights("Q4_K", 2, 256), "Q4_K", x_block=96)


@pytest.mark.slow
def test_real_gemma3_logits_through_requantized_products_meet_the_bar(gemma_path):
    """Every Q4_K / Q6_K product of the real gemma-3 teacher through int8 x (per 128) and W re-quantized per
    super-block: issue 17's bar for an int8 variant (mean cosine >= 0.999, top-1 >= 95 % against float32).
    Measured 2026-12-05: 0.99961 / 96.9 % (llama.cpp's rule, x per 32 and W exact: 0.99991 / 96.9 %)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import probe_int8_accuracy as P

    rows = P.run(str(gemma_path), tiny=False)
    assert rows["x8/128 w8"]["meets"], rows["x8/128 w8"]
    assert rows["x8/32"]["cos_mean"] >= rows["x8/128 w8"]["cos_mean"] > P.BAR["cos_mean"]
