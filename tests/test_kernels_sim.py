"""Kernels on the CPU: the real @cuda.jit kernels under the Numba simulator on tiny shapes, the
NumPy path on real sizes, and the registry / dispatch / autotune / bench plumbing."""
import json

import numpy as np
import pytest

import kernels
from kernels import autotune, bench, cpu, dequant, dispatch
from kernel_cases import QTYPES, bf16_to_f32, real_tensors, reference, rel_err, sample_rows
from q4kdistill import backend
from q4kdistill.formats import quants
from q4kdistill.errors import Q4KError

# (qtype, blocks per row): one aligned and one odd-sized row per type; an odd number of
# Q6_K/Q8_0/Q5_0 blocks makes rows that are not whole uint32 words (the padding path), and
# Q8_0/Q5_0 blocks at odd positions start 2 bytes into a word.
SHAPES = [("Q4_K", 1), ("Q4_K", 2), ("Q6_K", 2), ("Q6_K", 1), ("Q8_0", 4), ("Q8_0", 3), ("Q5_0", 2), ("Q5_0", 5)]
SIM_VARIANTS = [n for n in kernels.variants() if kernels.get(n).device != "cpu" and kernels.get(n).simulated]


@pytest.fixture(scope="module")
def real(gemma_path):
    return real_tensors(gemma_path)


@pytest.mark.parametrize("name,qtype,blocks", [(n, q, b) for n in SIM_VARIANTS if not n.startswith("gemm_tile")
                                                for q, b in SHAPES if q in kernels.get(n).qtypes])
def test_variant_matches_reference(real, name, qtype, blocks):
    rng = np.random.default_rng([blocks, len(name), QTYPES.index(qtype)])
    w = sample_rows(real[qtype], qtype, 5, blocks, rng)
    K = kernels.weights.columns(w, qtype, 5)
    v = kernels.get(name)
    for M in sorted({1, 3, min(v.m_max or 17, 17)}):
        x = rng.standard_normal((M, K)).astype(np.float32)
        out = np.full((M, 5), np.nan, np.float32)
        v(x, w, qtype, 5, out)                         # called directly: matmul would pick numpy_slab
        assert rel_err(out, reference(x, w, qtype)) <= v.rel_err


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", [n for n in SIM_VARIANTS if n.startswith("gemm_tile")])
def test_gemm_tile_matches_reference(real, name, qtype):
    rng = np.random.default_rng(QTYPES.index(qtype))
    w = sample_rows(real[qtype], qtype, 5, 1 if qtype.endswith("K") else 3, rng)
    K = kernels.weights.columns(w, qtype, 5)
    x = rng.standard_normal((3, K)).astype(np.float32)
    out = np.full((3, 5), np.nan, np.float32)
    kernels.get(name)(x, w, qtype, 5, out)
    assert rel_err(out, reference(x, w, qtype)) <= 1e-5


@pytest.mark.parametrize("qtype,blocks", SHAPES)
def test_decode_kernel_all_dtypes(real, qtype, blocks):
    rng = np.random.default_rng(blocks)
    w = sample_rows(real[qtype], qtype, 3, blocks, rng)
    K = kernels.weights.columns(w, qtype, 3)
    ref = quants.dequantize(w, qtype)
    f32 = dequant.decode_rows(w, qtype, K, "float32", np.full((3, K), np.nan, np.float32))
    np.testing.assert_allclose(f32, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    f16 = dequant.decode_rows(w, qtype, K, "float16", None)
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    bf = dequant.decode_rows(w, qtype, K, "bfloat16", None)
    np.testing.assert_array_equal(bf, cpu._bf16_bits(f32))           # RNE of the kernel's own fp32
    ids = np.array([2, 0, 2, 1])
    g = dequant.decode_rows(w, qtype, K, "float32", None, ids)
    np.testing.assert_array_equal(g, f32[ids])


def test_bf16_rounding_edge_cases():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf, np.nan, 3.0e38], np.float32)
    bits = cpu._bf16_bits(x)
    assert bf16_to_f32(bits)[:4].tolist() == [1.0, 1.0, 1 + 2**-6, -2.5]   # ties to even
    assert np.isinf(bf16_to_f32(bits)[4]) and np.isnan(bf16_to_f32(bits)[5])


