"""Reference codecs (q4kdistill/formats/quants.py): bit-exact decoding against gguf-py on the real
gemma-3 file, round trips of every type, random blocks, and the errors users can cause.
Quality against llama.cpp itself: tests/test_quants_quality.py."""
import gguf
import numpy as np
import pytest

import q4kdistill
from q4kdistill.formats import quants
from q4kdistill.errors import Q4KError

from _helpers_quants import gguf_tensors

T = gguf.GGMLQuantizationType
ALL = ["Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0", "F16", "BF16", "F32"]
BLOCKY = ["Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0"]

# relative RMSE of dequantize(quantize(x)) on N(0, 1), measured 2026-11-26 with this code
# (llama.cpp's reference quantizers give the same bytes): Q4_K 0.0713, Q6_K 0.0178,
# Q8_0 0.0054, Q5_0 0.0427, Q4_0 0.0860, F16 0.00018, BF16 0.0017
REL_RMSE_BOUND = {"Q4_K": 0.075, "Q6_K": 0.019, "Q8_0": 0.0058, "Q5_0": 0.045, "Q4_0": 0.09,
                  "F16": 2.5e-4, "BF16": 2.5e-3, "F32": 0.0}


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# -- decoding: bit-exact against gguf-py on every tensor of the real file ---------------------

def test_dequantize_bit_exact_vs_gguf_on_every_gemma_tensor(gemma_path):
    rng = np.random.default_rng(0)
    seen = set()
    for name, (info, data) in gguf_tensors(gemma_path).items():
        if name == "token_embd.weight":      # 262144 x 640 Q8_0: first, last and 3000 random rows
            data = data[np.unique(np.r_[0, len(data) - 1, rng.integers(0, len(data), 3000)])]
        ours = q4kdistill.dequantize(data, info.qtype)
        ref = gguf.quants.dequantize(np.asarray(data), info.qtype)
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        assert np.array_equal(bits(ours), bits(ref)), f"{name} ({info.type_name}) differs from gguf-py"
        seen.add(info.type_name)
        if info.quantized:                   # the same bytes as one flat buffer plus a shape
            flat = quants.dequantize(np.asarray(data).reshape(-1), info.qtype, shape=ours.shape)
            assert np.array_equal(bits(flat), bits(ours)), name
    assert seen == {"F32", "Q4_K", "Q6_K", "Q8_0", "Q5_0"}


def test_q4_k_layout_by_hand():
    """One super-block built from the layout diagram, decoded without gguf-py."""
    rng = np.random.default_rng(1)
    sc, mn = rng.integers(0, 64, (1, 8), dtype=np.uint8), rng.integers(0, 64, (1, 8), dtype=np.uint8)
    q = rng.integers(0, 16, (8, 32), dtype=np.uint8)                       # [sub-block, weight]
    block = np.concatenate([np.array([0.5, 0.25], "<f2").view(np.uint8), quants.Q4_K.pack_scale_min(sc, mn)[0],
                            (q[0::2] | (q[1::2] << 4)).reshape(-1)])
    expect = 0.5 * sc[0][:, None] * q - 0.25 * mn[0][:, None]
    assert np.array_equal(quants.dequantize(block[None], "Q4_K"), expect.reshape(1, 256).astype(np.float32))
    assert [a.tolist() for a in quants.Q4_K.get_scale_min(block[None, 4:16])] == [sc.tolist(), mn.tolist()]


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_round_trip_on_odd_row_counts(name, monkeypatch):
    monkeypatch.setattr(quants, "_CHUNK_WEIGHTS", 512)     # several chunks even on tiny inputs
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    raw = quants.quantize(x, name)
    assert raw.dtype == np.uint8 and raw.shape == (37, quants.row_bytes(name, 512))
    y = quants.dequantize(raw, name)
    assert y.dtype == np.float32 and y.shape == x.shape and np.isfinite(y).all()
    rel = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert rel <= REL_RMSE_BOUND[name], f"{name}: relative RMSE {rel:.5f}"
    if name != "F32":
        assert rel > REL_RMSE_BOUND[name] / 3       # a lossy type that came out lossless is a bug too

    # a second pass keeps the values: exactly for plain types, almost always for K-quants
    y2 = quants.dequantize(quants.quantize(y, name), name)
    if name in ("Q4_K", "Q6_K"):
        assert np.sqrt(np.mean((y2 - y) ** 2)) < 0.05 * np.sqrt(np.mean((y - x) ** 2))
    else:
        assert np.array_equal(bits(y2), bits(y))


@pytest.mark.parametrize("name", BLOCKY)
def test_leading_dims_and_one_dim_inputs(name):
    x = np.random.default_rng(2).standard_normal((2, 3, 256)).astype(np.float32)
    raw = quants.quantize(x, name)
    assert raw.shape == (2, 3, quants.row_bytes(name, 256))
    assert np.array_equal(quants.dequantize(raw, name), quants.dequantize(raw.reshape(6, -1), name).reshape(x.shape))
    assert quants.dequantize(quants.quantize(x[0, 0], name), name).shape == (256,)


def test_special_blocks_round_trip():
    """All-zero, constant, one-hot and all-positive rows (ggml's special branches)."""
    rows = np.zeros((4, 256), np.float32)
    rows[1] = -0.75
    rows[2, 17] = 3.0
    rows[3] = np.abs(np.random.default_rng(3).standard_normal(256))
    for name in BLOCKY:
        y = quants.dequantize(quants.quantize(rows, name), name)
        assert np.array_equal(y[0], rows[0]), name
        assert np.allclose(y[1:3], rows[1:3], atol=1e-3 * 3.0), name
        assert np.sqrt(np.mean((y[3] - rows[3]) ** 2)) < 0.15 * np.sqrt(np.mean(rows[3] ** 2)), name


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_0", "F16", "BF16"])
def test_quantize_matches_gguf_py(name):
    x = (np.random.default_rng(4).standard_normal((9, 256)) * 0.05).astype(np.float32)
    ref = np.ascontiguousarray(gguf.quants.quantize(x, T[name])).view(np.uint8).reshape(9, -1)
    assert np.array_equal(quants.quantize(x, name), ref)


def test_float_types_take_typed_arrays():
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    assert np.array_equal(quants.dequantize(x, "F32"), x)
    assert np.array_equal(quants.dequantize(x.astype(np.float16), "F16"), x.astype(np.float16).astype(np.float32))
    assert np.array_equal(quants.dequantize(quants.quantize(x, "BF16"), "BF16"),
                          gguf.quants.dequantize(gguf.quants.quantize(x, T.BF16), T.BF16))


# -- random blocks ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_random_blocks_are_valid_and_realistic(name):
    raw = quants.random_blocks(name, 7, 512, np.random.default_rng(6))
    again = quants.random_blocks(name, 7, 512, np.random.default_rng(6))
    assert raw.dtype == np.uint8 and raw.shape == (7, quants.row_bytes(name, 512))
    assert np.array_equal(raw, again)
    y = quants.dequantize(raw, name)
    assert np.isfinite(y).all()
    assert 0.01 < y.std() < 0.04 and abs(y.mean()) < 0.01, (y.mean(), y.std())
    other = quants.random_blocks(name, 7, 512, np.random.default_rng(7))
    assert not np.array_equal(raw, other)


def test_random_blocks_scale_range_and_speed():
    import time

    raw = quants.random_blocks("Q4_K", 64, 4096, np.random.default_rng(8), d_range=(1e-3, 1e-2))
    d = raw.reshape(-1, 144)[:, :2].copy().view("<f2").astype(np.float32)
    assert d.min() >= 1e-3 * 0.999 and d.max() <= 1e-2 * 1.001
    t = time.perf_counter()
    big = quants.random_blocks("Q4_K", 4096, 4096, np.random.default_rng(9))    # 9.4 MB
    assert big.nbytes / (time.perf_counter() - t) > 1e8                      # > 100 MB/s even on CI


# -- type helpers and errors ------------------------------------------------------------------

def test_type_helpers():
    assert quants.qtype("q4_k") is quants.qtype(T.Q4_K) is quants.qtype(12) is T.Q4_K
    assert set(quants.QTYPES) == {T[n] for n in ALL}
    assert (quants.block_size("Q4_K"), quants.type_size("Q4_K")) == (256, 144)
    assert (quants.block_size("Q6_K"), quants.type_size("Q6_K")) == (256, 210)
    assert (quants.block_size("Q8_0"), quants.type_size("Q8_0")) == (32, 34)
    assert quants.row_bytes("Q4_K", 4096) == 2304 and quants.row_bytes("F32", 5) == 20
    assert quants.is_quantized("Q5_0") and not quants.is_quantized("BF16")