@pytest.mark.parametrize("qtype", QTYPES)
def test_numpy_path_real_sizes(real, qtype):
    """The CPU default: whole real rows (K = 640 / 1024 / 2048), slabs smaller than the matrix."""
    rng = np.random.default_rng(7)
    w = real[qtype][:201]
    K = kernels.weights.columns(w, qtype, 201)
    x = rng.standard_normal((4, K)).astype(np.float32)
    old = cpu.SLAB_BYTES
    cpu.SLAB_BYTES = 64 * 4 * K                                       # 64-row slabs: 4 of them
    try:
        assert kernels.choose(qtype, 4, 201, K, on_gpu=False) == "numpy_slab"
        out = kernels.matmul(x.astype(np.float16), w, qtype, 201)     # float16 x accepted
        assert out.dtype == np.float32 and out.shape == (4, 201)
        assert rel_err(out, reference(x.astype(np.float16), w, qtype)) <= 1e-5
    finally:
        cpu.SLAB_BYTES = old


def test_dequantize_to_and_embedding_rows_numpy(real):
    w = real["Q8_0"][:50]
    K = kernels.weights.columns(w, "Q8_0", 50)
    ref = quants.dequantize(w, "Q8_0")
    np.testing.assert_array_equal(kernels.dequantize_to(w, "Q8_0", 50, np.float32), ref)
    np.testing.assert_array_equal(kernels.dequantize_to(w, "Q8_0", 50, "float16"), ref.astype(np.float16))
    bf = kernels.dequantize_to(w, "Q8_0", 50, "bfloat16")
    assert bf.dtype == np.uint16 and np.abs(bf16_to_f32(bf) - ref).max() <= np.abs(ref).max() * 2**-8
    ids = np.array([[3, 49], [0, 3]])
    np.testing.assert_array_equal(kernels.embedding_rows(w, "Q8_0", ids), ref[ids.reshape(-1)])
    assert K == 640
    with pytest.raises(Q4KError, match="ids must be in"):
        kernels.embedding_rows(w, "Q8_0", np.array([50]))


def test_matmul_rejects_bad_input(real):
    w = real["Q4_K"][:4]
    K = kernels.weights.columns(w, "Q4_K", 4)
    x = np.ones((2, K), np.float32)
    with pytest.raises(Q4KError, match="x must be"):
        kernels.matmul(x[:, :-1], w, "Q4_K", 4)
    with pytest.raises(Q4KError, match="rows but n_out"):
        kernels.matmul(x, w, "Q4_K", 5)
    with pytest.raises(Q4KError, match="uint8"):
        kernels.matmul(x, w.view(np.int8), "Q4_K", 4)
    with pytest.raises(Q4KError, match="no kernels|unknown"):
        kernels.matmul(x, w, "Q2_K", 4)
    with pytest.raises(Q4KError, match="does not take"):
        kernels.matmul(np.ones((17, K), np.float32), w, "Q4_K", 4, variant="gemv_warp_r2w4")
    with pytest.raises(Q4KError, match="no kernel variant"):
        kernels.matmul(x, w, "Q4_K", 4, variant="nope")


def test_register_and_call_a_new_variant(real):
    w = real["Q6_K"][:3]
    K = kernels.weights.columns(w, "Q6_K", 3)

    def by_decode(x, w_raw, qtype, n_out, out, scale):
        out[:] = scale * (x @ kernels.dequantize_to(w_raw, qtype, n_out, np.float32).T)
        return out

    v = kernels.Variant(name="test_by_decode", qtypes=("Q6_K",), fn=by_decode, params={"scale": 1.0},
                        description="decode everything, numpy matmul", device="cpu")
    kernels.register(v, replace=True)
    assert "test_by_decode" in kernels.variants("Q6_K") and "test_by_decode" not in kernels.variants("Q4_K")
    assert kernels.get("test_by_decode") is v
    with pytest.raises(Q4KError, match="already registered"):
        kernels.register(v)
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    out = kernels.matmul(x, w, "Q6_K", 3, variant="test_by_decode")
    assert rel_err(out, reference(x, w, "Q6_K")) <= 1e-5


def test_tuning_table_drives_choice(tmp_path, monkeypatch):
    table = {"format": 1, "gpus": {"Fake GPU": {"Q4_K": [
        {"m_max": 1, "variant": "gemv_warp_r1w4"},
        {"m_max": 16, "variant": "no_such_variant"},
        {"m_max": 64, "variant": "gemm_tile_64x64"},
        {"m_max": None, "variant": "dequant_f32_cublas"}]}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("Q4KDISTILL_TUNING", str(path))
    dispatch.reload_table()
    try:
        pick = lambda M, gpu="Fake GPU": dispatch._choose("Q4_K", M, 4096, 4096, gpu)
        assert [pick(1), pick(8), pick(64), pick(4096)] == [
            "gemv_warp_r1w4", "gemm_tile_64x64", "gemm_tile_64x64", "dequant_f32_cublas"]   # a missing name falls through
        assert [pick(1, "Other GPU"), pick(5, "Other GPU"), pick(9, "Other GPU")] == [
            "gemv_chunk_r4w4", "gemv_warp_r4w4", dispatch.DEFAULT_LARGE]
        assert dispatch._choose("Q8_0", 1, 8, 8, "Fake GPU") == "gemv_warp_r2w4"
    finally:
        monkeypatch.delenv("Q4KDISTILL_TUNING")
        dispatch.reload_table()


def test_autotune_picks_fastest_per_bucket(tmp_path):
    def row(M, v, t, K=256, N=256):
        return {"qtype": "Q4_K", "K": K, "N": N, "M": M, "variant": v, "time_us": t}

    rows = [row(1, bench.BASELINE, 50), row(1, "gemv_warp_r1w4", 10), row(1, "gemv_warp_r2w4", 12),
            row(1, "gemv_warp_r1w4", 30, N=512), row(1, "gemv_warp_r2w4", 20, N=512),
            row(1, "dequant_f16_cublas", 5, N=512),                                  # not measured at every shape
            row(4096, "dequant_f16_cublas", 100), row(4096, "dequant_f32_cublas", 300), row(4096, "gemm_tile_64x64", 900)]
    e = autotune.entries_from_rows(rows)["Q4_K"]   # M = 1: r2w4 wins the sum; r1w4 the narrow shape by 1 / 0.2 a shape
    assert [(x["m_max"], x.get("n_min"), x["variant"]) for x in e] == [(1, 512, "gemv_warp_r2w4"), (1, None, "gemv_warp_r1w4"),
                                                                       (None, None, "dequant_f16_cublas")]
    exact = autotune.entries_from_rows(rows, max_rel_err=1e-5)["Q4_K"]
    assert exact[-1]["variant"] == "dequant_f32_cublas"
    path = tmp_path / "tab.json"
    autotune.write_table(path, "GPU A", {"Q4_K": e}, {"date": "x"})
    autotune.write_table(path, "GPU B", {"Q4_K": exact}, {"date": "y"})
    assert set(json.loads(path.read_text())["gpus"]) == {"GPU A", "GPU B"}


def test_autotune_splits_a_bucket_by_output_width_only_where_it_pays():
    """The eighteenth stop's H100 ratios to cuBLAS at M = 512 (gemm_wgmma_rs_linked 0.40 / 0.64 / 0.40 / 0.81, the
    scratch path ~0.55 on the four 7B shapes): the fused GEMM wins the two wide outputs (N 18944 and 152064), the
    scratch path the two 3584-wide ones, so the bucket gets {"n_min": 18944} first; with the wide gain under
    SPLIT_GAIN a shape it stays one entry (the whole bucket's winner)."""
    def rows(rs_wide):
        out = []
        for (K, N), rs, dq in (((3584, 3584), 0.40, 0.55), ((3584, 18944), rs_wide, 0.55), ((18944, 3584), 0.40, 0.55),
                               ((3584, 152064), 0.81, 0.57)):
            out += [{"qtype": "Q4_K", "K": K, "N": N, "M": M, "variant": v, "time_us": 100 / r}
                    for M in (256, 512) for v, r in (("gemm_wgmma_rs_linked", rs), ("dequant_linked_cublas", dq),
                                                     (bench.BASELINE, 1.0))]
        return out

    e = autotune.entries_from_rows(rows(0.64))["Q4_K"]
    assert [(x["m_max"], x.get("n_min"), x["variant"]) for x in e] == [
        (512, 18944, "gemm_wgmma_rs_linked"), (512, None, "dequant_linked_cublas")]
    assert e[0]["score"] == e[1]["score"] == 1.0
    # the head alone gains 0.57 / 0.81 = 0.70 a shape, over the bar: N >= 152064 only, when 3584 -> 18944 loses
    e = autotune.entries_from_rows(rows(0.50))["Q4_K"]
    assert [(x.get("n_min"), x["variant"]) for x in e] == [(152064, "gemm_wgmma_rs_linked"), (None, "dequant_linked_cublas")]
    flat = [r for r in rows(0.64) if r["N"] != 152064 or r["variant"] != "gemm_wgmma_rs_linked"]
    flat += [{**r, "variant": "gemm_wgmma_rs_linked", "time_us": r["time_us"] * 0.99} for r in rows(0.64)
             if r["N"] == 152064 and r["variant"] == "dequant_linked_cublas"]   # 1 % on the head: no split
    flat = [r for r in flat if r["N"] != 18944 or r["variant"] != "gemm_wgmma_rs_linked"]
    flat += [{**r, "variant": "gemm_wgmma_rs_linked", "time_us": r["time_us"] * 1.2} for r in rows(0.64)
             if r["N"] == 18944 and r["variant"] == "dequant_linked_cublas"]
    e = autotune.entries_from_rows(flat)["Q4_K"]
    assert [(x.get("n_min"), x["variant"]) for x in e] == [(None, "dequant_linked_cublas")]


def test_autotune_never_picks_a_wrong_row():
    """bench.run checks each variant's output against the cuBLAS product before timing it; a row
    over the bound is 'wrong', and the fastest wrong variant loses to a slower right one."""
    def row(v, t, err, bound):
        return bench._row("Q4_K", 256, 256, 4096, v, t * 1e-6, 1, 1.0, 1e-4, err, bound)

    rows = [row("dequant_f16_cublas", 100, 4e-4, bench.check_bound(2e-3)),
            row("dequant_linked_cublas", 50, 0.9, bench.check_bound(2e-3)),          # fast and wrong
            row("dequant_f32_cublas", 300, float("inf"), bench.check_bound(1e-5))]    # NaN in its output
    assert [r["wrong"] for r in rows] == [False, True, True]
    assert autotune.entries_from_rows(rows)["Q4_K"][0]["variant"] == "dequant_f16_cublas"


def test_bench_rel_error_and_bound():
    ref = np.array([[1.0, -4.0], [2.0, 0.5]], np.float32)
    assert bench.rel_error(ref, ref) == 0.0
    assert bench.rel_error(ref + np.float32(0.04), ref) == pytest.approx(0.01, rel=1e-5)
    assert bench.rel_error(np.full_like(ref, np.nan), ref) == float("inf")
    assert bench.check_bound(1e-5) < 3e-3 < bench.check_bound(2e-2)


@pytest.mark.skipif(backend.on_gpu(), reason="checks the message given without a GPU")
def test_bench_table_format_and_cli_without_gpu(capsys):
    from q4kdistill import cli

    r = bench._row("Q4_K", 3584, 18944, 1, "gemv_warp_r2w4", 20e-6, 38_191_104, 3000.0, 80e-6)
    assert r["GBps"] == pytest.approx(1909.6, rel=1e-3) and r["vs_cublas_fp16"] == pytest.approx(4.0)
    line = bench.format_rows([r])
    assert "gemv_warp_r2w4" in line and "4.00" in line
    assert cli.main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