@pytest.mark.parametrize("bad", ["Q9_X", 999, None, 3.5, "Q2_K", T.IQ2_XXS])
def test_unknown_types_are_refused_by_name(bad):
    with pytest.raises(Q4KError, match=str(getattr(bad, "name", bad))):
        quants.qtype(bad)
    with pytest.raises(Q4KError):
        quants.dequantize(np.zeros((1, 144), np.uint8), bad)


def test_shape_errors():
    with pytest.raises(Q4KError, match="multiple of 256"):
        quants.row_bytes("Q4_K", 300)
    with pytest.raises(Q4KError, match="multiple of 256"):
        quants.quantize(np.zeros((2, 300), np.float32), "Q6_K")
    with pytest.raises(Q4KError, match="whole blocks of 144"):
        quants.dequantize(np.zeros((2, 150), np.uint8), "Q4_K")
    with pytest.raises(Q4KError, match="does not hold"):
        quants.dequantize(np.zeros(288, np.uint8), "Q4_K", shape=(3, 256))
    with pytest.raises(Q4KError, match="uint8"):
        quants.dequantize(np.zeros((2, 144), np.float32), "Q4_K")
    with pytest.raises(Q4KError, match="scalar"):
        quants.quantize(np.float32(1.0), "Q8_0")


def test_value_errors():
    x = np.ones((1, 256), np.float32)
    x[0, 3] = np.nan
    with pytest.raises(Q4KError, match="NaN"):
        quants.quantize(x, "Q4_K")
    with pytest.raises(Q4KError, match="too large for Q8_0"):
        quants.quantize(np.full((1, 32), 1e7, np.float32), "Q8_0")


# -- one table of block layouts (q4kdistill/formats/block_layouts.py) ------------------------------------

def test_block_layout_table_is_the_one_list_of_block_types():
    from pathlib import Path

    from q4kdistill.formats import block_layouts

    assert set(block_layouts.LAYOUTS) == {q.name for q in quants.QTYPES if quants.is_quantized(q)} == set(BLOCKY)
    for name, lay in block_layouts.LAYOUTS.items():
        codec = quants._codec(name)
        assert codec.layout is lay and (codec.block_size, codec.type_size) == (lay.weights, lay.nbytes)
        assert gguf.GGML_QUANT_SIZES[T[name]] == (lay.weights, lay.nbytes)
    q4k, q6k = block_layouts.LAYOUTS["Q4_K"], block_layouts.LAYOUTS["Q6_K"]
    assert [(f, q4k.at(f)) for f in ("d", "dmin", "scales", "qs")] == [("d", 0), ("dmin", 2), ("scales", 4), ("qs", 16)]
    assert [(f, q6k.at(f)) for f in ("ql", "qh", "scales", "d")] == [("ql", 0), ("qh", 128), ("scales", 192), ("d", 208)]
    assert quants._codec("Q4_K").fp16_offsets == (0, 2) and quants._codec("Q6_K").fp16_offsets == (208,)
    with pytest.raises(KeyError, match="no field 'qh'"):
        q4k.at("qh")
    # the CUDA C header is generated from the table (regenerate: python -m q4kdistill.formats.block_layouts > ...)
    header = Path(__file__).parents[1] / "kernels" / "csrc" / "block_layouts.cuh"
    assert header.read_text() == block_layouts.cuda_header()
    assert "constexpr int Q4_K_QS = 16;" in block_layouts.cuda_header()


def test_codecs_follow_the_table_when_a_field_moves(monkeypatch):
    """Encoding and decoding read fields by name: a layout with Q8_0's fields swapped (qs, then d)
    round-trips too, and puts d's bytes at the end."""
    import dataclasses

    from q4kdistill.formats import block_layouts

    lay = block_layouts.LAYOUTS["Q8_0"]
    swapped = dataclasses.replace(lay, fields=lay.fields[::-1])
    codec = quants._codec("Q8_0")
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    normal = quants.quantize(x, "Q8_0")
    ref = quants.dequantize(normal, "Q8_0")
    monkeypatch.setattr(codec, "layout", swapped)
    monkeypatch.setattr(codec, "fp16_offsets", (swapped.at("d"),))
    raw = quants.quantize(x, "Q8_0")
    assert np.array_equal(raw.reshape(-1, 34)[:, 32:], normal.reshape(-1, 34)[:, :2])     # d moved to the end
    assert np.array_equal(raw.reshape(-1, 34)[:, :32], normal.reshape(-1, 34)[:, 2:])
    np.testing.assert_array_equal(quants.dequantize(raw, "Q8_0"), ref)
